"""Pay on success: the runner that sends a stored request to the upstream once its payment
is held (``gateway.service.on_success.HoldExecutor`` calls it).

The request goes out through the reverse proxy's upstream client (``gateway.web.upstream``)
on a connection of its own, as the proxy sends a request with a body: the stored method,
path and query verbatim, the stored headers (those the proxy forwards) with the paid token's
facts in ``token_header``, ``Connection: close``, and the body with its length. The answer
is read whole, at most ``max_response_bytes``, and kept with the end-to-end headers the proxy
would pass on (the cost and balance headers taken out).
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType

import aiohttp
from aiohttp import hdrs
from yarl import URL

from gateway.ports import StoredRequest, StoredResponse
from gateway.service import PaidToken
from gateway.service.on_success import UNREACHABLE, RunFailed, timed_out
from gateway.web.proxy import CHUNK, NO_BODY, RESPONSE_DROP, end_to_end_headers
from gateway.web.responses import token_header_value
from gateway.web.upstream import LeanPool, request_bytes

__all__ = ["UpstreamRunner"]

log = logging.getLogger(__name__)


class UpstreamRunner:
    """Runs stored pay-on-success requests against ``upstream`` (a ``BackendRunner``), at
    most ``connections`` at once; ``async with UpstreamRunner(...) as runner`` closes what
    is left open at the end of the block."""

    def __init__(
        self,
        upstream: str,
        *,
        token_header: str = "X-L402-Token",  # noqa: S107 - a header name
        connections: int = 32,
    ) -> None:
        self._base = str(URL(upstream.rstrip("/")))
        self._token_header = token_header
        self._token_name = token_header.lower()
        self._pool = LeanPool(self._base, connections, CHUNK, keep_alive=False)

    async def __aenter__(self) -> UpstreamRunner:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._pool.close()

    async def run(
        self,
        request: StoredRequest,
        token: PaidToken,
        *,
        timeout: float,  # noqa: ASYNC109 - the deadline of the whole exchange
        max_response_bytes: int,
    ) -> StoredResponse:
        """The upstream's answer to ``request``; ``RunFailed`` when it gives none within
        ``timeout`` seconds, cannot be reached, or answers more than ``max_response_bytes``."""
        # As ``send`` would forward it, but with the body's length as kept (the client may
        # have sent it as chunks).
        headers: list[tuple[str, str]] = []
        stated = False
        for name, value in request.headers:
            lower = name.lower()
            if lower == self._token_name:
                continue  # the client's own, forged: the runner's goes last, as send's
            if lower == "content-length":
                value, stated = str(len(request.body)), True
            headers.append((name, value))
        headers.append((self._token_header, token_header_value(token)))
        head_only = request.method == hdrs.METH_HEAD
        # A POST without a body still says so (some servers answer 411 without a length).
        if not stated and (request.body or request.method not in (hdrs.METH_GET, hdrs.METH_HEAD)):
            headers.append((hdrs.CONTENT_LENGTH, str(len(request.body))))
        headers.append((hdrs.CONNECTION, "close"))
        try:
            head = request_bytes(request.method, request.target, self._pool.host_header, headers)
        except ValueError:  # a line break, or text that is no header (a row kept elsewhere)
            raise RunFailed("the stored request cannot be sent") from None
        try:
            async with asyncio.timeout(timeout):
                answer = await self._pool.send(head + request.body, timeout, bodiless=head_only)
                try:
                    length = answer.content_length
                    bodiless = head_only or answer.status in NO_BODY  # its length is another's
                    if length is not None and length > max_response_bytes and not bodiless:
                        raise RunFailed(_over(max_response_bytes))
                    body = bytearray()
                    async for chunk in answer.iter_chunks():
                        body += chunk
                        if len(body) > max_response_bytes:
                            raise RunFailed(_over(max_response_bytes))
                    kept = end_to_end_headers(answer.headers, RESPONSE_DROP, from_client=False)
                    return StoredResponse(answer.status, tuple(kept), bytes(body))
                finally:
                    self._pool.release(answer)
        except aiohttp.ClientError as error:  # the upstream client's UpstreamError
            log.warning("held request to %s failed: %s", self._base, error)
            raise RunFailed(UNREACHABLE) from None
        except TimeoutError:
            raise RunFailed(timed_out(timeout)) from None


def _over(limit: int) -> str:
    return f"response over {limit} bytes"
