"""Shared-token authentication: a server interceptor that checks each call's ``authorization`` metadata.

Health checks stay open so load balancers and container health checks need no secret; every other
method, server reflection included, needs ``authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac
import logging
import os
import stat

import grpc

logger = logging.getLogger(__name__)

OPEN_PREFIX = "/grpc.health.v1.Health/"
_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuse calls without the shared token with ``UNAUTHENTICATED``; health checks pass untouched."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("token must not be empty")
        self._expected = f"Bearer {token}".encode()

    def _refusal(self, metadata) -> str | None:
        """Why the call is refused (never quoting the token), or None when it carries the token."""
        sent = [value for key, value in metadata or () if key == "authorization"]
        if not sent:
            return "this selector requires 'authorization: Bearer <token>' metadata"
        value = sent[0].encode() if isinstance(sent[0], str) else sent[0]
        if hmac.compare_digest(value, self._expected):
            return None
        return "the token does not match the selector's"

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_PREFIX):
            return await continuation(handler_call_details)
        reason = self._refusal(handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if reason is None:
            return handler
        logger.warning("refused %s: %s", method, reason)
        return _refuse(handler, reason)


def _refuse(handler: grpc.RpcMethodHandler | None, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that ends the call with UNAUTHENTICATED at once.

    Matching the kind keeps the server from waiting for a request it will not use; an unknown
    method gets a streaming one, so an unauthenticated caller cannot tell it from a known one.
    """

    async def abort(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    kind = (handler.request_streaming, handler.response_streaming) if handler else (True, True)
    return _FACTORIES[kind](abort)


def warn_if_exposed(path: str) -> bool:
    """Warn, as ssh does for a private key, when the token file is open to group or others.

    The file is still used: True when it was warned about.
    """
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return False  # read a moment ago; reading it again reports any error
    if not mode & 0o077:
        return False
    logger.warning("service.auth_token_file: %s has mode %04o, open to group or others on this machine; "
                   "the token is a secret: chmod 600 %s", path, mode, path)
    return True
