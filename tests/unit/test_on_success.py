"""Pay on success: the hold challenge, the executor that runs a held request once and settles
or cancels its invoice, replay of the stored response, and redeem, over the fake node (hold
invoices as LND's invoicesrpc), the memory store, a fake backend runner and a fake clock."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest

from gateway import errors, l402
from gateway.ports import (
    HELD_UNFINISHED,
    SETTLED_BY_NODE,
    HeldRequest,
    HeldState,
    InvoiceState,
    Msat,
    PaymentHash,
    StoredRequest,
    StoredResponse,
)
from gateway.pricing import CreditTerms, Pricing, Rule
from gateway.service import (
    Allow,
    Decision,
    Deny,
    HoldExecutor,
    HoldTerms,
    L402Service,
    PaidToken,
    PaymentChallenge,
    RateLimiter,
    RedeemResult,
    RedeemState,
    Refusal,
    RequestInfo,
    RunFailed,
    on_success,
)
from gateway.service.on_success import (
    CLOCK_SKEW,
    INTERRUPTED,
    NODE_CANCELLED,
    NODE_FORGOT,
)
from gateway.store import MemoryStore
from gateway.store.memory import _MemoryTransaction
from tests.fakes import FakeClock, FakeInvoiceBackend

JOBS = "/api/jobs"
CLIENT = "203.0.113.9"
PRICE = Msat(5_000)
RULES = (
    Rule(
        "/api/jobs*",
        methods=frozenset({"POST"}),
        price_msat=PRICE,
        service="jobs",
        capabilities=frozenset({"run"}),
        settle_on_success=True,
    ),
    Rule(
        "/api/created",
        price_msat=PRICE,
        service="jobs",
        settle_on_success=True,
        settle_statuses=frozenset({201}),
    ),
    Rule("/api/plain", price_msat=PRICE, service="jobs"),
)
TERMS = HoldTerms(backend_timeout=0.2, max_outstanding=4, max_outstanding_per_client=2)
WAIT = 5.0  # real seconds a test waits for the executor
# How long a RUNNING row stays untouched before an executor that did not run it fails it.
ABANDONED_AFTER = TERMS.backend_timeout + on_success.STOP_MARGIN + CLOCK_SKEW


class FakeRunner:
    """The backend, as the executor reaches it: answers ``response``, or raises ``failure``
    (``failures``' for their targets); ``gate`` (when set) holds every run until it is set;
    ``calls`` records each run."""

    def __init__(self) -> None:
        self.response = StoredResponse(201, (("content-type", "text/plain"),), b"job 1 done")
        self.failure: Exception | None = None
        self.failures: dict[str, Exception] = {}
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()
        self.calls: list[tuple[StoredRequest, PaidToken, float, int]] = []

    async def run(
        self,
        request: StoredRequest,
        token: PaidToken,
        *,
        timeout: float,  # noqa: ASYNC109 - the protocol's
        max_response_bytes: int,
    ) -> StoredResponse:
        self.calls.append((request, token, timeout, max_response_bytes))
        if (failure := self.failures.get(request.target)) is not None:
            raise failure
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        return self.response


class Env:
    """A service with pay-on-success routes, and its executor over the same fakes."""

    def __init__(
        self,
        rules: Sequence[Rule] = RULES,
        *,
        terms: HoldTerms | None = TERMS,
        store: MemoryStore | None = None,
        clock: FakeClock | None = None,
        backend: FakeInvoiceBackend | None = None,
        ipv6_prefix: int | None = None,
    ) -> None:
        self.clock = clock or FakeClock()
        self.backend = backend or FakeInvoiceBackend(self.clock)
        self.store = store or MemoryStore()
        self.runner = FakeRunner()
        self.terms = terms or HoldTerms()
        self.pricing = Pricing(rules)
        self.woken = 0
        self.service = L402Service(
            pricing=self.pricing,
            backend=self.backend,
            store=self.store,
            clock=self.clock,
            hold_backend=self.backend,
            hold=terms,
            on_held=self._woke,
            rate_limiter=None
            if ipv6_prefix is None
            else RateLimiter(1000.0, 1000, 1000, self.clock, ipv6_prefix),
        )

    def _woke(self) -> None:
        self.woken += 1

    def executor(self, stop_margin: float = on_success.STOP_MARGIN) -> HoldExecutor:
        return HoldExecutor(
            backend=self.backend,
            store=self.store,
            clock=self.clock,
            runner=self.runner,
            pricing=self.pricing,
            terms=self.terms,
            poll_interval=0.01,
            initial_backoff=0.01,
            max_backoff=0.05,
            stop_margin=stop_margin,
        )

    @contextlib.asynccontextmanager
    async def running(self, count: int = 1) -> AsyncIterator[list[HoldExecutor]]:
        executors = [self.executor() for _ in range(count)]
        tasks = [asyncio.create_task(executor.run()) for executor in executors]
        try:
            yield executors
        finally:
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for result in results:
                if not isinstance(result, asyncio.CancelledError):
                    raise AssertionError(f"the executor ended: {result!r}")

    async def ask(
        self,
        path: str = JOBS,
        authorization: Sequence[str] = (),
        *,
        method: str = "POST",
        query: str = "",
        client: str = CLIENT,
        body: bytes = b'{"job": 1}',
        loader: Callable[[], Awaitable[StoredRequest | Deny]] | bool | None = True,
        raw_target: str = "",
    ) -> Decision:
        """``raw_target``: the path and query as received, when the adapter gives them (then
        ``query`` is the decoded query)."""
        target = raw_target or (f"{path}?{query}" if query else path)

        async def load() -> StoredRequest | Deny:
            return StoredRequest(method, target, (("content-type", "application/json"),), body)

        stored_request = load if loader is True else (loader or None)
        return await self.service.authorize(
            RequestInfo(
                method,
                path,
                client,
                tuple(authorization),
                query,
                stored_request=stored_request,
                target=raw_target,
            )
        )

    async def challenge(self, path: str = JOBS, **kwargs: Any) -> PaymentChallenge:
        decision = await self.ask(path, **kwargs)
        assert isinstance(decision, PaymentChallenge), decision
        return decision

    async def state(self, challenge: PaymentChallenge) -> HeldState | None:
        held = await self.store.get_held_request(_hash(challenge))
        return None if held is None else held.state

    async def until_state(self, challenge: PaymentChallenge, *states: HeldState) -> None:
        async def reached() -> bool:
            return await self.state(challenge) in states

        await eventually(reached)

    async def credential(self, challenge: PaymentChallenge) -> str:
        """What the payer learns once its payment settles: the preimage, from the node."""
        invoice = await self.backend.lookup_invoice(_hash(challenge))
        assert invoice.state is InvoiceState.SETTLED
        assert invoice.preimage is not None
        return f"L402 {challenge.macaroon}:{invoice.preimage.hex()}"

    async def redeem(self, challenge: PaymentChallenge) -> RedeemResult:
        result = await self.service.redeem(challenge.macaroon, client=CLIENT)
        assert isinstance(result, RedeemResult), result
        return result


async def eventually(condition: Callable[[], Awaitable[bool]]) -> None:
    """Wait until ``condition`` holds: the executor works in tasks of its own."""
    async with asyncio.timeout(WAIT):
        while not await condition():  # noqa: ASYNC110 - the executor sets no event to wait on
            await asyncio.sleep(0.005)


async def _now(value: bool) -> bool:
    return value


def _hash(challenge: PaymentChallenge) -> PaymentHash:
    return PaymentHash(bytes.fromhex(challenge.payment_hash))


async def _paid_and_run(env: Env, *states: HeldState) -> PaymentChallenge:
    challenge = await env.challenge()
    env.backend.hold_payment(_hash(challenge))
    await env.until_state(challenge, *states)
    return challenge


# --- rules -----------------------------------------------------------------------------


def test_a_pay_on_success_rule_settles_on_2xx_or_its_statuses() -> None:
    any_2xx = Rule("/a", price_msat=PRICE, settle_on_success=True)
    assert [any_2xx.settles(s) for s in (200, 204, 299, 300, 404, 503)] == [
        True,
        True,
        True,
        False,
        False,
        False,
    ]
    only_202 = Rule(
        "/a", price_msat=PRICE, settle_on_success=True, settle_statuses=frozenset({202})
    )
    assert [only_202.settles(s) for s in (200, 202, 404)] == [False, True, False]
    assert Pricing([any_2xx]).settles_on_success
    assert not Pricing([Rule("/a", price_msat=PRICE)]).settles_on_success


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (
            {
                "settle_on_success": True,
                "credit": CreditTerms(Msat(1000), Msat(1000), Msat(1000)),
            },
            "credit",
        ),
        ({"settle_statuses": frozenset({201})}, "settle_statuses need"),
        ({"settle_on_success": True, "settle_statuses": frozenset({500})}, "200 to 499"),
        ({"settle_on_success": True, "settle_statuses": frozenset({199})}, "200 to 499"),
    ],
)
def test_rule_validation(options: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        Rule("/a", price_msat=PRICE, **options)


def test_a_free_route_cannot_settle_on_success() -> None:
    with pytest.raises(ValueError, match="needs a price"):
        Rule("/a", settle_on_success=True)


# --- the paid token's grant --------------------------------------------------------------


@pytest.mark.parametrize("capabilities", [None, frozenset(), frozenset({"run", "read"})])
@pytest.mark.parametrize("valid_until", [None, 1_800_003_600])
def test_paid_token_grant_round_trip(
    capabilities: frozenset[str] | None, valid_until: int | None
) -> None:
    token = PaidToken("ab" * 32, "cd" * 32, "jobs", 2, capabilities, valid_until, 5000)
    assert PaidToken.from_grant(token.grant()) == token


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[]",
        '{"token_id": "ab"}',
        '{"token_id":1,"payment_hash":"x","service":"s","tier":0,"capabilities":null,'
        '"valid_until":null,"amount_msat":1}',
        '{"token_id":"a","payment_hash":"x","service":"s","tier":true,"capabilities":null,'
        '"valid_until":null,"amount_msat":1}',
        '{"token_id":"a","payment_hash":"x","service":"s","tier":0,"capabilities":[1],'
        '"valid_until":null,"amount_msat":1}',
    ],
)
def test_a_bad_grant_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError, match=r"grant|Expecting|JSON"):
        PaidToken.from_grant(text)


# --- the hold challenge ------------------------------------------------------------------


async def test_the_challenge_stores_the_request_with_a_hold_invoice() -> None:
    env = Env()
    challenge = await env.challenge(query="size=2")
    assert challenge.settle_timeout == TERMS.backend_timeout
    assert challenge.amount_msat == PRICE
    assert challenge.expires_at == env.clock.now() + TERMS.invoice_expiry
    payment_hash = _hash(challenge)
    assert env.backend.hold_invoices[payment_hash] == TERMS.cltv_expiry
    assert env.backend.invoices[payment_hash].expiry == TERMS.invoice_expiry
    held = await env.store.get_held_request(payment_hash)
    assert held is not None
    assert held.state is HeldState.WAITING
    assert held.request == StoredRequest(
        "POST", "/api/jobs?size=2", (("content-type", "application/json"),), b'{"job": 1}'
    )
    assert hashlib.sha256(held.preimage).digest() == payment_hash
    assert held.client == CLIENT
    assert held.expires_at == challenge.expires_at
    token = PaidToken.from_grant(held.grant)
    identifier = l402.Identifier.decode(l402.decode_b64(challenge.macaroon).identifier)
    assert token.token_id == identifier.token_id.hex() == held.token_id.hex()
    assert token.payment_hash == challenge.payment_hash
    assert (token.service, token.capabilities, token.amount_msat) == (
        "jobs",
        frozenset({"run"}),
        PRICE,
    )
    assert token.valid_until == int(env.clock.now()) + 3600
    record = await env.store.get_invoice(payment_hash)
    assert record is not None
    assert (record.state, record.method, record.path) == (InvoiceState.OPEN, "POST", JOBS)
    assert env.woken == 1


async def test_without_hold_terms_or_a_request_loader_it_is_501() -> None:
    without_terms = Env(terms=None)
    refused = await without_terms.ask()
    assert refused == Deny(501, Refusal.HOLD_UNAVAILABLE)
    env = Env()
    assert await env.ask(loader=None) == Deny(501, Refusal.HOLD_UNAVAILABLE)
    assert env.backend.invoices == {}
    assert isinstance(await env.ask("/api/plain", method="GET", loader=None), PaymentChallenge)


async def test_a_refused_request_body_creates_no_invoice() -> None:
    env = Env()
    too_big = Deny(413, "body over 65536 bytes: this route keeps the request until it is paid")

    async def refuse() -> StoredRequest | Deny:
        return too_big

    assert await env.ask(loader=refuse) == too_big
    assert env.backend.invoices == {}
    assert await env.store.list_held_requests(frozenset(HeldState), 10) == []


async def test_pending_requests_are_capped_per_client_and_overall() -> None:
    env = Env(terms=HoldTerms(max_outstanding=5, max_outstanding_per_client=2))
    for _ in range(2):
        await env.challenge()
    refused = await env.ask()
    assert isinstance(refused, Deny)
    assert (refused.status, refused.reason) == (429, Refusal.TOO_MANY_HELD_FOR_CLIENT)
    assert refused.retry_after is not None
    # One client, however many addresses of its /64.
    await env.challenge(client="2001:db8::1")
    await env.challenge(client="2001:db8::2")
    third = await env.ask(client="2001:db8::3")
    assert isinstance(third, Deny)
    assert third.status == 429
    await env.challenge(client="198.51.100.1")
    full = await env.ask(client="198.51.100.2")
    assert isinstance(full, Deny)
    assert (full.status, full.reason) == (503, Refusal.TOO_MANY_HELD)
    assert full.retry_after is not None
    assert len(env.backend.invoices) == 5
    # A finished request frees its slot.
    first = await env.store.list_held_requests(frozenset({HeldState.WAITING}), 1)
    await env.store.move_held_request(
        first[0].payment_hash, HeldState.EXPIRED, env.clock.now(), keep_until=env.clock.now()
    )
    assert isinstance(await env.ask(client="198.51.100.2"), PaymentChallenge)


async def test_the_caps_hold_for_concurrent_challenges() -> None:
    env = Env()

    async def slow_body() -> StoredRequest | Deny:
        await asyncio.sleep(0.01)  # every challenge passes the first count meanwhile
        return StoredRequest("POST", JOBS, (), b"{}")

    decisions = await asyncio.gather(*(env.ask(loader=slow_body) for _ in range(6)))
    challenges = [d for d in decisions if isinstance(d, PaymentChallenge)]
    refusals = [d for d in decisions if isinstance(d, Deny)]
    assert len(challenges) == TERMS.max_outstanding_per_client
    assert {(d.status, d.reason) for d in refusals} == {(429, Refusal.TOO_MANY_HELD_FOR_CLIENT)}
    assert await env.store.count_held_requests(frozenset({HeldState.WAITING})) == 2
    # The invoices made for the refused ones are cancelled at once.
    states = [invoice.state for invoice in env.backend.invoices.values()]
    assert sorted(state.value for state in states) == ["CANCELED"] * 4 + ["OPEN"] * 2


async def test_a_store_failure_at_the_challenge_cancels_its_hold_invoice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = Env()

    async def broken(*args: object) -> None:
        raise errors.StoreError("disk on fire")

    monkeypatch.setattr(_MemoryTransaction, "add_held_request", broken)
    assert await env.ask() == Deny(503, Refusal.STORE_UNAVAILABLE, retry_after=5)
    [invoice] = env.backend.invoices.values()
    assert invoice.state is InvoiceState.CANCELED
    assert await env.store.get_invoice(invoice.payment_hash) is None  # rolled back


# --- the executor: run once, settle or cancel ---------------------------------------------


async def test_success_settles_and_the_response_is_replayed() -> None:
    env = Env()
    async with env.running():
        challenge = await _paid_and_run(env, HeldState.SETTLED)
    payment_hash = _hash(challenge)
    assert env.backend.settled[payment_hash] == 1
    assert env.backend.invoices[payment_hash].state is InvoiceState.SETTLED
    [(request, token, timeout, limit)] = env.runner.calls
    assert request.target == JOBS
    assert request.body == b'{"job": 1}'
    assert token.payment_hash == challenge.payment_hash
    assert (timeout, limit) == (TERMS.backend_timeout, TERMS.max_response_bytes)
    held = await env.store.get_held_request(payment_hash)
    assert held is not None
    assert held.response == env.runner.response
    assert held.keep_until == env.clock.now() + TERMS.response_retention

    credential = await env.credential(challenge)
    for _ in range(3):  # a retry, and the retries after it: the stored answer every time
        decision = await env.ask(authorization=[credential], body=b"another body")
        assert isinstance(decision, Allow), decision
        assert decision.replay == env.runner.response
        assert decision.token is not None
        assert decision.token.payment_hash == challenge.payment_hash
    assert len(env.runner.calls) == 1
    assert env.service.allowed_again((credential,), "POST", JOBS) is None
    delivered = await env.store.get_held_request(payment_hash)
    assert delivered is not None
    assert delivered.delivered_at == env.clock.now()
    assert delivered.keep_until == env.clock.now() + TERMS.delivered_retention


@pytest.mark.parametrize(
    ("status", "path", "settles"),
    [(503, JOBS, False), (404, JOBS, False), (204, JOBS, True), (200, "/api/created", False)],
)
async def test_the_answer_decides_settle_or_cancel(status: int, path: str, settles: bool) -> None:
    env = Env()
    env.runner.response = StoredResponse(status, (), b"answer")
    async with env.running():
        challenge = await env.challenge(path)
        env.backend.hold_payment(_hash(challenge))
        await env.until_state(challenge, HeldState.SETTLED, HeldState.CANCELED)
    held = await env.store.get_held_request(_hash(challenge))
    assert held is not None
    invoice = env.backend.invoices[_hash(challenge)]
    record = await env.store.get_invoice(_hash(challenge))
    assert record is not None
    if settles:
        assert held.state is HeldState.SETTLED
        assert invoice.state is InvoiceState.SETTLED
    else:
        assert held.state is HeldState.CANCELED
        assert held.failure == f"backend failed with {status}"
        assert held.response is None  # never replayed: its failure names the status
        assert invoice.state is InvoiceState.CANCELED
        assert record.state is InvoiceState.CANCELED
        assert env.backend.settled[_hash(challenge)] == 0


@pytest.mark.parametrize(
    ("failure", "text"),
    [
        (RunFailed("backend unreachable"), "backend unreachable"),
        (RunFailed("response over 1048576 bytes"), "response over 1048576 bytes"),
        (None, "backend timed out after 0.2 s"),
    ],
)
async def test_no_answer_cancels(failure: RunFailed | None, text: str) -> None:
    env = Env()
    env.runner.failure = failure
    if failure is None:
        env.runner.gate = asyncio.Event()  # never set: the backend does not answer
    async with env.running():
        challenge = await _paid_and_run(env, HeldState.CANCELED)
    held = await env.store.get_held_request(_hash(challenge))
    assert held is not None
    assert held.failure == text
    assert held.response is None
    assert env.backend.invoices[_hash(challenge)].state is InvoiceState.CANCELED


async def test_a_response_over_the_limit_cancels() -> None:
    env = Env(terms=HoldTerms(backend_timeout=1.0, max_response_bytes=4))
    async with env.running():
        challenge = await _paid_and_run(env, HeldState.CANCELED)
    held = await env.store.get_held_request(_hash(challenge))
    assert held is not None
    assert held.failure == "response over 4 bytes"


async def test_a_refunded_payer_gets_a_402_and_redeem_says_refunded() -> None:
    env = Env()
    env.runner.response = StoredResponse(503, (), b"down")
    async with env.running():
        challenge = await _paid_and_run(env, HeldState.CANCELED)
    result = await env.redeem(challenge)
    assert (result.state, result.failure) == (RedeemState.REFUNDED, "backend failed with 503")
    assert result.credential is None
    # Whatever preimage it tries, the cancelled payment's macaroon buys a fresh challenge.
    replayed = f"L402 {challenge.macaroon}:{'00' * 32}"
    decision = await env.ask(authorization=[replayed])
    assert isinstance(decision, PaymentChallenge), decision
    assert decision.reason is l402.ChallengeReason.REFUNDED
    assert decision.payment_hash != challenge.payment_hash
    # A stranger's bad credential is still a 401.
    stranger = await env.challenge(client="198.51.100.4")
    refused = await env.ask(authorization=[f"L402 {stranger.macaroon}:{'00' * 32}"])
    assert isinstance(refused, Deny)
    assert refused.status == 401


async def test_the_request_runs_once_when_two_executors_race() -> None:
    env = Env()
    env.runner.gate = asyncio.Event()
    async with env.running(2):
        challenge = await env.challenge()
        await eventually(lambda: _now(env.backend.live_single_streams == 2))  # both follow it
        env.backend.hold_payment(_hash(challenge))
        await env.runner.started.wait()
        await asyncio.sleep(0.05)  # the other executor had every chance to run it too
        env.runner.gate.set()
        await env.until_state(challenge, HeldState.SETTLED)
        await asyncio.sleep(0.05)
    assert len(env.runner.calls) == 1
    assert env.backend.settled[_hash(challenge)] == 1


async def test_a_second_executor_leaves_a_request_under_way_to_its_runner() -> None:
    # A new leader (or a second watch process) while the first still runs the request: it
    # neither runs it again nor refunds it; the first's answer is settled, once.
    env = Env()
    env.runner.gate = asyncio.Event()
    async with env.running():
        challenge = await env.challenge()
        env.backend.hold_payment(_hash(challenge))
        await env.runner.started.wait()
        async with env.running():
            env.clock.advance(ABANDONED_AFTER - 1)  # the first runner may still be at it
            await asyncio.sleep(0.1)
            assert await env.state(challenge) is HeldState.RUNNING
            env.runner.gate.set()
            await env.until_state(challenge, HeldState.SETTLED)
    assert len(env.runner.calls) == 1
    assert env.backend.settled[_hash(challenge)] == 1


async def test_a_run_older_than_its_bound_is_cancelled_and_its_late_answer_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The first executor's store writes failed for longer than any run may take: the other
    # takes the request for abandoned and refunds it; the late answer is refused, and said so.
    env = Env()
    env.runner.gate = asyncio.Event()
    async with env.running():
        challenge = await env.challenge()
        env.backend.hold_payment(_hash(challenge))
        await env.runner.started.wait()
        async with env.running():
            env.clock.advance(ABANDONED_AFTER)
            await env.until_state(challenge, HeldState.CANCELED)
            env.runner.gate.set()
            await eventually(lambda: _now("after it was failed as interrupted" in caplog.text))
    held = await env.store.get_held_request(_hash(challenge))
    assert held is not None
    assert (held.state, held.failure) == (HeldState.CANCELED, INTERRUPTED)
    assert len(env.runner.calls) == 1
    assert env.backend.settled[_hash(challenge)] == 0
    assert env.backend.invoices[_hash(challenge)].state is InvoiceState.CANCELED


class _LosesAReply(MemoryStore):
    """A store whose first move to ``state`` commits, then fails (a connection lost before
    the commit's reply): its caller cannot know the move was made. Counts the row reads."""

    def __init__(self, state: HeldState) -> None:
        super().__init__()
        self.state = state
        self.lost = False
        self.reads = 0

    async def get_held_request(self, payment_hash: PaymentHash) -> HeldRequest | None:
        self.reads += 1
        return await super().get_held_request(payment_hash)

    async def move_held_request(
        self, payment_hash: PaymentHash, state: HeldState, now: float, **kwargs: Any
    ) -> HeldRequest | None:
        moved = await super().move_held_request(payment_hash, state, now, **kwargs)
        if state is self.state and not self.lost:
            self.lost = True
            raise errors.StoreError("connection lost before the commit's reply")
        return moved


async def test_a_request_whose_move_to_running_was_lost_is_cancelled_without_a_restart() -> None:
    store = _LosesAReply(HeldState.RUNNING)
    env = Env(store=store)
    async with env.running():
        challenge = await env.challenge()
        env.backend.hold_payment(_hash(challenge))
        await eventually(lambda: _now(store.lost))
        reads = store.reads
        await asyncio.sleep(0.2)
        assert await env.state(challenge) is HeldState.RUNNING  # never ran, but who knows
        assert store.reads - reads < 10  # read again now and then, not in a loop
        env.clock.advance(ABANDONED_AFTER)
        await env.until_state(challenge, HeldState.CANCELED)
    held = await env.store.get_held_request(_hash(challenge))
    assert held is not None
    assert held.failure == INTERRUPTED
    assert env.runner.calls == []
    assert env.backend.invoices[_hash(challenge)].state is InvoiceState.CANCELED


async def test_a_stop_does_not_wait_for_a_request_it_only_watches() -> None:
    store = _LosesAReply(HeldState.RUNNING)
    env = Env(store=store)
    task = asyncio.create_task(env.executor().run())  # a stop's grace: 10.2 s
    challenge = await env.challenge()
    env.backend.hold_payment(_hash(challenge))
    await eventually(lambda: _now(store.lost))
    reads = store.reads
    # Read twice since: the tracker is past its first look and watching the row.
    await eventually(lambda: _now(store.reads >= reads + 2))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(1.0):
            await task
    assert await env.state(challenge) is HeldState.RUNNING  # the next executor's to cancel


async def test_an_answer_whose_reply_was_lost_is_settled_once_and_not_called_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    store = _LosesAReply(HeldState.SUCCEEDED)
    env = Env(store=store)
    async with env.running():
        challenge = await _paid_and_run(env, HeldState.SETTLED)
    assert store.lost
    assert env.backend.settled[_hash(challenge)] == 1
    assert len(env.runner.calls) == 1
    assert "ran: backend answered 201" in caplog.text
    assert "failed as interrupted" not in caplog.text


async def test_settle_is_retried_while_the_node_is_down() -> None:
    env = Env()
    env.runner.gate = asyncio.Event()
    async with env.running():
        challenge = await env.challenge()
        env.backend.hold_payment(_hash(challenge))
        await env.runner.started.wait()
        env.backend.unavailable = True
        env.runner.gate.set()
        await env.until_state(challenge, HeldState.SUCCEEDED)
        await asyncio.sleep(0.1)
        assert await env.state(challenge) is HeldState.SUCCEEDED
        env.backend.unavailable = False
        await env.until_state(challenge, HeldState.SETTLED)
    assert env.backend.settled[_hash(challenge)] == 1
    assert len(env.runner.calls) == 1


async def test_the_preimage_is_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    env = Env()
    async with env.running():
        challenge = await _paid_and_run(env, HeldState.SETTLED)
    held = await env.store.get_held_request(_hash(challenge))
    assert held is not None
    assert held.preimage.hex() not in caplog.text
    assert "settled" in caplog.text


# --- recovery after a stop ------------------------------------------------------------------


async def _held_in(env: Env, state: HeldState, **move: Any) -> PaymentChallenge:
    """A paid request left in ``state`` by a gateway that stopped (no executor ran)."""
    challenge = await env.challenge(client=f"198.51.100.{len(env.backend.invoices) + 1}")
    env.backend.hold_payment(_hash(challenge))
    now = env.clock.now()
    path = {
        HeldState.RUNNING: [HeldState.RUNNING],
        HeldState.SUCCEEDED: [HeldState.RUNNING, HeldState.SUCCEEDED],
        HeldState.FAILED: [HeldState.RUNNING, HeldState.FAILED],
        HeldState.WAITING: [],
    }[state]
    for step in path:
        args = move if step is state else {}
        assert await env.store.move_held_request(_hash(challenge), step, now, **args)
    return challenge


async def test_recovery_finishes_every_unfinished_state() -> None:
    env = Env()
    interrupted = await _held_in(env, HeldState.RUNNING)
    answered = await _held_in(
        env, HeldState.SUCCEEDED, response=StoredResponse(200, (), b"done before the stop")
    )
    failed = await _held_in(env, HeldState.FAILED, failure="backend failed with 500")
    paid_unseen = await _held_in(env, HeldState.WAITING)
    async with env.running():
        for challenge in (answered, failed, paid_unseen):
            await env.until_state(challenge, HeldState.SETTLED, HeldState.CANCELED)
        # Its runner might be another process still at it, until no run can last longer.
        assert await env.state(interrupted) is HeldState.RUNNING
        env.clock.advance(ABANDONED_AFTER)
        await env.until_state(interrupted, HeldState.CANCELED)
    states = {
        name: await env.store.get_held_request(_hash(challenge))
        for name, challenge in [
            ("interrupted", interrupted),
            ("answered", answered),
            ("failed", failed),
            ("paid_unseen", paid_unseen),
        ]
    }
    assert {name: (h.state, h.failure) for name, h in states.items() if h is not None} == {
        "interrupted": (HeldState.CANCELED, INTERRUPTED),
        "answered": (HeldState.SETTLED, ""),
        "failed": (HeldState.CANCELED, "backend failed with 500"),
        "paid_unseen": (HeldState.SETTLED, ""),
    }
    # Only the request nobody had started ran: the interrupted one never runs again.
    assert [call[0].target for call in env.runner.calls] == [JOBS]
    assert env.backend.settled[_hash(answered)] == 1
    for challenge in (interrupted, failed):
        assert env.backend.invoices[_hash(challenge)].state is InvoiceState.CANCELED
        record = await env.store.get_invoice(_hash(challenge))
        assert record is not None
        assert record.state is InvoiceState.CANCELED


async def test_a_settle_already_made_before_the_stop_is_recognised() -> None:
    env = Env()
    challenge = await _held_in(env, HeldState.SUCCEEDED, response=StoredResponse(200, (), b""))
    held = await env.store.get_held_request(_hash(challenge))
    assert held is not None
    await env.backend.settle_invoice(held.preimage)  # settled, then the gateway stopped
    async with env.running():
        await env.until_state(challenge, HeldState.SETTLED)
    assert env.backend.settled[_hash(challenge)] == 1


async def test_a_held_payment_the_node_cancelled_is_recorded_as_such() -> None:
    env = Env()
    challenge = await _held_in(env, HeldState.SUCCEEDED, response=StoredResponse(200, (), b""))
    env.backend.cancel(_hash(challenge))  # the HTLC came close to its expiry
    async with env.running():
        await env.until_state(challenge, HeldState.CANCELED)
    held = await env.store.get_held_request(_hash(challenge))
    assert held is not None
    assert held.failure == NODE_CANCELLED
    assert env.backend.settled[_hash(challenge)] == 0


# --- unpaid ------------------------------------------------------------------------------------


async def test_an_unpaid_invoice_is_cancelled_past_its_expiry() -> None:
    env = Env()
    async with env.running():
        challenge = await env.challenge()
        await asyncio.sleep(0.05)
        assert await env.state(challenge) is HeldState.WAITING
        env.clock.advance(TERMS.invoice_expiry + CLOCK_SKEW)
        await env.until_state(challenge, HeldState.EXPIRED)
    held = await env.store.get_held_request(_hash(challenge))
    assert held is not None
    assert held.failure == "invoice expired unpaid"
    assert held.request == StoredRequest("POST", JOBS, (), b"")  # what a replay must match
    assert env.backend.invoices[_hash(challenge)].state is InvoiceState.CANCELED
    assert env.runner.calls == []
    assert (await env.redeem(challenge)).state is RedeemState.EXPIRED


async def test_an_invoice_the_node_cancelled_unpaid_expires() -> None:
    env = Env()
    async with env.running():
        challenge = await env.challenge()
        await asyncio.sleep(0.05)
        env.backend.cancel(_hash(challenge))
        await env.until_state(challenge, HeldState.EXPIRED)
    assert env.runner.calls == []
    record = await env.store.get_invoice(_hash(challenge))
    assert record is not None
    assert record.state is InvoiceState.CANCELED


async def test_trackers_are_bounded_by_max_outstanding() -> None:
    env = Env(terms=HoldTerms(max_outstanding=2, max_outstanding_per_client=2))
    wide = Env(store=env.store, clock=env.clock, backend=env.backend, terms=TERMS)
    challenges = [await wide.challenge(client=f"198.51.100.{n}") for n in range(3)]
    async with env.running():
        await asyncio.sleep(0.1)
        assert env.backend.live_single_streams == 2
        env.backend.hold_payment(_hash(challenges[0]))
        await env.until_state(challenges[0], HeldState.SETTLED)
        # The freed slot follows the third.
        await eventually(
            lambda: _now(
                env.backend.live_single_streams == 2 and env.backend.single_subscriptions == 3
            )
        )


# --- replay: another request, a forgotten response ------------------------------------------


async def test_another_request_with_the_token_is_409_and_a_pruned_response_410() -> None:
    env = Env()
    async with env.running():
        challenge = await _paid_and_run(env, HeldState.SETTLED)
    credential = await env.credential(challenge)
    other = await env.ask("/api/jobs/2", authorization=[credential])
    assert other == Deny(409, Refusal.PAID_FOR_ANOTHER_REQUEST)
    assert isinstance(await env.ask(authorization=[credential]), Allow)
    env.clock.advance(TERMS.delivered_retention + 1)  # delivered: kept a short while more
    async with env.running():  # the executor prunes what is past keeping

        async def pruned() -> bool:
            return await env.state(challenge) is None

        await eventually(pruned)
    gone = await env.ask(authorization=[credential])
    assert gone == Deny(410, Refusal.RESPONSE_GONE)


async def test_a_token_bought_on_an_ordinary_route_buys_no_held_response() -> None:
    env = Env()
    challenge = await env.challenge("/api/plain", method="GET", loader=None)
    preimage = env.backend.pay(_hash(challenge))
    decision = await env.ask(authorization=[f"L402 {challenge.macaroon}:{preimage.hex()}"])
    assert isinstance(decision, PaymentChallenge), decision
    assert decision.settle_timeout == TERMS.backend_timeout


# --- redeem --------------------------------------------------------------------------------------


async def test_redeem_follows_the_held_request() -> None:
    env = Env()
    env.runner.gate = asyncio.Event()
    async with env.running():
        challenge = await env.challenge()
        assert (await env.redeem(challenge)).state is RedeemState.PENDING
        env.backend.hold_payment(_hash(challenge))
        await env.until_state(challenge, HeldState.RUNNING)
        assert (await env.redeem(challenge)).state is RedeemState.PENDING
        env.runner.gate.set()
        await env.until_state(challenge, HeldState.SETTLED)
    result = await env.redeem(challenge)
    assert result.state is RedeemState.SETTLED
    assert result.credential is not None
    macaroon, _, preimage = result.credential.rpartition(":")
    assert hashlib.sha256(bytes.fromhex(preimage)).digest() == _hash(challenge)
    decision = await env.ask(authorization=[f"L402 {macaroon}:{preimage}"])
    assert isinstance(decision, Allow)
    assert decision.replay == env.runner.response


async def test_redeem_of_a_held_request_before_its_answer_is_stored() -> None:
    env = Env()
    challenge = await _held_in(env, HeldState.SUCCEEDED)
    assert (await env.redeem(challenge)).state is RedeemState.PENDING


async def test_redeem_of_a_failed_request_being_cancelled_says_refunded() -> None:
    env = Env()
    challenge = await _held_in(env, HeldState.FAILED, failure="backend failed with 500")
    result = await env.redeem(challenge)
    assert (result.state, result.failure) == (RedeemState.REFUNDED, "backend failed with 500")
    assert result.credential is None


async def test_a_store_failure_while_replaying_is_503() -> None:
    class Broken(MemoryStore):
        async def get_held_request(self, payment_hash: PaymentHash) -> Any:
            raise errors.StoreError("disk on fire")

    env = Env(store=Broken())
    challenge = await env.challenge()
    decision = await env.ask(authorization=[f"L402 {challenge.macaroon}:{'00' * 32}"])
    assert decision == Deny(503, Refusal.STORE_UNAVAILABLE, retry_after=5)


async def test_a_broken_invoice_stream_is_followed_again() -> None:
    env = Env()
    async with env.running():
        challenge = await env.challenge()
        await eventually(lambda: _now(env.backend.live_single_streams == 1))
        env.backend.disconnect()
        await eventually(lambda: _now(env.backend.single_subscriptions >= 2))
        env.backend.hold_payment(_hash(challenge))
        await env.until_state(challenge, HeldState.SETTLED)
    assert len(env.runner.calls) == 1


async def test_an_unexpected_failure_ends_run_and_the_restart_cancels() -> None:
    env = Env()
    env.runner.failure = RuntimeError("a bug in the runner")
    executor = env.executor()
    challenge = await env.challenge()
    env.backend.hold_payment(_hash(challenge))
    with pytest.raises(RuntimeError, match="a bug in the runner"):
        async with asyncio.timeout(WAIT):
            await executor.run()
    assert await env.state(challenge) is HeldState.RUNNING  # as a crash would leave it
    env.runner.failure = None
    env.clock.advance(ABANDONED_AFTER)
    async with env.running():  # what the supervisor's restart does
        await env.until_state(challenge, HeldState.CANCELED)
    held = await env.store.get_held_request(_hash(challenge))
    assert held is not None
    assert held.failure == INTERRUPTED
    assert len(env.runner.calls) == 1
    assert env.backend.invoices[_hash(challenge)].state is InvoiceState.CANCELED


async def test_an_unexpected_failure_lets_the_requests_under_way_finish() -> None:
    env = Env(terms=HoldTerms(backend_timeout=5.0))
    runner = env.runner
    runner.gate = asyncio.Event()
    runner.failures[JOBS + "/bug"] = RuntimeError("a bug in the runner")
    task = asyncio.create_task(env.executor().run())
    under_way = await env.challenge()
    env.backend.hold_payment(_hash(under_way))
    await runner.started.wait()
    buggy = await env.challenge(JOBS + "/bug", client="198.51.100.30")
    env.backend.hold_payment(_hash(buggy))
    await eventually(lambda: _now(len(runner.calls) == 2))  # the bug raised
    await asyncio.sleep(0.1)  # a run() cut short would have ended by now
    assert not task.done()  # ending, but the request under way is let finish first
    runner.gate.set()
    with pytest.raises(RuntimeError, match="a bug in the runner"):
        async with asyncio.timeout(WAIT):
            await task
    assert await env.state(under_way) is HeldState.SETTLED
    assert env.backend.settled[_hash(under_way)] == 1


async def test_a_new_request_wakes_the_executor_before_its_next_poll() -> None:
    env = Env()
    executor = HoldExecutor(
        backend=env.backend,
        store=env.store,
        clock=env.clock,
        runner=env.runner,
        pricing=env.pricing,
        terms=env.terms,
        poll_interval=60.0,
    )
    service = L402Service(
        pricing=env.pricing,
        backend=env.backend,
        store=env.store,
        clock=env.clock,
        hold_backend=env.backend,
        hold=env.terms,
        on_held=executor.wake,
    )
    task = asyncio.create_task(executor.run())
    try:
        await asyncio.sleep(0.05)  # past its first look, now waiting out the poll
        env.service = service
        await env.challenge()
        await eventually(lambda: _now(env.backend.live_single_streams == 1))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_cookie_credential_gets_the_stored_response() -> None:
    env = Env()
    async with env.running():
        challenge = await _paid_and_run(env, HeldState.SETTLED)
    cookie = (await env.redeem(challenge)).credential
    assert cookie is not None
    stale = f"{challenge.macaroon}:{'00' * 32}"
    decision = await env.service.authorize(
        RequestInfo("POST", JOBS, CLIENT, cookies=("garbage:zz", stale, cookie))
    )
    assert isinstance(decision, Allow), decision
    assert decision.replay == env.runner.response
    # A cookie that does not verify is ignored: a fresh challenge, never a 401.
    other = await env.challenge(client="198.51.100.7")
    refused = await env.service.authorize(
        RequestInfo(
            "POST",
            JOBS,
            "198.51.100.7",
            cookies=(f"{other.macaroon}:{'00' * 32}",),
            stored_request=_loader(),
        )
    )
    assert isinstance(refused, PaymentChallenge)
    assert refused.reason is l402.ChallengeReason.PAYMENT_REQUIRED


async def test_a_refunded_cookie_says_so_in_the_challenge() -> None:
    env = Env()
    env.runner.response = StoredResponse(500, (), b"")
    async with env.running():
        challenge = await _paid_and_run(env, HeldState.CANCELED)
    decision = await env.service.authorize(
        RequestInfo(
            "POST",
            JOBS,
            CLIENT,
            cookies=("garbage:zz", f"{challenge.macaroon}:{'00' * 32}"),
            stored_request=_loader(),
        )
    )
    assert isinstance(decision, PaymentChallenge), decision
    assert decision.reason is l402.ChallengeReason.REFUNDED


def _loader() -> Callable[[], Awaitable[StoredRequest | Deny]]:
    async def load() -> StoredRequest | Deny:
        return StoredRequest("POST", JOBS, (), b"")

    return load


# --- review findings ------------------------------------------------------------------------


async def test_a_backlog_of_finished_requests_is_pruned_without_waiting_a_minute(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(on_success, "PRUNE_BATCH", 2)
    monkeypatch.setattr(on_success, "PRUNE_BATCHES_PER_PASS", 2)
    env = Env(terms=HoldTerms(max_outstanding=10, max_outstanding_per_client=10))
    prunes: list[int] = []
    prune = env.store.prune_held_requests

    async def counted(now: float, limit: int) -> int:
        pruned = await prune(now, limit)
        prunes.append(pruned)
        return pruned

    monkeypatch.setattr(env.store, "prune_held_requests", counted)
    now = env.clock.now()
    for _ in range(7):
        challenge = await env.challenge()
        await env.store.move_held_request(
            _hash(challenge), HeldState.EXPIRED, now, keep_until=now - 1
        )
    async with env.running():  # the clock stands still: no minute passes

        async def drained() -> bool:
            return await env.store.count_held_requests(frozenset(HeldState)) == 0

        await eventually(drained)
    # Batches of 2, at most 2 a pass: the second pass came at the next look.
    assert prunes[:5] == [2, 2, 2, 1, 0][: len(prunes[:5])]
    assert sum(prunes) == 7


async def test_a_failed_answer_is_not_stored() -> None:
    env = Env()
    env.runner.response = StoredResponse(500, (), b"x" * 10_000)
    async with env.running():
        challenge = await _paid_and_run(env, HeldState.CANCELED)
    held = await env.store.get_held_request(_hash(challenge))
    assert held is not None
    assert (held.response, held.failure) == (None, "backend failed with 500")


@pytest.mark.parametrize("state", [HeldState.SUCCEEDED, HeldState.FAILED])
async def test_an_invoice_the_node_no_longer_knows_is_cancelled(state: HeldState) -> None:
    env = Env()
    move: dict[str, Any] = (
        {"response": StoredResponse(200, (), b"")}
        if state is HeldState.SUCCEEDED
        else {"failure": "backend failed with 500"}
    )
    challenge = await _held_in(env, state, **move)
    del env.backend.invoices[_hash(challenge)]  # say the node's database was replaced
    async with env.running():
        await env.until_state(challenge, HeldState.CANCELED)
    held = await env.store.get_held_request(_hash(challenge))
    assert held is not None
    assert held.failure == NODE_FORGOT
    assert await env.store.count_held_requests(HELD_UNFINISHED) == 0  # its cap slot is free
    record = await env.store.get_invoice(_hash(challenge))
    assert record is not None
    assert record.state is InvoiceState.CANCELED


@pytest.mark.parametrize("state", [HeldState.WAITING, HeldState.FAILED])
async def test_an_invoice_the_node_settled_itself_frees_its_cap_slot(state: HeldState) -> None:
    env = Env()
    challenge = await _held_in(env, state)
    held = await env.store.get_held_request(_hash(challenge))
    assert held is not None
    await env.backend.settle_invoice(held.preimage)  # by hand, outside the gateway
    async with env.running():
        await env.until_state(challenge, HeldState.CANCELED)
    final = await env.store.get_held_request(_hash(challenge))
    assert final is not None
    assert final.failure == SETTLED_BY_NODE
    assert final.keep_until is not None
    assert await env.store.count_held_requests(HELD_UNFINISHED) == 0
    assert env.runner.calls == []
    # The payer paid: its webhook says settled, never refunded.
    written = [
        event
        for event in await env.store.list_webhook_events(0, 100)
        if event.type.startswith("request.")
    ]
    assert [event.type for event in written] == ["request.settled"]
    assert SETTLED_BY_NODE in written[0].payload


async def test_a_stop_lets_the_running_request_finish_and_settle() -> None:
    env = Env(terms=HoldTerms(backend_timeout=5.0))
    env.runner.gate = asyncio.Event()
    executor = env.executor()
    task = asyncio.create_task(executor.run())
    unpaid = await env.challenge(client="198.51.100.20")
    paid = await env.challenge()
    env.backend.hold_payment(_hash(paid))
    await env.runner.started.wait()
    await eventually(lambda: _now(env.backend.live_single_streams == 1))  # the unpaid one's
    task.cancel()  # what the supervisor's stop does
    # The tracker waiting for a payment stops at once; the running one is let finish.
    await eventually(lambda: _now(env.backend.live_single_streams == 0))
    assert not task.done()
    env.runner.gate.set()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(WAIT):
            await task
    assert await env.state(paid) is HeldState.SETTLED
    assert env.backend.settled[_hash(paid)] == 1
    assert await env.state(unpaid) is HeldState.WAITING  # followed again at the next start


async def test_a_stop_waits_for_a_request_under_way_no_longer_than_its_bound() -> None:
    env = Env(terms=HoldTerms(backend_timeout=0.2))
    env.runner.gate = asyncio.Event()
    task = asyncio.create_task(env.executor(stop_margin=0.1).run())
    challenge = await env.challenge()
    env.backend.hold_payment(_hash(challenge))
    await env.runner.started.wait()
    task.cancel()
    env.backend.unavailable = True  # the settle cannot be made
    env.runner.gate.set()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(WAIT):
            await task
    assert loop.time() - started < 0.2 + 0.1 + 0.5
    # Answered but not settled: the next start settles it.
    assert await env.state(challenge) is HeldState.SUCCEEDED


async def test_the_token_replays_only_for_the_query_it_paid_for() -> None:
    env = Env()
    async with env.running():
        challenge = await env.challenge(query="size=2")
        env.backend.hold_payment(_hash(challenge))
        await env.until_state(challenge, HeldState.SETTLED)
    credential = await env.credential(challenge)
    other = await env.ask(authorization=[credential], query="size=3")
    assert other == Deny(409, Refusal.PAID_FOR_ANOTHER_REQUEST)
    same = await env.ask(authorization=[credential], query="size=2")
    assert isinstance(same, Allow)
    assert same.replay == env.runner.response
    held = await env.store.get_held_request(_hash(challenge))
    assert held is not None
    assert held.request == StoredRequest("POST", f"{JOBS}?size=2", (), b"")


async def test_the_raw_target_is_compared_exactly_when_the_adapter_gives_it() -> None:
    env = Env()
    raw = f"{JOBS}?q=a+b&r=%2541"
    async with env.running():
        challenge = await env.challenge(query="q=a b&r=%41", raw_target=raw)
        env.backend.hold_payment(_hash(challenge))
        await env.until_state(challenge, HeldState.SETTLED)
    credential = await env.credential(challenge)
    # As aiohttp decodes it ("+" as a space, "%25" as "%"): the same request.
    same = await env.ask(authorization=[credential], query="q=a b&r=%41", raw_target=raw)
    assert isinstance(same, Allow), same
    other = await env.ask(
        authorization=[credential], query="q=a b&r=%41", raw_target=f"{JOBS}?q=a%20b&r=%2541"
    )
    assert other == Deny(409, Refusal.PAID_FOR_ANOTHER_REQUEST)


async def test_polling_reads_payment_hashes_only(monkeypatch: pytest.MonkeyPatch) -> None:
    env = Env()
    rows_read: list[int] = []
    list_rows = env.store.list_held_requests

    async def counted(states: frozenset[HeldState], limit: int) -> Any:
        rows_read.append(limit)
        return await list_rows(states, limit)

    monkeypatch.setattr(env.store, "list_held_requests", counted)
    async with env.running():
        await _paid_and_run(env, HeldState.SETTLED)
        await asyncio.sleep(0.05)  # several polls
    assert rows_read == []


async def test_the_caps_key_ipv6_clients_by_the_configured_prefix() -> None:
    env = Env(ipv6_prefix=48)
    await env.challenge(client="2001:db8:0:1::1")
    await env.challenge(client="2001:db8:0:2::1")  # another /64, the same /48
    refused = await env.ask(client="2001:db8:0:3::1")
    assert isinstance(refused, Deny)
    assert (refused.status, refused.reason) == (429, Refusal.TOO_MANY_HELD_FOR_CLIENT)
    [held, _] = await env.store.list_held_requests(frozenset({HeldState.WAITING}), 10)
    assert held.client == "2001:db8::/48"
    assert isinstance(await env.ask(client="2001:db8:1::1"), PaymentChallenge)
