"""The core: authorize() -> Allow / PaymentChallenge / Deny, over the fake node and the memory
store."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import pytest

from gateway import errors, l402
from gateway.ports import (
    InvoiceRecord,
    InvoiceState,
    Msat,
    NewInvoice,
    PaymentHash,
    StoreOperations,
)
from gateway.pricing import MAX_PRICE_MSAT, PriceRequest, Pricing, Rule
from gateway.service import (
    Allow,
    Decision,
    Deny,
    L402Service,
    PaidToken,
    PaymentChallenge,
    RateLimiter,
    RequestInfo,
)
from gateway.service.caches import (
    CACHED_PATH_LIMIT,
    CREDENTIAL_TAIL,
    AllowedCache,
    FreeLines,
    KnownToken,
    RootKeyCache,
)
from gateway.store import MemoryStore
from gateway.watcher import InvoiceWatcher
from gateway.web.cookies import headers_for_pricing
from tests.fakes import FakeClock, FakeInvoiceBackend

PREMIUM = "/api/premium/fortune"
RULES = (
    Rule("/health"),
    Rule(
        "/api/premium/*",
        methods=frozenset({"GET"}),
        price_msat=Msat(10_000),
        lifetime=3600,
        service="premium",
        capabilities=frozenset({"read"}),
    ),
    Rule(
        "/api/admin/*",
        price_msat=Msat(50_000),
        service="premium",
        capabilities=frozenset({"admin"}),
    ),
    Rule("/api/gold/*", price_msat=Msat(90_000), service="premium", tier=2),
    Rule("/api/other/*", price_msat=Msat(1_000), service="other"),
)


class Env:
    """A service over the fakes, with helpers to ask, pay and retry."""

    def __init__(
        self,
        rules: Sequence[Rule] = RULES,
        *,
        store: MemoryStore | None = None,
        clock: FakeClock | None = None,
        backend: FakeInvoiceBackend | None = None,
        **options: Any,
    ) -> None:
        self.clock = clock or FakeClock()
        self.backend = backend or FakeInvoiceBackend(self.clock)
        self.store = store or MemoryStore()
        self.service = L402Service(
            pricing=Pricing(rules),
            backend=self.backend,
            store=self.store,
            clock=self.clock,
            **options,
        )

    async def ask(
        self,
        path: str = PREMIUM,
        authorization: Sequence[str] = (),
        *,
        method: str = "GET",
        query: str = "",
        client: str = "203.0.113.7",
        headers: Sequence[tuple[str, str]] = (),
    ) -> Decision:
        return await self.service.authorize(
            RequestInfo(method, path, client, tuple(authorization), query, tuple(headers))
        )

    async def challenge(self, path: str = PREMIUM, **kwargs: Any) -> PaymentChallenge:
        decision = await self.ask(path, **kwargs)
        assert isinstance(decision, PaymentChallenge), decision
        return decision

    def pay(self, challenge: PaymentChallenge) -> bytes:
        return self.backend.pay(bytes.fromhex(challenge.payment_hash))

    async def credential(self, path: str = PREMIUM, scheme: str = "L402") -> str:
        """Get a challenge for ``path``, pay it: the Authorization value that follows."""
        challenge = await self.challenge(path)
        preimage = self.pay(challenge)
        return f"{scheme} {challenge.macaroon}:{preimage.hex()}"


def split(value: str) -> tuple[l402.Macaroon, bytes]:
    text = value.split(" ", 1)[1]
    mac, _, preimage = text.rpartition(":")
    return l402.decode_b64(mac), bytes.fromhex(preimage)


def with_macaroon(value: str, macaroon: l402.Macaroon) -> str:
    _, preimage = split(value)
    return f"L402 {l402.encode_b64(macaroon)}:{preimage.hex()}"


def allowed(decision: Decision) -> PaidToken:
    assert isinstance(decision, Allow), decision
    assert decision.token is not None
    return decision.token


def denied(decision: Decision, status: int) -> Deny:
    assert isinstance(decision, Deny), decision
    assert decision.status == status, decision
    return decision


# --- free and unpriced -------------------------------------------------------------------


async def test_free_and_unpriced_routes_are_allowed_without_an_invoice() -> None:
    env = Env()
    assert await env.ask("/health") == Allow(None)
    assert await env.ask("/not/priced") == Allow(None)
    assert await env.ask(PREMIUM, method="POST") == Allow(None)  # the rule is GET only
    # Even a garbage credential is not looked at on a free route.
    assert await env.ask("/health", ["L402 garbage"]) == Allow(None)
    assert env.backend.invoices == {}


# --- the challenge -----------------------------------------------------------------------


async def test_challenge_records_the_invoice_and_the_root_key() -> None:
    env = Env()
    challenge = await env.challenge()
    assert challenge.reason == "payment required"
    assert challenge.amount_msat == 10_000
    assert challenge.expires_at == env.clock.now() + 600
    payment_hash = bytes.fromhex(challenge.payment_hash)
    assert challenge.invoice == env.backend.invoices[payment_hash].payment_request
    assert env.backend.invoices[payment_hash].amount_msat == 10_000
    assert env.backend.invoices[payment_hash].memo == "premium: GET /api/premium/fortune"

    macaroon = l402.decode_b64(challenge.macaroon)
    identifier = l402.Identifier.decode(macaroon.identifier)
    assert identifier.payment_hash == payment_hash
    record = await env.store.get_invoice(PaymentHash(payment_hash))
    assert record == InvoiceRecord(
        payment_hash=PaymentHash(payment_hash),
        payment_request=challenge.invoice,
        amount_msat=Msat(10_000),
        token_id=identifier.token_id,
        service="premium",
        method="GET",
        path=PREMIUM,
        state=InvoiceState.OPEN,
        created_at=env.clock.now(),
        expires_at=env.clock.now() + 600,
        add_index=1,
    )
    root_key = await env.store.get_root_key(hashlib.sha256(macaroon.identifier).digest())
    assert root_key is not None
    assert len(root_key) == 32
    assert macaroon.verify_signature(root_key)
    assert macaroon.location == "l402-gateway"


async def test_challenge_caveats() -> None:
    env = Env()
    challenge = await env.challenge()
    macaroon = l402.decode_b64(challenge.macaroon)
    assert macaroon.caveats == (
        b"services=premium:0",
        b"premium_capabilities=read",
        b"premium_valid_until=%d" % (int(env.clock.now()) + 3600),
    )
    # No capabilities on the rule: no capabilities caveat (the token is not limited).
    other = l402.decode_b64((await env.challenge("/api/other/x")).macaroon)
    assert [c.split(b"=")[0] for c in other.caveats] == [b"services", b"other_valid_until"]


async def test_challenge_www_authenticate_offers_l402_and_lsat() -> None:
    env = Env(location="my-gateway")
    challenge = await env.challenge()
    l402_value, lsat_value = challenge.www_authenticate()
    assert l402_value.startswith("L402 ")
    assert lsat_value.startswith("LSAT ")
    for value, scheme in ((l402_value, "L402"), (lsat_value, "LSAT")):
        parsed = l402.parse_challenge(value)
        assert parsed.scheme == scheme
        assert parsed.macaroon_b64 == challenge.macaroon
        assert parsed.invoice == challenge.invoice
        assert f'macaroon="{challenge.macaroon}"' in value
        assert f'token="{challenge.macaroon}"' in value
    assert l402.decode_b64(challenge.macaroon).location == "my-gateway"


async def test_every_challenge_is_a_fresh_invoice_and_token() -> None:
    env = Env()
    first, second = await env.challenge(), await env.challenge()
    assert first.payment_hash != second.payment_hash
    assert first.macaroon != second.macaroon
    assert len(env.backend.invoices) == 2


async def test_long_memo_is_cut() -> None:
    env = Env([Rule("/*", price_msat=Msat(1))])
    await env.challenge("/" + "x" * 500)
    (invoice,) = env.backend.invoices.values()
    assert len(invoice.memo) == 120


# --- paying and retrying -----------------------------------------------------------------


async def test_paid_token_is_allowed_with_its_facts() -> None:
    env = Env()
    challenge = await env.challenge()
    preimage = env.pay(challenge)
    macaroon = l402.decode_b64(challenge.macaroon)
    token_id = l402.Identifier.decode(macaroon.identifier).token_id
    token = allowed(await env.ask(authorization=[f"L402 {challenge.macaroon}:{preimage.hex()}"]))
    assert token == PaidToken(
        token_id=token_id.hex(),
        payment_hash=challenge.payment_hash,
        service="premium",
        tier=0,
        capabilities=frozenset({"read"}),
        valid_until=int(env.clock.now()) + 3600,
        amount_msat=10_000,
    )
    # Reusable until it expires, on any route of the service it covers.
    assert allowed(
        await env.ask("/api/premium/other", [f"L402 {challenge.macaroon}:{preimage.hex()}"])
    )
    assert len(env.backend.invoices) == 1


@pytest.mark.parametrize("scheme", ["L402", "LSAT", "l402", "lsat"])
async def test_schemes_and_upper_case_hex(scheme: str) -> None:
    env = Env()
    value = await env.credential()
    _, rest = value.split(" ", 1)
    mac, _, preimage = rest.rpartition(":")
    assert allowed(await env.ask(authorization=[f"{scheme} {mac}:{preimage.upper()}"]))


async def test_same_credential_as_l402_and_lsat_is_one_credential() -> None:
    env = Env()
    value = await env.credential()
    assert allowed(await env.ask(authorization=[value, value.replace("L402", "LSAT", 1)]))


async def test_other_authorization_schemes_get_a_challenge() -> None:
    env = Env()
    challenge = await env.challenge(authorization=["Bearer abc.def"])
    assert challenge.reason == "payment required"


# --- invalid credentials: 401 ------------------------------------------------------------


async def test_wrong_preimage_is_401() -> None:
    env = Env()
    challenge = await env.challenge()
    env.pay(challenge)
    decision = await env.ask(authorization=[f"L402 {challenge.macaroon}:{'ab' * 32}"])
    assert denied(decision, 401).reason == "preimage does not match the payment hash"


async def test_unpaid_token_with_a_guessed_preimage_is_401() -> None:
    env = Env()
    challenge = await env.challenge()
    decision = await env.ask(authorization=[f"L402 {challenge.macaroon}:{'00' * 32}"])
    denied(decision, 401)


async def test_tampered_caveat_is_401() -> None:
    env = Env()
    value = await env.credential()
    macaroon, _ = split(value)
    widened = dataclasses.replace(
        macaroon,
        caveats=(b"services=premium:0", b"premium_capabilities=read,admin", *macaroon.caveats[2:]),
    )
    decision = await env.ask("/api/admin/x", [with_macaroon(value, widened)])
    assert denied(decision, 401).reason == "invalid macaroon signature"
    dropped = dataclasses.replace(macaroon, caveats=macaroon.caveats[:2])
    assert denied(await env.ask(authorization=[with_macaroon(value, dropped)]), 401)


@pytest.mark.parametrize("caveat", ["premium_admin=true", "admin=true", "premium_tier=9"])
async def test_appended_unknown_caveat_is_401(caveat: str) -> None:
    env = Env()
    value = await env.credential()
    macaroon, _ = split(value)
    decision = await env.ask(authorization=[with_macaroon(value, macaroon.add_caveat(caveat))])
    assert denied(decision, 401).reason == "unknown caveat"


async def test_appended_caveats_can_only_narrow() -> None:
    env = Env()
    value = await env.credential()
    macaroon, _ = split(value)
    for caveat in (
        "services=premium:5",
        "premium_capabilities=read,admin",
        "premium_valid_until=99999999999",
    ):
        macaroon = macaroon.add_caveat(caveat)
    token = allowed(await env.ask(authorization=[with_macaroon(value, macaroon)]))
    assert token.tier == 0
    assert token.capabilities == frozenset({"read"})
    assert token.valid_until == int(env.clock.now()) + 3600
    admin = await env.ask("/api/admin/x", [with_macaroon(value, macaroon)])
    assert isinstance(admin, PaymentChallenge)
    assert admin.reason == "token lacks a required capability"


async def test_token_of_another_gateway_instance_is_401() -> None:
    other = Env()
    value = await other.credential()
    env = Env(backend=other.backend)  # same node, its own store
    decision = await env.ask(authorization=[value])
    assert denied(decision, 401).reason == "unknown or revoked token"


@pytest.mark.parametrize(
    "value",
    [
        "L402",
        "L402 ",
        "L402 abc",
        "L402 abc:def",
        "L402 !!!:" + "00" * 32,
        "L402 AgJ=:" + "00" * 32,
        "LSAT " + "A" * 10_000,
    ],
)
async def test_malformed_credentials_are_401(value: str) -> None:
    env = Env()
    denied(await env.ask(authorization=[value]), 401)
    assert env.backend.invoices == {}


async def test_two_different_credentials_are_401() -> None:
    env = Env()
    first, second = await env.credential(), await env.credential()
    decision = await env.ask(authorization=[first, second])
    assert denied(decision, 401).reason == "several L402 credentials in one request"


async def test_revoked_token_is_401() -> None:
    env = Env()
    value = await env.credential()
    token = allowed(await env.ask(authorization=[value]))
    assert await env.service.revoke(bytes.fromhex(token.token_id)) is True
    assert denied(await env.ask(authorization=[value]), 401).reason == "unknown or revoked token"
    assert await env.service.revoke(bytes.fromhex(token.token_id)) is False


# --- valid but insufficient: a fresh challenge -------------------------------------------


async def test_expired_token_gets_a_new_challenge() -> None:
    env = Env()
    value = await env.credential()
    env.clock.advance(3599)
    allowed(await env.ask(authorization=[value]))
    env.clock.advance(1)
    challenge = await env.challenge(authorization=[value])
    assert challenge.reason == "token expired"
    assert len(env.backend.invoices) == 2


async def test_token_of_another_service_gets_a_new_challenge() -> None:
    env = Env()
    value = await env.credential()
    challenge = await env.challenge("/api/other/x", authorization=[value])
    assert challenge.reason == "token is not valid for this service"
    assert challenge.amount_msat == 1_000


async def test_missing_capability_gets_a_new_challenge() -> None:
    env = Env()
    value = await env.credential()
    challenge = await env.challenge("/api/admin/x", authorization=[value])
    assert challenge.reason == "token lacks a required capability"


async def test_lower_tier_gets_a_new_challenge() -> None:
    env = Env()
    value = await env.credential()  # premium, tier 0
    challenge = await env.challenge("/api/gold/x", authorization=[value])
    assert challenge.reason == "token tier is too low"
    gold = await env.credential("/api/gold/x")
    assert allowed(await env.ask("/api/gold/x", [gold])).tier == 2
    # A higher tier covers the lower one (with the capability the rule needs... none here).
    assert allowed(await env.ask("/api/premium/x", [gold])).tier == 2


# --- the node and the store failing ------------------------------------------------------


async def test_backend_unavailable_is_503_with_retry_after() -> None:
    env = Env()
    env.backend.unavailable = True
    decision = denied(await env.ask(), 503)
    assert decision.retry_after is not None
    assert decision.retry_after > 0
    assert await env.store.list_invoices() == []


class RefusingBackend(FakeInvoiceBackend):
    def __init__(self, error: errors.BackendError) -> None:
        super().__init__()
        self.error = error

    async def add_invoice(
        self, amount_msat: Msat, memo: str, expiry: int, description_hash: bytes = b""
    ) -> Any:
        raise self.error


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (errors.BackendPermissionDenied("no"), 503),
        (errors.BackendBadRequest("amount too large"), 502),
    ],
)
async def test_other_backend_errors(error: errors.BackendError, status: int) -> None:
    env = Env(backend=RefusingBackend(error))
    denied(await env.ask(), status)


class _RootKeyWriteFails:
    """A transaction whose root-key write fails after the invoice was written in it."""

    def __init__(self, tx: StoreOperations) -> None:
        self._tx = tx

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)

    async def put_root_key(self, key_id: bytes, token_id: bytes, root_key: bytes) -> None:
        raise errors.StoreError("disk full")


class BrokenStore(MemoryStore):
    broken = False

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[StoreOperations]:
        async with super().transaction() as tx:
            yield cast(StoreOperations, _RootKeyWriteFails(tx)) if self.broken else tx

    async def get_root_key(self, key_id: bytes) -> bytes | None:
        if self.broken:
            raise errors.StoreError("disk gone")
        return await super().get_root_key(key_id)


async def test_store_failures_are_503() -> None:
    store = BrokenStore()
    env = Env(store=store)
    value = await env.credential()
    stored = await store.list_invoices()
    store.broken = True
    assert denied(await env.ask(authorization=[value]), 503).retry_after
    assert denied(await env.ask(), 503).retry_after
    # The challenge's invoice went with its root key: no invoice tracked without its token.
    assert await store.list_invoices() == stored


# --- rate limiting -----------------------------------------------------------------------


async def test_rate_limiter_429_and_recovery() -> None:
    clock = FakeClock()
    env = Env(clock=clock, rate_limiter=RateLimiter(0.5, 2, 100, clock))
    await env.challenge()
    await env.challenge()
    decision = denied(await env.ask(), 429)
    assert decision.retry_after == 2  # one token every 2 s
    assert len(env.backend.invoices) == 2
    # Another client has its own bucket; free routes are never limited.
    await env.challenge(client="198.51.100.1")
    assert await env.ask("/health") == Allow(None)
    clock.advance(2)
    await env.challenge()
    denied(await env.ask(), 429)


async def test_rate_limiter_does_not_limit_paid_requests() -> None:
    clock = FakeClock()
    env = Env(clock=clock, rate_limiter=RateLimiter(1, 1, 100, clock))
    value = await env.credential()
    for _ in range(5):
        allowed(await env.ask(authorization=[value]))


def test_rate_limiter_buckets() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=2.0, burst=3, max_clients=2, clock=clock)
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(0.5)
    clock.advance(0.25)
    assert limiter.acquire("a") == pytest.approx(0.25)
    clock.advance(10)
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]  # capped at burst
    assert limiter.acquire("a") > 0
    # Only max_clients buckets are kept: the least recently seen one starts afresh.
    limiter.acquire("b")
    limiter.acquire("c")
    assert limiter.acquire("a") == 0.0


def test_rate_limiter_survives_the_clock_stepping_back() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=2.0, burst=20, max_clients=100, clock=clock)
    assert limiter.acquire("a") == 0.0
    clock.advance(-3600)  # an NTP step: not an hour of debt
    assert limiter.acquire("a") == 0.0


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0), (float("nan"), 1)])
def test_rate_limiter_validation(rate: float, burst: int) -> None:
    with pytest.raises(ValueError, match="rate"):
        RateLimiter(rate, burst, 10, FakeClock())


@pytest.mark.parametrize("prefix", [0, 129])
def test_rate_limiter_ipv6_prefix_validation(prefix: int) -> None:
    with pytest.raises(ValueError, match="ipv6_prefix"):
        RateLimiter(1, 1, 10, FakeClock(), ipv6_prefix=prefix)


@pytest.mark.parametrize(
    ("client", "bucket"),
    [
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:DB8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),  # IPv4-mapped: the IPv4 client it is
        ("192.0.2.7", "192.0.2.7"),
        ("unknown", "unknown"),
        ("not-an-address", "not-an-address"),
    ],
)
def test_rate_limiter_bucket_keys(client: str, bucket: str) -> None:
    assert RateLimiter(1, 1, 10, FakeClock()).bucket_of(client) == bucket


def test_ipv6_clients_share_a_bucket_per_prefix() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=1.0, burst=2, max_clients=100, clock=clock)
    # One host rotating through the addresses of its /64 gets one budget.
    assert [limiter.acquire(f"2001:db8:0:1::{n:x}") for n in range(1, 3)] == [0.0, 0.0]
    assert limiter.acquire("2001:db8:0:1:dead:beef:0:1") == pytest.approx(1.0)
    # The next /64 is another client; the IPv4-mapped form of an IPv4 address is that address.
    assert limiter.acquire("2001:db8:0:2::1") == 0.0
    assert [limiter.acquire("192.0.2.1"), limiter.acquire("::ffff:192.0.2.1")] == [0.0, 0.0]
    assert limiter.acquire("192.0.2.1") > 0


def test_ipv6_prefix_is_configurable() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, max_clients=100, clock=FakeClock(), ipv6_prefix=48)
    assert limiter.acquire("2001:db8:0:1::1") == 0.0
    assert limiter.acquire("2001:db8:0:2::1") > 0  # same /48
    assert limiter.acquire("2001:db8:1::1") == 0.0
    per_address = RateLimiter(1.0, 1, 100, FakeClock(), ipv6_prefix=128)
    assert per_address.acquire("2001:db8::1") == per_address.acquire("2001:db8::2") == 0.0


async def test_challenges_from_one_ipv6_prefix_are_limited_together() -> None:
    clock = FakeClock()
    env = Env(clock=clock, rate_limiter=RateLimiter(0.5, 2, 100, clock))
    await env.challenge(client="2001:db8:5:6::1")
    await env.challenge(client="2001:db8:5:6::2")
    denied(await env.ask(client="2001:db8:5:6::3"), 429)
    assert len(env.backend.invoices) == 2


# --- dynamic prices ----------------------------------------------------------------------


class Prices:
    def __init__(self, result: object = 3_000) -> None:
        self.result = result
        self.seen: list[PriceRequest] = []

    async def __call__(self, request: PriceRequest) -> int:
        self.seen.append(request)
        if isinstance(self.result, Exception):
            raise self.result
        return self.result  # type: ignore[return-value]


async def test_price_function_sees_the_request() -> None:
    prices = Prices()
    env = Env([Rule("/quote", price_function=prices, service="quotes")])
    challenge = await env.challenge(
        "/quote",
        query="n=3",
        headers=headers_for_pricing(
            [("Accept", "application/json"), ("Authorization", "Bearer x")]
        ),
        authorization=["Bearer x"],
    )
    assert challenge.amount_msat == 3_000
    (seen,) = prices.seen
    assert seen.method == "GET"
    assert seen.path == "/quote"
    assert seen.query == "n=3"
    # The credential is a secret: a price function (user code that may log) never sees it
    # (the adapters describe a request to the core without it).
    assert seen.headers == (("Accept", "application/json"),)


async def test_price_function_returning_zero_lets_the_request_through() -> None:
    env = Env([Rule("/quote", price_function=Prices(0))])
    assert await env.ask("/quote") == Allow(None)
    assert env.backend.invoices == {}


async def test_price_function_is_not_consulted_for_a_valid_token() -> None:
    prices = Prices()
    env = Env([Rule("/quote", price_function=prices, service="quotes")])
    value = await env.credential("/quote")
    allowed(await env.ask("/quote", [value]))
    assert len(prices.seen) == 1


async def test_failing_price_function_is_503_and_logged_without_secrets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Boom(Exception):
        pass

    async def boom(request: PriceRequest) -> int:
        raise Boom(f"cannot price {request!r}")

    # A token bought while the route had a fixed price, presented after it expired: the
    # request carries a genuine preimage when the (now dynamic) price is asked for.
    clock = FakeClock()
    paid = Env([Rule("/quote", price_msat=Msat(5), service="quotes")], clock=clock)
    credential = await paid.credential("/quote")
    env = Env(
        [Rule("/quote", price_function=boom, service="quotes")], store=paid.store, clock=clock
    )
    clock.advance(10_000)
    _, preimage = split(credential)
    with caplog.at_level(logging.ERROR, logger="gateway.service"):
        decision = await env.ask(
            "/quote",
            [credential],
            headers=headers_for_pricing(
                [("Authorization", credential), ("Proxy-Authorization", "Basic c2VjcmV0")]
            ),
        )
    deny = denied(decision, 503)
    assert deny.reason == "price function failed"
    assert "price function for /quote failed: Boom" in caplog.text
    assert [r.exc_info for r in caplog.records] == [None]  # one line, no traceback
    assert preimage.hex() not in caplog.text
    assert split(credential)[0].signature.hex() not in caplog.text
    assert "c2VjcmV0" not in caplog.text


@pytest.mark.parametrize("result", [-1, 1.5, "100", None, True, MAX_PRICE_MSAT + 1, 2**63])
async def test_price_function_returning_garbage_is_503(result: object) -> None:
    env = Env([Rule("/quote", price_function=Prices(result))])
    assert denied(await env.ask("/quote"), 503).reason == "price function returned an invalid price"


async def test_sync_price_function_is_503() -> None:
    def sync(_request: PriceRequest) -> int:
        return 5

    env = Env([Rule("/quote", price_function=sync)])  # type: ignore[arg-type]
    denied(await env.ask("/quote"), 503)


async def test_a_failing_price_function_is_logged_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    env = Env([Rule("/quote", price_function=Prices(-1))], clock=clock)
    with caplog.at_level(logging.ERROR, logger="gateway.service"):
        for _ in range(5):
            denied(await env.ask("/quote"), 503)
        assert len(caplog.records) == 1
        assert "returned -1" in caplog.text
        clock.advance(61)
        denied(await env.ask("/quote"), 503)
    assert len(caplog.records) == 2
    assert "4 more failures since the last report" in caplog.records[1].getMessage()


# --- strict settlement -------------------------------------------------------------------


async def test_strict_settlement_rejects_an_unsettled_invoice() -> None:
    env = Env(strict_settlement=True)
    challenge = await env.challenge()
    # The preimage leaked (e.g. a hold invoice, or the node's own log) but nobody paid.
    preimage = env.backend.preimages[bytes.fromhex(challenge.payment_hash)]
    value = f"L402 {challenge.macaroon}:{preimage.hex()}"
    assert denied(await env.ask(authorization=[value]), 401).reason == "invoice is not settled"
    # Without strict settlement the preimage alone is proof enough.
    lax = Env(backend=env.backend, store=env.store, clock=env.clock)
    allowed(await lax.ask(authorization=[value]))


async def test_strict_settlement_confirms_with_the_node_and_updates_the_store() -> None:
    env = Env(strict_settlement=True)
    challenge = await env.challenge()
    value = f"L402 {challenge.macaroon}:{env.pay(challenge).hex()}"
    payment_hash = PaymentHash(bytes.fromhex(challenge.payment_hash))
    before = await env.store.get_invoice(payment_hash)
    assert before is not None
    assert before.state is InvoiceState.OPEN  # the watcher has not seen it yet
    token = allowed(await env.ask(authorization=[value]))
    assert token.amount_msat == 10_000
    after = await env.store.get_invoice(payment_hash)
    assert after is not None
    assert after.state is InvoiceState.SETTLED
    assert after.amount_paid_msat == 10_000
    assert after.settle_index == 1
    # Now known settled: no need to ask the node again.
    env.backend.unavailable = True
    allowed(await env.ask(authorization=[value]))


async def test_strict_settlement_uses_the_store_when_it_already_knows() -> None:
    env = Env(strict_settlement=True)
    challenge = await env.challenge()
    value = f"L402 {challenge.macaroon}:{env.pay(challenge).hex()}"
    payment_hash = PaymentHash(bytes.fromhex(challenge.payment_hash))
    await InvoiceWatcher(env.backend, env.store).record(env.backend.invoices[payment_hash])
    env.backend.unavailable = True
    allowed(await env.ask(authorization=[value]))


async def test_strict_settlement_with_the_node_down_is_503() -> None:
    env = Env(strict_settlement=True)
    value = await env.credential()
    env.backend.unavailable = True
    # The token may well be good: a 401 would make the client throw it away.
    assert denied(await env.ask(authorization=[value]), 503).retry_after


async def test_strict_settlement_with_an_invoice_unknown_to_the_node_is_401() -> None:
    env = Env(strict_settlement=True)
    value = await env.credential()
    env.backend.invoices.clear()
    denied(await env.ask(authorization=[value]), 401)


# --- the root key cache ------------------------------------------------------------------


async def test_revocation_through_the_store_is_seen_after_the_cache_max_age() -> None:
    env = Env(root_key_cache_seconds=5.0)
    value = await env.credential()
    token = allowed(await env.ask(authorization=[value]))
    # Another process (``l402-gateway token revoke``) revokes in the shared store.
    assert await env.store.revoke_token(bytes.fromhex(token.token_id))
    allowed(await env.ask(authorization=[value]))
    env.clock.advance(4.5)
    allowed(await env.ask(authorization=[value]))
    env.clock.advance(1)
    assert denied(await env.ask(authorization=[value]), 401).reason == "unknown or revoked token"


async def test_cache_age_counts_from_the_load_not_the_last_use() -> None:
    env = Env(root_key_cache_seconds=5.0)
    value = await env.credential()
    token = allowed(await env.ask(authorization=[value]))
    await env.store.revoke_token(bytes.fromhex(token.token_id))
    for _ in range(5):
        env.clock.advance(1.2)  # used often, but the entry still ages
        decision = await env.ask(authorization=[value])
    denied(decision, 401)


async def test_zero_cache_age_always_reads_the_store() -> None:
    env = Env(root_key_cache_seconds=0)
    value = await env.credential()
    token = allowed(await env.ask(authorization=[value]))
    await env.store.revoke_token(bytes.fromhex(token.token_id))
    denied(await env.ask(authorization=[value]), 401)


# --- paths the gateway and the backend could read differently -----------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/api/x/../premium/fortune",
        "/api/premium/./fortune",
        "/api/premium/..",
        "/api/.",
        "//api/premium/fortune",
        "/api//premium/fortune",
    ],
)
async def test_unnormalized_paths_are_400(path: str) -> None:
    env = Env()
    decision = denied(await env.ask(path), 400)
    assert "path" in decision.reason
    assert env.backend.invoices == {}


@pytest.mark.parametrize("path", ["/", "/api/premium/", "/api/premium/a.b", "/a..b/.c/..d"])
async def test_dots_inside_segments_are_fine(path: str) -> None:
    env = Env([Rule("/*", price_msat=Msat(1))])
    await env.challenge(path)


# --- the allowed-decision cache ----------------------------------------------------------


async def test_repeated_credential_is_not_parsed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    env = Env()
    credential = await env.credential()
    first = allowed(await env.ask(PREMIUM, [credential]))
    calls = 0
    original = l402.verify_token

    def counting(*args: Any, **kwargs: Any) -> l402.VerifiedToken:
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(l402, "verify_token", counting)
    assert allowed(await env.ask(PREMIUM, [credential])) == first
    assert calls == 0
    # Another path is another cache entry: verified afresh.
    allowed(await env.ask("/api/premium/other", [credential]))
    assert calls == 1


async def test_cached_allow_still_expires() -> None:
    env = Env()
    credential = await env.credential()
    allowed(await env.ask(PREMIUM, [credential]))
    env.clock.advance(3600)
    decision = await env.ask(PREMIUM, [credential])
    assert isinstance(decision, PaymentChallenge)
    assert decision.reason == "token expired"


async def test_cached_allow_sees_revocation_like_the_root_key_cache() -> None:
    env = Env(root_key_cache_seconds=5.0)
    credential = await env.credential()
    token = allowed(await env.ask(PREMIUM, [credential]))
    # Revoked behind the service's back (another process): seen once the root key is stale.
    assert await env.store.revoke_token(bytes.fromhex(token.token_id))
    env.clock.advance(1)
    allowed(await env.ask(PREMIUM, [credential]))
    env.clock.advance(5)
    assert denied(await env.ask(PREMIUM, [credential]), 401).reason == "unknown or revoked token"


async def test_cached_allow_forgotten_on_revoke_through_the_service() -> None:
    env = Env()
    credential = await env.credential()
    token = allowed(await env.ask(PREMIUM, [credential]))
    assert await env.service.revoke(bytes.fromhex(token.token_id))
    assert denied(await env.ask(PREMIUM, [credential]), 401).reason == "unknown or revoked token"


async def test_cached_allow_respects_a_holder_added_paths_caveat() -> None:
    env = Env()
    credential = await env.credential()
    macaroon, _ = split(credential)
    narrowed = with_macaroon(credential, macaroon.add_caveat("premium_paths=/api/premium/one"))
    allowed(await env.ask("/api/premium/one", [narrowed]))
    decision = await env.ask("/api/premium/two", [narrowed])
    assert isinstance(decision, PaymentChallenge)
    assert decision.reason == "path not allowed by token"


async def test_allowed_again_is_the_adapters_fast_path() -> None:
    env = Env()
    credential = await env.credential()
    assert env.service.allowed_again((credential,), "GET", PREMIUM) is None  # not verified yet
    decision = await env.ask(PREMIUM, [credential])
    assert env.service.allowed_again((credential,), "GET", PREMIUM) == decision
    assert env.service.allowed_again((credential,), "GET", "/api/premium/other") is None
    assert env.service.allowed_again((credential,), "HEAD", PREMIUM) is None
    env.clock.advance(3600)
    assert env.service.allowed_again((credential,), "GET", PREMIUM) is None


async def test_allowed_again_answers_only_the_exact_credential_it_verified() -> None:
    """Entries are filed under the credential's last characters: one that ends alike, or the
    same one with another Authorization value before it, gets no decision from the cache."""
    env = Env()
    credential = await env.credential()
    decision = await env.ask(PREMIUM, [credential])
    forged = f"L402 x{credential[CREDENTIAL_TAIL]}:{'0' * 64}"
    assert forged[CREDENTIAL_TAIL] == credential[CREDENTIAL_TAIL]
    assert env.service.allowed_again((forged,), "GET", PREMIUM) is None
    assert env.service.allowed_again(("Bearer x", credential), "GET", PREMIUM) is None
    assert env.service.allowed_again((credential,), "GET", PREMIUM) == decision
    cache = AllowedCache(env.clock)
    now = env.clock.now()
    cache.put(((credential,), "GET", PREMIUM), decision, now, now + 5, now)
    assert cache.get(((forged,), "GET", PREMIUM)) is None
    assert cache.get(((credential,), "GET", PREMIUM)) == decision


async def test_a_paying_client_cannot_file_its_decision_over_anothers() -> None:
    """Another Authorization value after a valid credential, made to end as someone else's
    does: that request is verified on its own and its decision is not filed, so the other
    client's stays."""
    env = Env()
    victim, attacker = await env.credential(), await env.credential()
    decision = await env.ask(PREMIUM, [victim])
    crafted = f"Bearer x{victim[CREDENTIAL_TAIL]}:{'0' * 64}"
    allowed(await env.ask(PREMIUM, [attacker, crafted]))
    assert env.service.allowed_again((victim,), "GET", PREMIUM) == decision
    assert env.service.allowed_again((attacker, crafted), "GET", PREMIUM) is None


async def test_a_decision_on_a_long_path_is_not_kept() -> None:
    """A path over ``CACHED_PATH_LIMIT`` is verified each time: a paying client sending many
    long paths cannot fill the cache with large entries."""
    env = Env()
    credential = await env.credential()
    for path in (PREMIUM + "x" * (CACHED_PATH_LIMIT - len(PREMIUM)), PREMIUM + "x" * 8000):
        decision = await env.ask(path, [credential])
        allowed(decision)
        kept = env.service.allowed_again((credential,), "GET", path)
        assert kept == (decision if len(path) <= CACHED_PATH_LIMIT else None)


async def test_macaroons_derived_from_one_token_keep_their_own_cached_decisions() -> None:
    """Attenuated copies of a token share its preimage: each is filed apart all the same, so
    holders taking turns on one path are each answered from the cache."""
    env = Env()
    credential = await env.credential()
    macaroon, _ = split(credential)
    caveat = f"premium_paths={PREMIUM}"
    once = macaroon.add_caveat(caveat)
    derived = [with_macaroon(credential, m) for m in (once, once.add_caveat(caveat))]
    assert derived[0][-64:] == derived[1][-64:]
    decisions = [await env.ask(PREMIUM, [value]) for value in derived]
    for value, decision in zip(derived, decisions, strict=True):
        allowed(decision)
        assert env.service.allowed_again((value,), "GET", PREMIUM) == decision


async def test_a_free_request_line_is_answered_again_for_any_credential() -> None:
    env = Env()
    assert env.service.allowed_again((), "GET", "/health") is None  # not resolved yet
    first = await env.ask("/health", ["L402 not:atoken"])
    assert first == Allow(None)
    for authorization in ((), ("L402 other:junk",), ("Bearer x", "L402 y:z")):
        assert env.service.allowed_again(authorization, "GET", "/health") == first
    assert env.service.allowed_again((), "HEAD", "/health") is None  # another request line
    assert env.service.allowed_again((), "GET", "/health/") is None
    await env.challenge(PREMIUM)  # a priced line is never remembered as free
    assert env.service.allowed_again((), "GET", PREMIUM) is None


async def test_a_free_line_read_with_a_method_override_is_not_remembered() -> None:
    env = Env()
    request = RequestInfo("GET", "/health", "203.0.113.7", method_overrides=("POST",))
    assert await env.service.authorize(request) == Allow(None)
    assert env.service.allowed_again((), "GET", "/health") is None


def test_free_lines_hold_a_bounded_number_of_short_paths() -> None:
    lines = FreeLines(capacity=2, path_limit=10)
    lines.add("GET", "/a")
    lines.add("GET", "/b")
    lines.add("GET", "/c")  # the oldest goes
    assert ("GET", "/a") not in lines
    assert ("GET", "/b") in lines
    assert ("GET", "/c") in lines
    lines.add("GET", "/" + "x" * 10)  # over the path limit: resolved each time
    assert len(lines) == 2
    assert ("GET", "/" + "x" * 10) not in lines


def test_root_key_cache_keeps_only_tokens_read_within_its_age() -> None:
    cache = RootKeyCache(max_age=5.0)
    for n in range(3):
        cache.put(bytes([n]), KnownToken(b"k", 1, settled=True, fetched_at=0.0))
    cache.put(b"new", KnownToken(b"k", 1, settled=True, fetched_at=5.0))
    # The stale entries went when the new one came in: memory follows recent use.
    assert len(cache) == 1
    assert cache.get(b"new", 5.0) is not None


def test_allowed_cache_keeps_only_decisions_still_valid() -> None:
    clock = FakeClock()
    cache = AllowedCache(clock)
    start = clock.now()
    for n in range(3):
        cache.put(((f"L402 {n}",), "GET", PREMIUM), Allow(None), start, start + 5, start)
    clock.advance(5)
    now = clock.now()
    cache.put((("L402 new",), "GET", PREMIUM), Allow(None), now, now + 5, now)
    assert len(cache) == 1
    assert cache.get((("L402 new",), "GET", PREMIUM)) == Allow(None)


class _SlowBackend(FakeInvoiceBackend):
    """Counts the invoices being created at once; each waits until the test releases it."""

    def __init__(self, full_at: int) -> None:
        super().__init__()
        self.pending = 0
        self.most_pending = 0
        self.full_at = full_at
        self.full = asyncio.Event()
        self.release = asyncio.Event()

    async def add_invoice(
        self, amount_msat: Msat, memo: str, expiry: int, description_hash: bytes = b""
    ) -> NewInvoice:
        self.pending += 1
        self.most_pending = max(self.most_pending, self.pending)
        if self.pending == self.full_at:
            self.full.set()
        try:
            await self.release.wait()
            return await super().add_invoice(amount_msat, memo, expiry, description_hash)
        finally:
            self.pending -= 1


async def test_invoices_created_at_once_are_bounded_over_all_clients() -> None:
    backend = _SlowBackend(full_at=4)
    env = Env(backend=backend, max_pending_invoices=4)
    asks = [asyncio.create_task(env.ask(client=f"198.51.100.{i}")) for i in range(20)]
    await backend.full.wait()
    await asyncio.sleep(0)  # one more turn: every other ask has run as far as it can
    assert backend.pending == 4  # the other 16 wait for a slot instead of reaching the node
    backend.release.set()
    decisions = await asyncio.gather(*asks)
    assert all(isinstance(decision, PaymentChallenge) for decision in decisions)
    assert backend.most_pending == 4
