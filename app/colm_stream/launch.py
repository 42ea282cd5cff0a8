"""Run the selector and the trainer ranks as real child processes, as a deployment does.

The demo, the benchmarks and the process-level tests start jobs through this module: a
``colm-selector serve`` process on a loopback port, waited for through the standard gRPC health
service, and ``colm-train`` as one process or under torchrun.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from colm_client.channel import open_channel
from colm_client.status import SERVICE_NAME, status

# Fast reconnects: the selector takes seconds to import torch and load its model.
_FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 500)]


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (another process may still take it before we do)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class SelectorProcess:
    """``colm-selector serve --config FILE --set ...`` as a child process on a loopback port.

    Its stdout and stderr go to ``log_path``. ``port=None`` picks a free port; give the same port
    to a successor to restart a selector where its clients look for it. ``replicas > 1`` runs it
    under torchrun as that many selector replicas (see ``colm_server.service.replicas``).
    """

    def __init__(self, config: str | os.PathLike, overrides: Sequence[str] = (), *,
                 log_path: str | os.PathLike, port: int | None = None, env: dict | None = None,
                 replicas: int = 1):
        self.port = free_port() if port is None else port
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "wb")
        args = [sys.executable, "-m", "colm_server.service", "serve", "--config", str(config)]
        if replicas > 1:
            torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(replicas)]
            args[1:2] = [*torchrun, "-m"]
        for item in [*overrides, f"service.port={self.port}"]:  # the last --set of a key wins
            args += ["--set", item]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_serving(self, timeout: float = 120.0) -> None:
        """Block until the health service reports SERVING; RuntimeError (with the log) if it exits first."""
        deadline = time.monotonic() + timeout
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        with open_channel(self.target, options=_FAST_RECONNECT) as channel:  # TLS per $COLM_TLS_CA
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"selector exited with {self.proc.returncode}:\n{self.log()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"selector not SERVING after {timeout:.0f}s:\n{self.log()}")
                try:  # waits for the port within the deadline, so this loop does not spin
                    reply = stub.Check(request, timeout=min(1.0, left), wait_for_ready=True)
                except grpc.RpcError as err:  # not listening yet, or health not set yet
                    if err.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE,
                                          grpc.StatusCode.NOT_FOUND):
                        raise
                    if err.code() == grpc.StatusCode.NOT_FOUND:
                        self._exited_within(min(0.2, left))
                    continue
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                self._exited_within(min(0.2, left))  # NOT_SERVING until its first step is selected

    def _exited_within(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for the process to exit (a pause between two health checks)."""
        try:
            self.proc.wait(seconds)
        except subprocess.TimeoutExpired:
            return False
        return True

    def status(self) -> dict:
        """The selector's Status as a dict (see ``colm_client.status``)."""
        return status(self.target)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait for the exit status; TimeoutError if it has not exited by ``timeout``."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"selector running {timeout:.0f}s after SIGTERM:\n{self.log()}") from None

    def close(self) -> None:
        """Kill the process if it still runs and close the log."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def __enter__(self) -> SelectorProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def trainer_command(nproc: int, args: Sequence[str], max_restarts: int = 0) -> list[str]:
    """The command line of ``colm-train ARGS`` as one process, or under torchrun with ``nproc`` ranks.

    ``max_restarts``: how often torchrun restarts all ranks after one fails (they then resume
    from the latest checkpoint).
    """
    if nproc < 1:
        raise ValueError(f"nproc: must be >= 1, got {nproc}")
    if nproc == 1 and max_restarts == 0:
        return [sys.executable, "-m", "colm_stream.train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "--max-restarts", str(max_restarts), "-m", "colm_stream.train", *args]
