"""The wire format shared by selector and trainers: gRPC stubs, tensor and adapter encoding.

Both sides import it, so a message is built and read by one piece of code.
"""
