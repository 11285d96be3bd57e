"""Checks of single config values: ranges, limits, and the parsers of the structured ones.

``require`` and the limits serve the section dataclasses' ``__post_init__``; ``listen_address``
and ``store_location`` are also what ``serve`` and ``gateway.store.open_store`` parse those
values with, so that a value the config accepted is read the same way where it is used.
"""

from __future__ import annotations

import math
import re
import urllib.parse


def display_text(text: str, limit: int) -> bool:
    """Text for a page: at most ``limit`` characters, no control characters."""
    return len(text) <= limit and text.isprintable()


def require(ok: bool, key: str, requirement: str, value: object) -> None:
    """Range checks of the config dataclasses; ``load_config`` turns the ValueError into
    ConfigError."""
    if not ok:
        raise ValueError(f"{key} must be {requirement}, got {value!r}")


def positive(number: float) -> bool:
    return math.isfinite(number) and number > 0


# Upper limits. LND's AddInvoice refuses an expiry over one year (and an amount over
# MAX_PRICE_MSAT; lnrpc/invoicesrpc/addinvoice.go, LND 0.21): better said at start-up than
# per request.
MAX_INVOICE_EXPIRY = 365 * 24 * 3600
# Ten years is as good as forever for a token, and keeps valid_until a sane timestamp.
MAX_LIFETIME = 10 * 365 * 24 * 3600
# The root key cache is how late a revocation reaches other processes.
MAX_ROOT_KEY_CACHE_SECONDS = 3600.0
# One challenge a day per client up to a million a second: a slower refill makes the
# Retry-After wait overflow, and a burst must fit in a float.
MIN_CHALLENGES_PER_SECOND = 1 / 86400
MAX_CHALLENGES_PER_SECOND = 1_000_000.0
MAX_BURST = 1_000_000
# A credit reservation outlives any request (a day is past every proxy timeout), and the
# withdrawal endpoint answers within a few minutes (clients and proxies time out).
MAX_RESERVATION_SECONDS = 86_400.0
MAX_WITHDRAWAL_WAIT_SECONDS = 300.0
# The invoice sweeper's period: not a busy loop, and at least daily.
MIN_SWEEP_INTERVAL = 0.01
MAX_SWEEP_INTERVAL = 86_400.0
# Leadership among instances on PostgreSQL: how often a follower tries the lock and the
# leader checks its connection. Not a busy loop; a minute at most, or a dead leader's tasks
# wait that long for another.
MIN_LEADER_SECONDS = 0.05
MAX_LEADER_SECONDS = 60.0
# Connections a process keeps to PostgreSQL at most (its pool).
MAX_POOL_SIZE = 100
# Pay-on-success (``[hold]``). A held HTLC ties up the payer's funds: its hold invoice's
# final CLTV delta is 18 blocks (LND's least) to two weeks of blocks. LND cancels a held HTLC
# HOLD_CANCEL_MARGIN blocks before it expires, and blocks can come a minute apart: the
# backend's time plus a minute must fit in what is left, counted in minutes.
MIN_CLTV_EXPIRY = 18
MAX_CLTV_EXPIRY = 2016
HOLD_CANCEL_MARGIN = 12
# An unpaid hold invoice is payable at least a few seconds, at most an hour; a stored
# request or response is at most 16 and 64 MiB (each one is a row of the store), and a
# response is kept at most a week.
MIN_HOLD_INVOICE_EXPIRY = 10
MAX_HOLD_INVOICE_EXPIRY = 3600
MAX_HOLD_OUTSTANDING = 10_000
MAX_HELD_REQUEST_BYTES = 16 * 1024 * 1024
MAX_HELD_RESPONSE_BYTES = 64 * 1024 * 1024
MIN_RESPONSE_RETENTION = 60
MAX_RESPONSE_RETENTION = 7 * 86_400

# RFC 9110 tchar, less "_": CGI-style backends read "_" and "-" alike, so a client's
# X-L402-Token would reach them as the X_L402_Token the gateway sets.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^`|~0-9A-Za-z]+")
# Headers that frame, route or authenticate a request, or that a browser sets: the proxy
# would overwrite or drop the client's own (token_header replaces it), changing the request.
_RESERVED_HEADERS = frozenset(
    {
        "authorization",
        "connection",
        "cookie",
        "date",
        "expect",
        "forwarded",
        "host",
        "keep-alive",
        "max-forwards",
        "origin",
        "range",
        "referer",
        "set-cookie",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "via",
        "www-authenticate",
        "x-client-ip",
        "x-http-method",
        "x-http-method-override",
        "x-method-override",
        "x-original-url",
        "x-real-ip",
        "x-rewrite-url",
        "true-client-ip",
    }
)
_RESERVED_HEADER_PREFIXES = ("accept", "content-", "if-", "proxy-", "sec-", "x-forwarded-")


def check_token_header(name: str) -> None:
    if not _HEADER_NAME.fullmatch(name):
        raise ValueError(
            f"token_header must be a header name (letters, digits, '-' and the other RFC 9110 "
            f"token characters; no '_'), got {name!r}"
        )
    lowered = name.lower()
    if lowered in _RESERVED_HEADERS or lowered.startswith(_RESERVED_HEADER_PREFIXES):
        raise ValueError(
            f"token_header must be a header of its own, not {name!r}, which frames, routes "
            "or authenticates requests (e.g. X-L402-Token)"
        )


_LISTEN_HOST = re.compile(r"[A-Za-z0-9._-]+")
_LISTEN_HOST_V6 = re.compile(r"[0-9A-Fa-f:.]+(%[A-Za-z0-9_.-]+)?")


def listen_address(listen: str) -> tuple[str, int]:
    """``[server] listen`` (``host:port``, ``[v6 address]:port``) as the host and port to bind.

    ``ValueError`` if it is not one.
    """
    host, colon, port = listen.rpartition(":")
    if not colon or not (port.isascii() and port.isdigit()):
        raise ValueError(f"listen must be host:port (e.g. 127.0.0.1:8402), got {listen!r}")
    if not host:
        raise ValueError(
            f"listen must be host:port with a host (0.0.0.0 for every IPv4 interface), "
            f"got {listen!r}"
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        valid = _LISTEN_HOST_V6.fullmatch(host) is not None and ":" in host
    else:
        valid = _LISTEN_HOST.fullmatch(host) is not None
    if not valid:
        raise ValueError(
            f"listen must be host:port, an IPv6 address in brackets ([::1]:8402), got {listen!r}"
        )
    number = int(port)
    if number > 65535:
        raise ValueError(f"listen port must be 0 to 65535, got {listen!r}")
    return host, number


def check_upstream(url: str) -> None:
    if any(char.isspace() or not char.isprintable() for char in url):
        raise ValueError(f"upstream must not contain blanks or control characters, got {url!r}")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"upstream must be an http:// or https:// URL with a host, got {url!r}")
    try:
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        raise ValueError(f"upstream has an invalid port: {url!r}") from None
    if "@" in parts.netloc:
        # Not shown: the URL is logged, and these are credentials.
        raise ValueError(
            "upstream must not contain credentials (user:password@host): they would be logged "
            "and sent with every request; protect the backend by its network address instead"
        )
    if "?" in url or "#" in url:
        raise ValueError(
            f"upstream must not have a query or fragment (request paths are appended), got {url!r}"
        )


def check_lnd_host(host: str) -> None:
    """``[lnd] host``: the gRPC ``host:port``. A URL (``https://``) or a path would reach gRPC
    as a name to resolve and fail on every call, not at start-up."""
    hint = "host:port of LND's gRPC interface (e.g. 127.0.0.1:10009), no scheme or path"
    if "://" in host or "/" in host:
        raise ValueError(f"host must be {hint}, got {host!r}")
    try:
        _, port = listen_address(host)
    except ValueError:
        raise ValueError(f"host must be {hint}, got {host!r}") from None
    if port == 0:
        raise ValueError(f"host must name a port (1 to 65535), got {host!r}")


# The supported store URLs; anything else is refused at load, not when the store opens.
SUPPORTED_STORE_URLS = (
    "memory:, sqlite:///absolute/path.db, sqlite:relative/path.db or "
    "postgresql://user@host:port/database"
)


def store_location(url: str) -> tuple[str, str | None]:
    """``("memory", None)``, ``("sqlite", path)`` or ``("postgresql", url)`` for a store URL;
    ``ValueError`` if it is not one of ``SUPPORTED_STORE_URLS`` (see ``gateway.store``)."""
    if not url.strip():
        raise ValueError(f"url must name a store: {SUPPORTED_STORE_URLS}")
    scheme, colon, rest = url.partition(":")
    scheme = scheme.lower()
    if not colon:
        raise ValueError(f"url {url!r} has no scheme; supported: {SUPPORTED_STORE_URLS}")
    if scheme == "memory":
        if rest:
            raise ValueError(f"url {url!r}: 'memory:' takes nothing after the colon")
        return "memory", None
    if scheme == "sqlite":
        if rest.startswith("//"):
            if not rest.startswith("///") or rest == "///":
                raise ValueError(
                    f"url {url!r}: use sqlite:///absolute/path.db or sqlite:relative/path.db"
                )
            rest = rest[2:]  # keep the third slash: it starts the absolute path
        if not rest:
            raise ValueError(f"url {url!r} names no file; supported: {SUPPORTED_STORE_URLS}")
        if "\x00" in rest:
            raise ValueError("url: a path must not contain NUL")
        return "sqlite", rest
    if scheme in ("postgres", "postgresql"):
        # Never shown: the rest may hold a password.
        if not rest.startswith("//") or "\x00" in rest:
            raise ValueError(
                f"url {scheme}:...: use postgresql://user@host:port/database; supported: "
                f"{SUPPORTED_STORE_URLS}"
            )
        problem = postgres_url_problem(url)
        if problem is not None:
            raise ValueError(f"url {scheme}://...: {problem}; {POSTGRES_URL_HINT}")
        return "postgresql", url
    # Only the scheme is shown: the rest of a database URL may hold a password.
    raise ValueError(f"url scheme {scheme!r} is not supported; supported: {SUPPORTED_STORE_URLS}")


POSTGRES_URL_HINT = (
    "percent-encode special characters in the password, or leave it out and use "
    "PGPASSWORD / ~/.pgpass"
)


def postgres_url_problem(url: str) -> str | None:
    """What makes ``url`` (``postgresql://...``) one the driver would misread, or None.

    A password with an unencoded ``/``, ``?``, ``#`` or ``@`` moves part of it into the host,
    port, path, query or fragment: the driver would then fail with the password in its message,
    or connect somewhere else, and a display of the URL would show it. The text returned never
    quotes the URL.
    """
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # an unbalanced "[" or "]"
        return "it is not a valid URL"
    if "#" in url:
        return "it has a '#'"
    # A spilled password leaves the host part without its "@": only then is one further on
    # suspect (a query value may hold one, say a credential path of a systemd template unit).
    spilled = "@" not in parts.netloc and "@" in parts.path + parts.query
    if parts.netloc.count("@") > 1 or spilled:
        return "it has an '@' that does not end the user part"
    hosts = parts.netloc.rpartition("@")[2]
    # asyncpg also takes a comma-separated list of hosts, each with a port of its own.
    for host in hosts.split(","):
        try:
            urllib.parse.urlsplit(f"//{host}").port  # noqa: B018 - it raises if not a port
        except ValueError:
            return "its port is not a number from 0 to 65535"
    # No host is fine: the driver takes PGHOST, or the local socket, as libpq does.
    return None
