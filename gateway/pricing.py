"""Route rules: which requests cost how much, for how long a token lasts, and what it grants.

Pure: no I/O. Rules are tried in order and the first whose pattern and method match decides.
A path no rule matches is not priced (add a catch-all ``/*`` rule to price everything), or,
with ``unmatched=Unmatched.DENY``, refused with a 404.
Patterns are shell-style globs on the URL path (``fnmatch``; ``*`` also crosses ``/``).
Methods compare case-insensitively; a rule for ``GET`` also covers ``HEAD``, which web
frameworks answer with the GET handler.

``Pricing.resolve`` prices a request as an unknown backend could read it: a path a backend
may resolve differently from the rules (a backslash, ``;`` parameters, ``%`` left after
decoding, control characters, a non-NFKC form, dot segments) is refused; of the readings a
backend may take (the other letter case, with or without a trailing slash, without the last
segment's extension, what follows a script's name, a method override), the strictest
decides: any priced reading prices the request, and two different priced readings are
refused. ``Pricing.body_may_reprice`` tells an adapter when a POST's body must be read for an
override (``_method``) before the request can be priced.
"""

from __future__ import annotations

import enum
import fnmatch
import functools
import re
import unicodedata
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from gateway.ports import Msat, Split
from gateway.splits import split_problem

# What the caveats can carry: an HTTP token for methods, no blank or comma in a capability.
_METHOD_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CAPABILITY_RE = re.compile(r"[^\s,]+")
# The most LND puts in an invoice: 100,000 BTC (lnrpc/invoicesrpc/addinvoice.go).
MAX_PRICE_MSAT = 100_000 * 100_000_000 * 1000
# Paths of these characters only need no more than the segment checks.
# More in one path is refused: a front controller's script comes once, maybe twice.
MAX_SCRIPT_SEGMENTS = 4
_PLAIN_PATH = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,=:@/]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# The methods frameworks take as an override (Rack's list, less WebDAV's); Symfony and
# Express take any name.
OVERRIDE_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
# Request lines whose body's repricing is remembered (it costs a resolve per method).
_REPRICE_CACHE = 4096
_REPRICE_PATH_LIMIT = 512
# A segment naming a script a web server runs with the rest of the path as its PATH_INFO.
_SCRIPT_SEGMENT = re.compile(
    r"/[^/]*\.(?:php\d?|phtml|phar|cgi|fcgi|pl|asp|aspx|ashx|asmx|dll|exe)(?=/)", re.IGNORECASE
)


class PathCase(enum.Enum):
    """How the backend compares letter case in paths."""

    ANY = "any"  # unknown: price the strictest of both readings
    SENSITIVE = "sensitive"
    INSENSITIVE = "insensitive"


class TrailingSlash(enum.Enum):
    """Whether the backend tells ``/a`` and ``/a/`` apart."""

    ANY = "any"  # unknown: price the strictest of both readings
    SIGNIFICANT = "significant"


class Extension(enum.Enum):
    """Whether the backend tells ``/a`` and ``/a.json`` apart (Rails' ``(.:format)`` and
    Spring's suffix patterns route both to ``/a``)."""

    ANY = "any"  # unknown: price the strictest of both readings
    SIGNIFICANT = "significant"


class ScriptPrefix(enum.Enum):
    """Whether the backend routes ``/index.php/a`` as ``/a``: a web server hands a path
    through a script (PHP, CGI, ASP.NET) on to it, and a front controller (Laravel,
    Symfony, CodeIgniter) routes by what follows the script's name."""

    ANY = "any"  # unknown: price the strictest of both readings
    SIGNIFICANT = "significant"


class BodyMethod(enum.Enum):
    """Whether the backend takes a POST's method override from its body (``_method``)."""

    ANY = "any"  # unknown: such a POST is priced by the method its body names as well
    IGNORED = "ignored"


class Unmatched(enum.Enum):
    """What a request no rule matches gets."""

    FREE = "free"  # passed on without payment
    DENY = "deny"  # refused: a typo in a pattern must not serve a paid resource for free


@dataclass(frozen=True, slots=True)
class Refused:
    """A request the rules cannot price unambiguously (HTTP 400), or that none of them
    matches under ``Unmatched.DENY`` (404)."""

    reason: str
    status: int = 400


NO_ROUTE = Refused("no route matches this path", 404)


@dataclass(frozen=True, slots=True)
class PriceRequest:
    """What a dynamic price function may look at."""

    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]


# A dynamic price: called once per challenge, returns the amount in millisatoshis.
PriceFunction = Callable[[PriceRequest], Awaitable[int]]


@dataclass(frozen=True, slots=True)
class CreditTerms:
    """A route billed from a prepaid balance: each request is charged its price (or, when
    ``metered``, the cost the backend reports, at most the price) from the token's account.

    A challenge's invoice buys ``amount_msat`` of credit, or what the client asks for within
    ``min_msat`` to ``max_msat``.
    """

    amount_msat: Msat
    min_msat: Msat
    max_msat: Msat
    metered: bool = False
    charge_failures: bool = False  # a 5xx or an unreachable backend is charged too

    def __post_init__(self) -> None:
        if not 0 < self.min_msat <= self.amount_msat <= self.max_msat <= MAX_PRICE_MSAT:
            raise ValueError(
                f"credit amounts must satisfy 0 < min ({self.min_msat}) <= amount "
                f"({self.amount_msat}) <= max ({self.max_msat}) <= {MAX_PRICE_MSAT}"
            )


@dataclass(frozen=True, slots=True)
class Rule:
    """A priced (or explicitly free) set of routes.

    ``price_msat`` None with no ``price_function`` makes the route free.
    """

    pattern: str
    methods: frozenset[str] = frozenset()  # empty: every method
    price_msat: Msat | None = None
    price_function: PriceFunction | None = field(default=None, compare=False)
    lifetime: int = 3600  # seconds a token stays valid after it is minted
    service: str = "api"
    tier: int = 0
    capabilities: frozenset[str] = frozenset()
    # What the paywall page says the payment buys.
    title: str = ""
    description: str = ""
    credit: CreditTerms | None = None  # None: a token is bought per price and lifetime
    # Pay on success: the payment is held while the request runs once, and settled only if
    # the backend answers a success (any 2xx, or one of ``settle_statuses`` when given).
    settle_on_success: bool = False
    settle_statuses: frozenset[int] = frozenset()
    # Revenue split: each payment's shares for other payees (``gateway.splits.allocate``),
    # credited to the ledger when the invoice settles or, on a credit route, when a request
    # is charged; () keeps all of it.
    split: Split = ()
    _compiled: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _folded: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.price_msat is not None and not 0 < self.price_msat <= MAX_PRICE_MSAT:
            raise ValueError(f"route {self.pattern!r}: price_msat must be 1 to {MAX_PRICE_MSAT}")
        if self.price_msat is not None and self.price_function is not None:
            raise ValueError(f"route {self.pattern!r}: give a fixed price or a function, not both")
        if self.lifetime <= 0:
            raise ValueError(f"route {self.pattern!r}: lifetime must be positive")
        if not self.service or not re.fullmatch(r"[A-Za-z0-9_.-]+", self.service):
            raise ValueError(f"route {self.pattern!r}: service must be [A-Za-z0-9_.-]+")
        if not self.pattern.startswith("/"):
            raise ValueError(f"route {self.pattern!r}: pattern must start with '/'")
        if self.tier < 0:
            raise ValueError(f"route {self.pattern!r}: tier must not be negative")
        if self.credit is not None and self.free:
            raise ValueError(f"route {self.pattern!r}: a credit route needs a price")
        if self.settle_on_success and self.credit is not None:
            raise ValueError(
                f"route {self.pattern!r}: settle on success cannot be combined with credit"
            )
        if self.settle_on_success and self.free:
            raise ValueError(f"route {self.pattern!r}: settle on success needs a price")
        if self.settle_statuses and not self.settle_on_success:
            raise ValueError(f"route {self.pattern!r}: settle_statuses need settle on success")
        for status in self.settle_statuses:
            if not 200 <= status <= 499:
                raise ValueError(
                    f"route {self.pattern!r}: settle status {status} must be 200 to 499"
                )
        if self.split and self.free:
            raise ValueError(f"route {self.pattern!r}: a split needs a price")
        problem = split_problem(self.split)
        if problem is not None:
            raise ValueError(f"route {self.pattern!r}: split: {problem}")
        for capability in self.capabilities:
            if not _CAPABILITY_RE.fullmatch(capability) or not capability.isprintable():
                raise ValueError(
                    f"route {self.pattern!r}: capability {capability!r} must be printable, "
                    "without blanks or commas"
                )
        for method in self.methods:
            if not _METHOD_RE.fullmatch(method):
                raise ValueError(f"route {self.pattern!r}: invalid method {method!r}")
        object.__setattr__(self, "methods", frozenset(m.upper() for m in self.methods))
        translated = fnmatch.translate(self.pattern)
        object.__setattr__(self, "_compiled", re.compile(translated))
        object.__setattr__(self, "_folded", re.compile(translated, re.IGNORECASE))

    @property
    def free(self) -> bool:
        return self.price_msat is None and self.price_function is None

    def settles(self, status: int) -> bool:
        """Whether a pay-on-success request answered with ``status`` is paid for."""
        if self.settle_statuses:
            return status in self.settle_statuses
        return 200 <= status < 300

    def matches(self, method: str, path: str, *, fold_case: bool = False) -> bool:
        if self.methods:
            method = method.upper()
            if method not in self.methods and not (method == "HEAD" and "GET" in self.methods):
                return False
        return (self._folded if fold_case else self._compiled).match(path) is not None


class Pricing:
    """An ordered list of rules, and what the backend is known to read alike."""

    def __init__(
        self,
        rules: Sequence[Rule],
        *,
        case: PathCase = PathCase.ANY,
        trailing_slash: TrailingSlash = TrailingSlash.ANY,
        unmatched: Unmatched = Unmatched.FREE,
        body_method: BodyMethod = BodyMethod.ANY,
        extension: Extension = Extension.ANY,
        script_prefix: ScriptPrefix = ScriptPrefix.ANY,
    ) -> None:
        self.rules = tuple(rules)
        self.unmatched = unmatched
        self.body_method = body_method
        self._reprices = functools.lru_cache(maxsize=_REPRICE_CACHE)(self._body_reprices)
        # What an override may name that matters here: the usual ones and the rules' own.
        self.override_methods = tuple(
            dict.fromkeys([*OVERRIDE_METHODS, *(m for rule in self.rules for m in rule.methods)])
        )
        self._case_readings = {
            PathCase.ANY: (False, True),
            PathCase.SENSITIVE: (False,),
            PathCase.INSENSITIVE: (True,),
        }[case]
        self._slash_readings = trailing_slash is TrailingSlash.ANY
        self._extension_readings = extension is Extension.ANY
        self._script_readings = script_prefix is ScriptPrefix.ANY
        # HEAD reads as GET (Rule.matches).
        self._named_methods = frozenset(
            {"GET", "HEAD", *(m for rule in self.rules for m in rule.methods)}
        )

    @property
    def bills_credit(self) -> bool:
        """Whether some rule charges a token's credit per request."""
        return any(rule.credit is not None for rule in self.rules)

    @property
    def settles_on_success(self) -> bool:
        """Whether some rule holds its payments until the request succeeded."""
        return any(rule.settle_on_success for rule in self.rules)

    def match(self, method: str, path: str, *, fold_case: bool = False) -> Rule | None:
        """The first rule for exactly this method and path."""
        for rule in self.rules:
            if rule.matches(method, path, fold_case=fold_case):
                return rule
        return None

    def resolve(
        self, method: str, path: str, method_overrides: Sequence[str] = ()
    ) -> Rule | Refused | None:
        """The priced rule for a request as any backend could read it (module docstring);
        None when every reading is free."""
        refusal = path_refusal(path)
        if refusal is not None:
            return Refused(refusal)
        scripts = self._script_readings and "." in path
        if scripts and len(_SCRIPT_SEGMENT.findall(path)) > MAX_SCRIPT_SEGMENTS:
            # Each is a reading of its own, priced against every rule: bounded work.
            return Refused(f"path names more than {MAX_SCRIPT_SEGMENTS} scripts (.php, .cgi, ...)")
        methods = self._reading_methods(method, method_overrides)
        paths = self._path_readings(path)
        priced: Rule | None = None
        matched = False
        for reading_method in methods:
            for reading_path in paths:
                for fold_case in self._case_readings:
                    rule = self.match(reading_method, reading_path, fold_case=fold_case)
                    matched = matched or rule is not None
                    if rule is None or rule.free or rule is priced:
                        continue
                    if priced is not None:
                        return Refused("path and method read as several priced routes")
                    priced = rule
        if not matched and self.unmatched is Unmatched.DENY:
            return NO_ROUTE
        return priced

    def _reading_methods(self, method: str, method_overrides: Sequence[str]) -> list[str]:
        """The request's method and those of its overrides that may price it otherwise. A
        method no rule names matches exactly the rules any method does, so one of them stands
        for all: a client may name thousands (``X-HTTP-Method-Override: A,B,...``), each of
        which would be priced against every reading and rule."""
        if not method_overrides:
            return [method]
        seen = {method.upper()}
        methods = [method]
        unnamed_seen = method.upper() not in self._named_methods
        for override in method_overrides:
            upper = override.upper()
            if upper in seen:
                continue
            if upper not in self._named_methods:
                if unnamed_seen:
                    continue
                unnamed_seen = True
            seen.add(upper)
            methods.append(override)
        return methods

    def mounted_path(
        self, method: str, path: str, root_path: str, method_overrides: Sequence[str] = ()
    ) -> str | Refused:
        """Which reading of an ASGI request's ``path`` to price when the application is
        mounted at ``root_path``: the path as received, the route path Starlette and Django
        route by (without ``root_path``; ``FastAPI(root_path=...)`` also serves a path that
        lacks it), the mounted path (``root_path`` and the route path), or the route path
        Litestar and Quart route by (what follows ``root_path``'s first occurrence anywhere:
        ``/apipaid`` under ``/api`` is their ``/paid``). A priced reading wins over a free
        one, a free one over an unmatched one; readings priced apart are refused."""
        root = root_path.rstrip("/")
        if not root:
            return path
        route = path[len(root) :] if path.startswith(root + "/") else path
        readings: tuple[str, ...] = (path,) if path == root else (path, route, root + route)
        if root in path:
            readings += ("/" + path.split(root, 1)[1].lstrip("/"),)
        chosen: tuple[int, str, Rule | None] = (-1, path, None)
        for reading in dict.fromkeys(readings):
            rule = self.resolve(method, reading, method_overrides)
            if isinstance(rule, Refused) and rule is not NO_ROUTE:
                return rule
            priced = rule if isinstance(rule, Rule) else None
            if priced is not None and chosen[2] not in (None, priced):
                return Refused("path reads as several priced routes under the root path")
            rank = 2 if priced is not None else 1 if rule is None else 0
            if rank > chosen[0]:
                chosen = (rank, reading, priced)
        return chosen[1]

    def _path_readings(self, path: str) -> tuple[str, ...]:
        readings = [path]
        if self._script_readings and "." in path:
            readings += [path[match.end() :] for match in _SCRIPT_SEGMENT.finditer(path)]
        if self._slash_readings and path != "/":
            readings.append(_other_slash(path))
        if self._extension_readings:
            for stem in [stem for reading in readings for stem in _without_extension(reading)]:
                readings.append(stem)
                if self._slash_readings:
                    readings.append(_other_slash(stem))
        return tuple(dict.fromkeys(readings))

    def body_may_reprice(self, method: str, path: str) -> bool:
        """Whether a body naming another method could change how this request is priced:
        frameworks take an override from a POST's body only."""
        if self.body_method is BodyMethod.IGNORED or method.upper() != "POST":
            return False
        # A client picks the path: only short ones are remembered, as the free lines are.
        return (
            self._reprices(path) if len(path) <= _REPRICE_PATH_LIMIT else self._body_reprices(path)
        )

    def _body_reprices(self, path: str) -> bool:
        return self.resolve("POST", path, self.override_methods) != self.resolve("POST", path)


def _without_extension(path: str) -> tuple[str, ...]:
    """``path`` without its last segment's extension, as Rails reads a format
    (``/a/b.v1.json``: ``/a/b.v1``) and Spring a suffix (``/a/b``); none when it has none."""
    head, _, last = path.rpartition("/")
    first, _, _ = last.partition(".")
    rails, _, _ = last.rpartition(".")
    stems = dict.fromkeys(stem for stem in (rails, first) if stem and stem != last)
    return tuple(f"{head}/{stem}" for stem in stems)


def _other_slash(path: str) -> str:
    return path[:-1] if path.endswith("/") else path + "/"


def path_refusal(path: str) -> str | None:
    """Why a backend could resolve ``path`` (percent-decoded) differently from the rules."""
    if not path.startswith("/"):
        # Some servers pass a request target such as `paid/x` on as it is; frameworks that
        # route it (Werkzeug's) read it as /paid/x, which no rule sees in `paid/x`.
        return "path must start with '/'"
    if not _PLAIN_PATH.fullmatch(path):
        if "\\" in path:
            return "path must not contain a backslash"
        if "%" in path:
            return "path must not contain '%' once decoded (double encoding)"
        if ";" in path:
            return "path must not contain ';' (path parameters)"
        if "?" in path or "#" in path:
            # Only an encoded one is left in a path; a backend that decodes the path and
            # parses it as a URL again ends it there.
            return "path must not contain an encoded '?' or '#'"
        if _CONTROL.search(path):
            return "path must not contain control characters"
        if not path.isascii() and unicodedata.normalize("NFKC", path) != path:
            return "path must be in Unicode normalization form NFKC"
    segments = path.split("/")
    if "" in segments[1:-1] or "." in segments or ".." in segments:
        return "path must not contain '.', '..' or empty segments"
    if any(segment.endswith((".", " ")) for segment in segments):
        return "path segments must not end in '.' or a space"
    return None
