"""The layer above the selector and the trainer client: the command line, ``colm-train``, the
launchers that run a selector and its trainers as one job, held-out evaluation and the demo.

``colm_server`` (selection, data, model, service) and ``colm_client`` (stream, sync, loss) import
neither this package nor each other; ``colm_wire`` is all they share.
"""
