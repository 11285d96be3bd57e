"""The access log of ``l402-gateway serve`` (``[server] access_log``), off by default.

One INFO line per request on the ``gateway.access`` logger: the client, the method, the path
(never the query: it may carry what a client keeps private, say a payer's comment), the
HTTP version, the status, the bytes sent (headers and body) and the time to answer. Cheaper than
aiohttp's own: one format per request, no second timestamp of its own (the log handler's
has it).
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest

ACCESS_LOGGER = logging.getLogger("gateway.access")


class AccessLog(AbstractAccessLogger):
    __slots__ = ()

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        version = request.version
        self.logger.info(
            '%s "%s %s HTTP/%d.%d" %d %d %.1fms',
            request.remote or "-",
            request.method,
            request.rel_url.raw_path,
            version.major,
            version.minor,
            response.status,
            response.body_length,
            time * 1000,
        )
