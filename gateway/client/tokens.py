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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from urllib.parse import urlsplit

from gateway import l402
from gateway.client.offer import token_valid_until

__all__ = [
    "MAX_PATHS",
    "CachedToken",
    "PendingPayment",
    "new_token",
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

    def fit(self, path: str, method: str) -> tuple[int, int] | None:
        """How well the token fits the request; None if it does not apply."""
        if path in self.refused:
            return None
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

    def covers(self, url: str) -> bool:
        """Whether a token bought by this payment would be offered for ``url``."""
        origin, path = split_url(url)
        return origin == self.origin and path.startswith(self.scope)


def new_token(
    url: str, scheme: str, macaroon_b64: str, preimage: bytes, amount_msat: int, now: float
) -> CachedToken:
    """A token bought at ``url``, scoped as the module docstring says."""
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
    )
