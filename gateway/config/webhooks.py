"""``[webhooks]`` (how deliveries are retried) and the endpoints, ``[[webhook]]``, with their
load-time checks; ``read_secret`` reads an endpoint's signing secret when the gateway starts.

An endpoint::

    [[webhook]]
    name = "crm"                                   # letters, digits, - _ . (at most 64)
    url = "https://crm.example.com/hooks/l402"     # http(s); redirects are not followed
    events = ["invoice.settled", "token.bought"]   # or ["*"]: every type
    secret_file = "/etc/l402/crm.whsec"             # or secret_env = "CRM_WEBHOOK_SECRET"
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from yarl import URL

from gateway.config.checks import MAX_LIFETIME, positive, require
from gateway.errors import ConfigError
from gateway.ports import WEBHOOK_EVENT_TYPES

MAX_ATTEMPTS = 100
MAX_BACKOFF = 86_400.0
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SECRET_PREFIX = "whsec_"  # noqa: S105 - the prefix, not a secret
# Standard Webhooks: a secret of 24 to 64 random bytes, base64 after "whsec_".
MIN_SECRET_BYTES, MAX_SECRET_BYTES = 24, 64


@dataclass(frozen=True, slots=True)
class WebhooksConfig:
    """``[webhooks]``: the sender's retries. An attempt that gets no 2xx (a timeout, a
    refused connection, a 3xx: redirects are not followed) is retried after
    ``initial_backoff`` seconds, doubling up to ``max_backoff``; after ``max_attempts`` the
    delivery is DEAD (``l402-gateway webhooks redeliver`` revives it)."""

    max_attempts: int = 12
    initial_backoff: float = 5.0
    max_backoff: float = 3600.0
    timeout: float = 10.0  # seconds for one attempt, connection to the end of the answer
    # Seconds events are kept before the invoice sweeper deletes them (once no configured
    # endpoint still has to send them; with no endpoint too); 0 keeps them forever.
    retention: int = 604_800
    # Seconds between looks for events written by other processes (workers).
    poll_interval: float = 1.0

    def __post_init__(self) -> None:
        attempts = self.max_attempts
        require(1 <= attempts <= MAX_ATTEMPTS, "max_attempts", f"1 to {MAX_ATTEMPTS}", attempts)
        initial, most = self.initial_backoff, self.max_backoff
        require(
            positive(initial) and math.isfinite(most) and initial <= most <= MAX_BACKOFF,
            "initial_backoff / max_backoff",
            f"more than 0, initial_backoff <= max_backoff <= {MAX_BACKOFF:g}",
            f"{initial:g} / {most:g}",
        )
        timeout = self.timeout
        require(positive(timeout) and timeout <= 300, "timeout", "0 to 300 seconds", timeout)
        retention = self.retention
        require(
            0 <= retention <= MAX_LIFETIME,
            "retention",
            f"0 (keep forever) to {MAX_LIFETIME}",
            retention,
        )
        poll = self.poll_interval
        require(math.isfinite(poll) and 0.05 <= poll <= 60, "poll_interval", "0.05 to 60", poll)


def _resolvable(url: str) -> bool:
    """Whether the host of ``url``, as the HTTP client reads it (``yarl``), can be looked up:
    the resolver encodes it with the ``idna`` codec, which refuses an empty label (``a..b``,
    or one that NFKC folding makes empty) or one over 63 characters."""
    try:
        host = URL(url).raw_host
        if host is None:
            return False
        host.encode("idna")
    except (ValueError, UnicodeError):
        return False
    return True


@dataclass(frozen=True, slots=True)
class WebhookEndpointConfig:
    """One ``[[webhook]]``: where, which event types, and where its secret is."""

    name: str
    url: str
    events: tuple[str, ...] = ()
    secret_file: Path | None = None
    secret_env: str | None = None

    def __post_init__(self) -> None:
        require(
            _NAME.fullmatch(self.name) is not None,
            "name",
            "1 to 64 letters, digits, '-', '_' or '.'",
            self.name,
        )
        parts = urllib.parse.urlsplit(self.url)
        require(
            parts.scheme in ("http", "https") and bool(parts.hostname) and " " not in self.url,
            "url",
            "an http:// or https:// URL with a host",
            f"{parts.scheme}://...",  # the URL may hold a credential: not shown
        )
        try:
            port = parts.port  # ValueError: not a number, or past 65535
        except ValueError:
            port = -1
        require(
            port is None or 1 <= port <= 65_535,
            "url",
            "a port from 1 to 65535 (or none: 80 or 443)",
            f"{parts.scheme}://...:{parts.netloc.rpartition(':')[2][:12]}",
        )
        require(
            _resolvable(self.url),
            "url",
            "a host name of labels of 1 to 63 characters",
            f"{parts.scheme}://...",
        )
        require(bool(self.events), "events", "a non-empty list of event types", self.events)
        unknown = sorted(set(self.events) - WEBHOOK_EVENT_TYPES - {"*"})
        require(
            not unknown,
            "events",
            f'"*" or among {", ".join(sorted(WEBHOOK_EVENT_TYPES))}',
            unknown,
        )
        require(
            (self.secret_file is None) != (self.secret_env is None),
            "secret_file / secret_env",
            "exactly one of them",
            "both" if self.secret_file is not None else "neither",
        )
        if self.secret_env is not None:
            require(
                _ENV_NAME.fullmatch(self.secret_env) is not None,
                "secret_env",
                "an environment variable's name",
                self.secret_env,
            )

    @property
    def subscribed(self) -> frozenset[str]:
        """The event types it gets ("*": every one)."""
        if "*" in self.events:
            return WEBHOOK_EVENT_TYPES
        return frozenset(self.events)


def check_endpoints(endpoints: tuple[WebhookEndpointConfig, ...]) -> None:
    """Names are unique: they key the deliveries in the store."""
    seen: set[str] = set()
    for endpoint in endpoints:
        if endpoint.name in seen:
            raise ConfigError(f"[[webhook]] name {endpoint.name!r} is used twice")
        seen.add(endpoint.name)


def read_secret(endpoint: WebhookEndpointConfig, environ: Mapping[str, str] | None = None) -> str:
    """The endpoint's ``whsec_...`` secret from its file or variable; ``ConfigError`` when it
    is missing or not a Standard Webhooks secret (never showing it)."""
    where = f"[[webhook]] {endpoint.name}"
    if endpoint.secret_file is not None:
        try:
            secret = endpoint.secret_file.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) else "not ASCII text"
            raise ConfigError(
                f"{where}: cannot read secret_file {endpoint.secret_file}: {reason}"
            ) from None
    else:
        assert endpoint.secret_env is not None  # __post_init__: exactly one
        environ = os.environ if environ is None else environ
        secret = environ.get(endpoint.secret_env, "").strip()
        if not secret:
            raise ConfigError(f"{where}: the variable {endpoint.secret_env} is not set")
    if not secret.startswith(SECRET_PREFIX):
        raise ConfigError(f"{where}: the secret must start with {SECRET_PREFIX}")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{where}: the secret is not base64 after {SECRET_PREFIX}") from None
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise ConfigError(
            f"{where}: the secret must hold {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes, "
            f"it holds {len(key)} (make one with: l402-gateway webhooks new-secret)"
        )
    return secret
