"""Pay on success: the runner that sends a stored request to the upstream once its payment
is held (``gateway.service.on_success.HoldExecutor`` calls it).

The request goes out as the reverse proxy would have sent it (``gateway.web.proxy``): the
stored method, path and query verbatim, the stored headers (those the proxy forwards) with
the paid token's facts in ``token_header``, no cookie jar, no automatic headers and no
decompression. The answer is read whole, at most ``max_response_bytes``, and kept with the
end-to-end headers the proxy would pass on (the cost and balance headers taken out).
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType

import aiohttp
from aiohttp import hdrs
from multidict import CIMultiDict
from yarl import URL

from gateway.ports import StoredRequest, StoredResponse
from gateway.service import PaidToken
from gateway.service.on_success import UNREACHABLE, RunFailed, timed_out
from gateway.web.proxy import RESPONSE_DROP, end_to_end_headers
from gateway.web.responses import token_header_value

__all__ = ["UpstreamRunner"]

log = logging.getLogger(__name__)

# A connection to the upstream not made within this many seconds: the backend is unreachable.
CONNECT_TIMEOUT = 10.0


class UpstreamRunner:
    """Runs stored pay-on-success requests against ``upstream`` (a ``BackendRunner``).

    ``async with UpstreamRunner(...) as runner``: its connection pool, of at most
    ``connections`` connections, lives as long as the block.
    """

    def __init__(
        self,
        upstream: str,
        *,
        token_header: str = "X-L402-Token",  # noqa: S107 - a header name
        connections: int = 32,
    ) -> None:
        self._base = str(URL(upstream.rstrip("/")))
        self._token_header = token_header
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> UpstreamRunner:
        # Each run has its own deadline (asyncio.timeout); the session adds the connect limit.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT)
        self._session = _upstream_session(self._connections, timeout)
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

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
        if self._session is None:
            raise RuntimeError("UpstreamRunner is not open: use it with 'async with'")
        headers = CIMultiDict(request.headers)
        headers[self._token_header] = token_header_value(token)
        try:
            async with (
                asyncio.timeout(timeout),
                self._session.request(
                    request.method,
                    # Verbatim: the path the rules were matched on, not a re-normalized one.
                    URL(self._base + request.target, encoded=True),
                    headers=headers,
                    data=request.body or None,
                    allow_redirects=False,
                ) as response,
            ):
                length = response.content_length
                if length is not None and length > max_response_bytes:
                    raise RunFailed(_over(max_response_bytes))
                body = bytearray()
                while len(body) <= max_response_bytes:
                    chunk = await response.content.read(max_response_bytes + 1 - len(body))
                    if not chunk:
                        break
                    body += chunk
                if len(body) > max_response_bytes:
                    raise RunFailed(_over(max_response_bytes))
                return StoredResponse(
                    status=response.status,
                    headers=tuple(
                        end_to_end_headers(response.headers, RESPONSE_DROP, keep_underscored=True)
                    ),
                    body=bytes(body),
                )
        except aiohttp.ClientError as error:
            # Checked first: aiohttp's connect timeout is a TimeoutError too, and it means the
            # backend could not be reached, not that it was slow.
            log.warning("held request to %s failed: %s", self._base, error)
            raise RunFailed(UNREACHABLE) from None
        except TimeoutError:
            raise RunFailed(timed_out(timeout)) from None


def _upstream_session(limit: int, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientSession:
    """A client session to the upstream that sends requests as the client made them, each on
    a connection of its own (``Connection: close``).

    Never a kept-alive connection, as the proxy's requests with a body
    (``gateway.web.upstream``): an upstream that leaves a request's body unread (a route that
    expects none) reads it as a request of its own; and aiohttp's pool hands what arrives on
    an idle connection (that request's answer) to the next request sent on it."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, force_close=True),
        timeout=timeout,
        auto_decompress=False,
        # One session serves every client: a cookie jar would hand one client's upstream
        # session cookie to all the others.
        cookie_jar=aiohttp.DummyCookieJar(),
        # Forward the client's headers, not aiohttp's defaults (an Accept-Encoding the
        # client never sent would get it a compressed body it cannot read).
        skip_auto_headers=(
            hdrs.ACCEPT,
            hdrs.ACCEPT_ENCODING,
            hdrs.USER_AGENT,
            hdrs.CONTENT_TYPE,
        ),
    )


def _over(limit: int) -> str:
    return f"response over {limit} bytes"
