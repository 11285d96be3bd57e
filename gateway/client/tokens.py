"""What a paid token is and which requests it is sent with; what a pending payment records.

**Scope: which requests a token is sent with.** A token is kept with the *origin*
(``scheme://host[:port]``) and the *path* of the request that bought it. It is offered to a
later request iff that request has the same origin and its path

* matches the token's ``<service>_paths`` caveats (all of them) when the macaroon has any:
  the server said exactly where the token is good; otherwise
* starts with the token's *scope*: the bought path up to and including its last ``/``
  (``/api/premium/fortune`` -> ``/api/premium/``, ``/api/echo`` -> ``/api/``),

and the method is allowed by its ``<service>_methods`` caveats (if any), the token has not
expired by its ``<service>_valid_until`` caveats, and the path is not on the token's refused
list. Several candidates: a token that already worked for exactly this path wins, then the
longest scope (or literal glob prefix), then the newest. The query string plays no part. The
``services=`` caveat names services, not URLs, so it cannot place a URL; a guess that is
wrong costs one round trip, never a payment:

* a 402 for a token at a path it never worked for puts the path on that token's refused list
  (the token stays good for the paths it covers); a 402 where it *had* worked (expired early,
  capability withdrawn), or any 401 (bad or revoked token), drops the token;
* a success records the path among the paths the token worked for;
* a 402 whose challenge tops up the token's own credit account (its macaroon has the token's
  token id) changes nothing: the token is good, its balance ran out. The top-up's token then
  takes its place (:meth:`~gateway.client.cache.TokenCache.store`).

**Pay on success.** A token bought for a pay-on-success offer paid for one request: the
gateway ran that request once and answers the token with its stored response, whatever the
request it comes with (another method or target: 409). So it is offered only to a re-send of
that very request: the same method and path with query (``paid_request``) *and* the same body
(``paid_body_sha256``, the SHA-256 of the body, an absent body counting as an empty one). Such
a re-send collects the stored response without paying again; any other request, e.g. a POST
of another job to the same URL, pays for its own. When the body is not known (a streaming
body the HTTP integration cannot read twice; a token from an older cache file) the token is
offered to no later request at all: that request pays anew. The token is dropped once a
response to it arrived (see :class:`~gateway.client.core.Exchange`): it is kept only while
that response may still be owed, e.g. after a connection lost on the retry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from hashlib import sha256
from urllib.parse import urlsplit

from gateway import l402
from gateway.client.offer import token_valid_until

__all__ = [
    "MAX_PATHS",
    "CachedToken",
    "PendingPayment",
    "body_digest",
    "new_token",
    "request_of",
    "scope_of",
    "split_url",
]

MAX_PATHS = 64  # worked / refused paths kept per token
_DEFAULT_PORTS = {"http": 80, "https": 443}


def split_url(url: str) -> tuple[str, str]:
    """``(origin, path)``: ``http://Host:80/a/b?q`` -> ``("http://host", "/a/b")``."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    if not scheme or not host:
        raise ValueError(f"not an absolute URL: {url!r}")
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in URL: {url!r}") from None
    origin = f"{scheme}://{host}"
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        origin += f":{port}"
    return origin, parts.path or "/"


def scope_of(path: str) -> str:
    """The path up to and including its last ``/``."""
    return path[: path.rfind("/") + 1] or "/"


def request_of(method: str, url: str) -> str:
    """``"POST /jobs?id=1"``: the request a pay-on-success token paid for."""
    _, path = split_url(url)
    query = urlsplit(url).query
    return f"{method.upper()} {path}{'?' + query if query else ''}"


def body_digest(body: bytes | bytearray | memoryview | None) -> str:
    """The hex SHA-256 of a request body, as a pay-on-success token records it; no body
    (None) and an empty one are the same."""
    return sha256(body if body is not None else b"").hexdigest()


def _url_without_query(url: str) -> str:
    origin, path = split_url(url)
    return origin + path


def _caveat_lists(macaroon: l402.Macaroon, suffix: str) -> tuple[tuple[str, ...], ...]:
    lists = []
    for raw in macaroon.caveats:
        try:
            caveat = l402.Caveat.parse(raw)
        except l402.MalformedToken:
            continue
        if caveat.key.endswith(suffix) and len(caveat.key) > len(suffix):
            lists.append(tuple(item for item in caveat.value.split(",") if item))
    return tuple(lists)


@dataclass(frozen=True, slots=True)
class CachedToken:
    """A paid token and where it is (and is not) good."""

    origin: str
    scope: str
    url: str
    scheme: str
    macaroon_b64: str
    payment_hash: bytes
    amount_msat: int
    created_at: float
    preimage: bytes = field(repr=False)
    worked: tuple[str, ...] = ()
    refused: tuple[str, ...] = ()
    # Pay on success: the one request the token is good for (request_of); None: any in scope.
    paid_request: str | None = None
    # Pay on success: that request's body_digest; None: not known, so it fits no request.
    paid_body_sha256: str | None = None
    # Derived from the macaroon: its identifier's token id (a credit account's tokens share
    # it) and its caveats.
    token_id: bytes = field(init=False, repr=False)
    valid_until: int | None = field(init=False)
    path_globs: tuple[tuple[str, ...], ...] = field(init=False)
    methods: tuple[tuple[str, ...], ...] = field(init=False)

    def __post_init__(self) -> None:
        macaroon = l402.decode_b64(self.macaroon_b64)  # MalformedToken if it is not one
        token_id = l402.Identifier.decode(macaroon.identifier).token_id
        object.__setattr__(self, "token_id", token_id)
        object.__setattr__(self, "valid_until", token_valid_until(macaroon))
        object.__setattr__(self, "path_globs", _caveat_lists(macaroon, "_paths"))
        methods = tuple(tuple(m.upper() for m in ms) for ms in _caveat_lists(macaroon, "_methods"))
        object.__setattr__(self, "methods", methods)

    @property
    def authorization(self) -> str:
        """The ``Authorization`` header value that presents this token."""
        return f"{self.scheme} {self.macaroon_b64}:{self.preimage.hex()}"

    def expired(self, now: float) -> bool:
        return self.valid_until is not None and now >= self.valid_until

    def fit(
        self,
        path: str,
        method: str,
        request: str | None = None,
        body_sha256: str | None = None,
    ) -> tuple[int, int] | None:
        """How well the token fits the request; None if it does not apply. ``request`` (its
        :func:`request_of`) and ``body_sha256`` (its :func:`body_digest`; None: not known)
        must both match a pay-on-success token's."""
        if path in self.refused:
            return None
        if self.paid_request is not None:
            same = (
                request == self.paid_request
                and body_sha256 is not None
                and body_sha256 == self.paid_body_sha256
            )
            return (2, len(path)) if same else None
        if not all(method.upper() in allowed for allowed in self.methods):
            return None
        if self.path_globs:
            if not all(any(fnmatchcase(path, g) for g in globs) for globs in self.path_globs):
                return None
            literal = max(len(g.split("*", 1)[0]) for globs in self.path_globs for g in globs)
            fit = (1, literal)
        elif path.startswith(self.scope):
            fit = (1, len(self.scope))
        else:
            return None
        return (2, len(path)) if path in self.worked else fit


@dataclass(frozen=True, slots=True)
class PendingPayment:
    """A payment about to start (or started): enough to finish the token if it went through."""

    origin: str
    scope: str
    url: str
    method: str
    scheme: str
    macaroon_b64: str
    invoice: str
    payment_hash: bytes
    amount_msat: int
    destination: str
    description: str
    created_at: float
    paid_request: str | None = None  # pay on success: the one request it pays for
    paid_body_sha256: str | None = None  # and that request's body_digest (None: not known)

    def covers(self, url: str, method: str | None = None, body_sha256: str | None = None) -> bool:
        """Whether a token bought by this payment might be offered for ``url`` (``method``
        and ``body_sha256`` given: for that very request, as :meth:`CachedToken.fit` says)."""
        origin, path = split_url(url)
        if self.paid_request is not None:
            if method is not None:
                return (
                    origin == self.origin
                    and request_of(method, url) == self.paid_request
                    and body_sha256 is not None
                    and body_sha256 == self.paid_body_sha256
                )
            _, _, target = self.paid_request.partition(" ")
            return origin == self.origin and target.partition("?")[0] == path
        return origin == self.origin and path.startswith(self.scope)


def new_token(
    url: str,
    scheme: str,
    macaroon_b64: str,
    preimage: bytes,
    amount_msat: int,
    now: float,
    paid_request: str | None = None,
    paid_body_sha256: str | None = None,
) -> CachedToken:
    """A token bought at ``url``, scoped as the module docstring says (``paid_request`` and
    ``paid_body_sha256``: a pay-on-success token's one request)."""
    origin, path = split_url(url)
    macaroon = l402.decode_b64(macaroon_b64)
    payment_hash = l402.Identifier.decode(macaroon.identifier).payment_hash
    return CachedToken(
        origin=origin,
        scope=scope_of(path),
        url=_url_without_query(url),
        scheme=scheme,
        macaroon_b64=macaroon_b64,
        payment_hash=payment_hash,
        amount_msat=amount_msat,
        created_at=now,
        preimage=preimage,
        paid_request=paid_request,
        paid_body_sha256=paid_body_sha256,
    )
