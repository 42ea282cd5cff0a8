"""Channels to the selector: TLS when given a CA, the shared token on every call.

Defaults come from the environment, so ranks started by torchrun inherit them:
``COLM_AUTH_TOKEN_FILE`` (a file holding the token) and ``COLM_TLS_CA`` (a CA certificate, PEM).
"""

from __future__ import annotations

import os
from collections import namedtuple
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

TOKEN_FILE_ENV = "COLM_AUTH_TOKEN_FILE"
TLS_CA_ENV = "COLM_TLS_CA"


def read_token(path: str | os.PathLike) -> str:
    """The stripped content of a token file; ValueError when it is unreadable or empty."""
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"token file {str(path)!r}: cannot read it ({type(e).__name__})") from None
    if not token:
        raise ValueError(f"token file {str(path)!r} is empty")
    return token


def resolve_token(token: str | None) -> str:
    """``token`` itself, or when None the token of ``$COLM_AUTH_TOKEN_FILE``; "" means none."""
    if token is not None:
        return token
    path = os.environ.get(TOKEN_FILE_ENV)
    return read_token(path) if path else ""


def resolve_tls_ca(tls_ca: str | os.PathLike | bytes | None) -> bytes:
    """The CA certificate PEM of a path, of PEM bytes, or when None of ``$COLM_TLS_CA``; empty: plaintext."""
    if tls_ca is None:
        tls_ca = os.environ.get(TLS_CA_ENV, "")
    if isinstance(tls_ca, bytes):
        return tls_ca
    if not str(tls_ca):
        return b""
    try:
        return Path(tls_ca).read_bytes()
    except OSError as e:
        raise ValueError(f"TLS CA file {str(tls_ca)!r}: cannot read it ({e.strerror or type(e).__name__})") \
            from None


class _CallDetails(namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                               "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    """A call's details with its metadata replaced."""


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Add ``authorization: Bearer <token>`` to every call, whatever its kind."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def _intercept(self, continuation, details: grpc.ClientCallDetails, request: Any):
        metadata = [*(details.metadata or ()), self._header]
        return continuation(_CallDetails(details.method, details.timeout, metadata, details.credentials,
                                         details.wait_for_ready, details.compression), request)

    intercept_unary_unary = intercept_unary_stream = _intercept
    intercept_stream_unary = intercept_stream_stream = _intercept


def open_channel(target: str, *, token: str | None = None, tls_ca: str | os.PathLike | bytes | None = None,
                 options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A channel to ``target`` ("host:port").

    ``token``: the shared token, sent on every call; None: read from ``$COLM_AUTH_TOKEN_FILE`` if
    set; "": none. ``tls_ca``: the CA certificate (a path or PEM bytes) the selector's certificate
    must chain to, which turns TLS on; None: ``$COLM_TLS_CA`` if set; "": plaintext.
    """
    token, ca = resolve_token(token), resolve_tls_ca(tls_ca)
    if ca:
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca),
                                      options=list(options))
    else:
        channel = grpc.insecure_channel(target, options=list(options))
    return grpc.intercept_channel(channel, BearerToken(token)) if token else channel
