"""Pay on success (``settle = "on_success"`` routes): run a held request once, then settle or
cancel its hold invoice.

The challenge (``ChallengeIssuer``) stores the request with a hold invoice whose preimage
only the gateway knows. The ``HoldExecutor`` follows each such invoice on the node: once the
payer's HTLC is held (ACCEPTED), it runs the stored request against the backend once (only
the caller whose move to RUNNING the store grants runs it), stores the answer, and settles
the invoice if the answer is a success, else cancels it (the payer gets the money back).
Every step is written to the store before the next one, so after a crash the executor
finishes the job at start-up: a stored success is settled, a stored failure cancelled, and a
run left RUNNING is a failure (cancel) once it is older than any run can be (so a run another
executor still has under way is never refunded early); it never settles without a stored
successful answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar
from urllib.parse import unquote

from gateway import errors
from gateway.ports import (
    HELD_UNFINISHED,
    SETTLED_BY_NODE,
    Clock,
    HeldRequest,
    HeldState,
    HoldInvoiceBackend,
    Invoice,
    InvoiceBackend,
    InvoiceState,
    InvoiceUpdate,
    Msat,
    PaymentHash,
    Store,
    StoredRequest,
    StoredResponse,
)
from gateway.pricing import Pricing, Rule
from gateway.service.decisions import PaidToken

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Seconds two hosts' clocks (the gateway's, the node's, another instance's) may differ by:
# past its expiry an unpaid hold invoice is looked up after this many more seconds, and
# cancelled if the node still has it open.
CLOCK_SKEW = 5.0
PRUNE_INTERVAL = 60.0
PRUNE_BATCH = 500
# A pass deletes at most this many batches; if more are due, the next pass follows the next
# poll rather than a minute later (so a backlog drains without blocking the executor).
PRUNE_BATCHES_PER_PASS = 20
# On a stop, a request under way gets the backend's time and this much more to be answered
# and settled or cancelled; then it is interrupted (a RUNNING one is cancelled once no runner
# can still be at it, see ``HoldExecutor``).
STOP_MARGIN = 10.0
# A tracker watching a RUNNING row it did not run reads it again at least this many polls
# apart (its stored request may be large), sooner when the row's bound comes first.
ABANDONED_POLLS = 8

# The fixed texts a held request's ``failure`` carries (shown to the payer).
INTERRUPTED = "interrupted: the gateway stopped while the backend ran"
NODE_CANCELLED = "the node cancelled the held payment"
EXPIRED_UNPAID = "invoice expired unpaid"
UNREACHABLE = "backend unreachable"
NODE_FORGOT = "the node no longer knows the invoice"
# SETTLED_BY_NODE (from ports, for the store's events too): the node settled an invoice the
# gateway did not (its request failed, or never ran).


@dataclass(frozen=True, slots=True)
class HoldTerms:
    """Limits and times of pay-on-success requests."""

    invoice_expiry: int = 120  # s an unpaid hold invoice stays payable
    backend_timeout: float = 30.0  # s the backend gets; then failure (cancel)
    cltv_expiry: int = 80  # final CLTV delta of the hold invoices (blocks)
    max_outstanding: int = 32  # unfinished held requests at once (all clients)
    max_outstanding_per_client: int = 4
    max_request_bytes: int = 65_536
    max_response_bytes: int = 1_048_576
    response_retention: int = 3600  # s a stored response is kept after it is final
    delivered_retention: int = 60  # s it is kept after its first replay (if sooner)


class RunFailed(Exception):
    """The backend gave no usable answer; ``reason`` is fixed text, shown to the payer."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BackendRunner(Protocol):
    """Sends a stored request to the backend, on behalf of the token that paid for it."""

    async def run(
        self,
        request: StoredRequest,
        token: PaidToken,
        *,
        timeout: float,  # noqa: ASYNC109 - the runner applies it to its own HTTP client
        max_response_bytes: int,
    ) -> StoredResponse:
        """The backend's answer; ``RunFailed`` when there is none within ``timeout`` or it
        is over ``max_response_bytes``."""


class _HoldNode(InvoiceBackend, HoldInvoiceBackend, Protocol):
    """A node with hold invoices."""


def timed_out(seconds: float) -> str:
    return f"backend timed out after {seconds:g} s"


def failed_with(status: int) -> str:
    return f"backend failed with {status}"


class HoldExecutor:
    """Runs paid pay-on-success requests and settles or cancels their invoices.

    One per store (the process that runs the invoice watcher; with many instances, the
    leader). A RUNNING request it did not move there is another runner's (a previous leader
    still finishing it) or lost its runner (a crash, a store failure after the move): it is
    failed (then cancelled) once its row is older than ``backend_timeout`` plus
    ``stop_margin`` plus ``CLOCK_SKEW``, past which no runner is still at it. Run ``run()``
    as a supervised task.
    """

    def __init__(
        self,
        *,
        backend: _HoldNode,
        store: Store,
        clock: Clock,
        runner: BackendRunner,
        pricing: Pricing,
        terms: HoldTerms,
        poll_interval: float = 0.25,
        initial_backoff: float = 0.5,
        max_backoff: float = 30.0,
        stop_margin: float = STOP_MARGIN,
    ) -> None:
        self._backend = backend
        self._store = store
        self._clock = clock
        self._runner = runner
        self._pricing = pricing
        self._terms = terms
        self._poll = poll_interval
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._stop_margin = stop_margin
        self._abandoned_after = terms.backend_timeout + stop_margin + CLOCK_SKEW
        self._woken = asyncio.Event()
        self._next_prune = 0.0
        # The trackers past waiting for the payment: running the request, storing its
        # answer, settling or cancelling. A stop lets them finish (``_finish_under_way``).
        self._busy: set[PaymentHash] = set()

    def wake(self) -> None:
        """A WAITING request was just stored: look for it now rather than at the next poll."""
        self._woken.set()

    async def run(self) -> None:
        """Follow every unfinished request (at most ``max_outstanding`` at once), those a stop
        left too, and prune final ones, until cancelled. A node or store failure is retried
        here with capped backoff; anything else ends it (the store holds every state, so a
        restart loses nothing).

        Ending, cancelled (a stop) or not, it lets the requests under way finish first (see
        ``_finish_under_way``)."""
        trackers: dict[PaymentHash, asyncio.Task[None]] = {}
        try:
            while True:
                _reap(trackers)
                self._woken.clear()  # before the look: a wake during it is not lost
                await self._retrying(lambda: self._fill(trackers))
                await self._retrying(self._prune)
                woken = asyncio.ensure_future(self._woken.wait())
                try:
                    await asyncio.wait(
                        {woken, *trackers.values()},
                        timeout=self._poll,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    woken.cancel()
        except BaseException:
            await self._finish_under_way(trackers)
            raise
        finally:
            for task in trackers.values():
                task.cancel()
            await asyncio.gather(*trackers.values(), return_exceptions=True)

    async def _finish_under_way(self, trackers: dict[PaymentHash, asyncio.Task[None]]) -> None:
        """A stop: the trackers waiting for a payment end at once (the next start follows
        them again); those whose request runs, or is being settled or cancelled, get
        ``backend_timeout`` plus ``stop_margin`` to finish, so a stop does not refund work
        the backend is doing."""
        under_way: list[asyncio.Task[None]] = []
        for payment_hash, task in trackers.items():
            if payment_hash in self._busy:
                under_way.append(task)
            else:
                task.cancel()
        if not under_way:
            return
        grace = self._terms.backend_timeout + self._stop_margin
        log.info(
            "stopping: waiting up to %g s for %d paid request(s) under way", grace, len(under_way)
        )
        _, unfinished = await asyncio.wait(under_way, timeout=grace)
        if unfinished:
            log.warning(
                "stopping: %d paid request(s) still under way are interrupted (a running one "
                "is cancelled once older than the backend's time and %g s)",
                len(unfinished),
                self._stop_margin + CLOCK_SKEW,
            )

    async def _fill(self, trackers: dict[PaymentHash, asyncio.Task[None]]) -> None:
        free = self._terms.max_outstanding - len(trackers)
        if free <= 0:
            return
        # Polled often: the hashes only (a tracker reads its row).
        hashes = await self._store.list_held_hashes(HELD_UNFINISHED, self._terms.max_outstanding)
        for payment_hash in hashes:
            if free <= 0:
                return
            if payment_hash in trackers:
                continue
            trackers[payment_hash] = asyncio.create_task(
                self._track(payment_hash), name=f"l402-hold-{payment_hash.hex()[:12]}"
            )
            free -= 1

    async def _prune(self) -> None:
        now = self._clock.now()
        if now < self._next_prune:
            return
        pruned = 0
        for _ in range(PRUNE_BATCHES_PER_PASS):
            deleted = await self._store.prune_held_requests(now, PRUNE_BATCH)
            pruned += deleted
            if deleted < PRUNE_BATCH:
                self._next_prune = now + PRUNE_INTERVAL
                break
        if pruned:
            log.info("deleted %d finished pay-on-success request(s)", pruned)

    async def _retrying(self, action: Callable[[], Awaitable[_T]]) -> _T:
        """``action`` until it gets past node and store failures, with capped backoff."""
        backoff = self._initial_backoff
        while True:
            try:
                return await action()
            except (errors.BackendError, errors.StoreError) as error:
                log.warning("pay-on-success: %s; retrying in %.1fs", error, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)

    async def _track(self, payment_hash: PaymentHash) -> None:
        """Take one request from its current state to a final one."""
        try:
            while await self._retrying(lambda: self._advance(payment_hash)):
                pass
        finally:
            self._busy.discard(payment_hash)

    async def _advance(self, payment_hash: PaymentHash) -> bool:
        """One step; False once there is nothing more for this tracker to do."""
        held = await self._store.get_held_request(payment_hash)
        if held is None or held.state not in HELD_UNFINISHED:
            return False
        if held.state is HeldState.RUNNING:
            return await self._abandoned(held)
        if held.state is HeldState.WAITING:
            invoice = await self._await_payment(held)
            if invoice is None:
                return True  # expired or still to be resolved: read the row again
            self._busy.add(payment_hash)
            if invoice.state is InvoiceState.ACCEPTED:
                await self._execute(held)
                return True
            return await self._settled_by_node(held)
        self._busy.add(payment_hash)
        if held.state is HeldState.SUCCEEDED:
            return await self._settle(held)
        return await self._cancel(held, held.failure)

    async def _abandoned(self, held: HeldRequest) -> bool:
        """A RUNNING request this tracker did not run: failed once no runner can still be at
        it (its answer is lost; the next step cancels); until then read again now and then."""
        self._busy.discard(held.payment_hash)  # nothing of its own under way for a stop to wait on
        now = self._clock.now()
        left = held.updated_at + self._abandoned_after - now
        if left > 0:
            await asyncio.sleep(min(left, ABANDONED_POLLS * self._poll))
            return True
        moved = await self._store.move_held_request(
            held.payment_hash, HeldState.FAILED, now, failure=INTERRUPTED
        )
        if moved is not None:
            log.warning(
                "held request %s was interrupted while the backend ran: cancelling",
                held.payment_hash.hex(),
            )
        return True

    async def _settled_by_node(self, held: HeldRequest) -> bool:
        """The node settled the invoice, which the gateway did not (say by hand, with the
        preimage): recorded final, so the request holds no cap slot."""
        log.error(
            "held request %s is %s but the node reports its invoice settled",
            held.payment_hash.hex(),
            held.state.value,
        )
        now = self._clock.now()
        keep_until = now + self._terms.response_retention
        if held.state.may_become(HeldState.SETTLED):  # its successful answer is stored
            await self._store.move_held_request(
                held.payment_hash, HeldState.SETTLED, now, keep_until=keep_until
            )
        else:
            await self._store.move_held_request(
                held.payment_hash,
                HeldState.CANCELED,
                now,
                failure=SETTLED_BY_NODE,
                keep_until=keep_until,
            )
        return True

    async def _lookup(self, payment_hash: PaymentHash) -> Invoice | None:
        """The invoice as the node reports it; None when the node no longer knows it."""
        try:
            return await self._backend.lookup_invoice(payment_hash)
        except errors.InvoiceNotFound:
            return None

    async def _await_payment(self, held: HeldRequest) -> Invoice | None:
        """The invoice once the node holds its payment (or reports another final state);
        None when it expired unpaid (then recorded) or the node cancelled it unpaid."""
        deadline = held.expires_at + CLOCK_SKEW
        stream = self._backend.subscribe_single_invoice(held.payment_hash)
        step: asyncio.Task[Invoice | None] | None = None
        try:
            while True:
                if self._clock.now() >= deadline:
                    return await self._expire(held)
                if step is None:
                    step = asyncio.create_task(_next(stream))
                done, _ = await asyncio.wait({step}, timeout=self._poll)
                if not done:
                    continue
                invoice, step = step.result(), None
                if invoice is None:
                    raise errors.BackendUnavailable("the invoice stream ended")
                if invoice.state is InvoiceState.OPEN:
                    continue
                if invoice.state is InvoiceState.CANCELED:
                    await self._expired(held, cancel=False)
                    return None
                return invoice
        except errors.InvoiceNotFound:
            await self._expired(held, cancel=False)
            return None
        finally:
            if step is not None:
                step.cancel()
                await asyncio.gather(step, return_exceptions=True)
            await stream.aclose()

    async def _expire(self, held: HeldRequest) -> Invoice | None:
        """Unpaid past its expiry: cancel it if the node still has it open."""
        try:
            invoice = await self._backend.lookup_invoice(held.payment_hash)
        except errors.InvoiceNotFound:
            await self._expired(held, cancel=False)
            return None
        if invoice.state is InvoiceState.OPEN:
            await self._expired(held, cancel=True)
            return None
        if invoice.state is InvoiceState.CANCELED:
            await self._expired(held, cancel=False)
            return None
        return invoice

    async def _expired(self, held: HeldRequest, *, cancel: bool) -> None:
        if cancel:
            await self._backend.cancel_invoice(held.payment_hash)
        await self._record_cancel(held.payment_hash)
        now = self._clock.now()
        await self._store.move_held_request(
            held.payment_hash,
            HeldState.EXPIRED,
            now,
            failure=EXPIRED_UNPAID,
            keep_until=now + self._terms.response_retention,
        )

    async def _execute(self, held: HeldRequest) -> None:
        """Run the request, if this caller is the one the store lets run it, and store the
        answer (settled or cancelled by the next step)."""
        running = await self._store.move_held_request(
            held.payment_hash, HeldState.RUNNING, self._clock.now()
        )
        if running is None:
            return  # another runner has it, or it moved on
        if running.request is None:  # the store's contract keeps it until the answer
            raise errors.StoreError("a running held request has no stored request")
        response, failure = await self._run(running, running.request)
        state = HeldState.SUCCEEDED if not failure else HeldState.FAILED

        async def store_answer() -> HeldRequest | None:
            stored = await self._store.move_held_request(
                held.payment_hash, state, self._clock.now(), response=response, failure=failure
            )
            # Refused: written by an attempt whose reply was lost, or the request was taken
            # for abandoned (the store failed for longer than the bound) and is cancelled.
            return stored or await self._store.get_held_request(held.payment_hash)

        outcome = failure or f"backend answered {response.status if response else '-'}"
        # The request ran: its answer must be written, however long the store takes.
        stored = await self._retrying(store_answer)
        if stored is None or stored.failure == INTERRUPTED:
            log.error(
                "held request %s ran (%s) after it was failed as interrupted: it is cancelled",
                held.payment_hash.hex(),
                outcome,
            )
            return
        log.info("held request %s ran: %s", held.payment_hash.hex(), outcome)

    async def _run(
        self, held: HeldRequest, request: StoredRequest
    ) -> tuple[StoredResponse | None, str]:
        """The backend's answer and the failure text ("" for a success that settles)."""
        timeout = self._terms.backend_timeout
        limit = self._terms.max_response_bytes
        token = PaidToken.from_grant(held.grant)
        try:
            async with asyncio.timeout(timeout):
                response = await self._runner.run(
                    request, token, timeout=timeout, max_response_bytes=limit
                )
        except TimeoutError:
            return None, timed_out(timeout)
        except RunFailed as error:
            return None, error.reason
        if len(response.body) > limit:
            return None, f"response over {limit} bytes"
        if not self._settles(request, response.status):
            return None, failed_with(response.status)  # never replayed: not kept
        return response, ""

    def _settles(self, request: StoredRequest, status: int) -> bool:
        path = request.target.partition("?")[0]
        rule = self._pricing.resolve(request.method, unquote(path))
        if isinstance(rule, Rule) and rule.settle_on_success:
            return rule.settles(status)
        return 200 <= status < 300

    async def _settle(self, held: HeldRequest) -> bool:
        """Settle a SUCCEEDED request's invoice; a node that cancelled the held payment
        makes it CANCELED."""
        try:
            await self._backend.settle_invoice(held.preimage)
        except errors.BackendUnavailable:
            raise
        except errors.BackendError as error:
            invoice = await self._lookup(held.payment_hash)
            if invoice is None:  # no held payment left to settle
                return await self._canceled(held, NODE_FORGOT)
            if invoice.state is InvoiceState.ACCEPTED:
                raise  # refused for a reason of its own: try again later
            if invoice.state is not InvoiceState.SETTLED:
                log.warning(
                    "held request %s: the node %s its invoice (%s)",
                    held.payment_hash.hex(),
                    invoice.state.value,
                    error,
                )
                return await self._cancel(held, NODE_CANCELLED)
        now = self._clock.now()
        await self._store.move_held_request(
            held.payment_hash,
            HeldState.SETTLED,
            now,
            keep_until=now + self._terms.response_retention,
        )
        log.info("held request %s settled", held.payment_hash.hex())
        return True

    async def _cancel(self, held: HeldRequest, failure: str) -> bool:
        """Cancel the invoice (the payer gets the money back) and record it CANCELED."""
        try:
            await self._backend.cancel_invoice(held.payment_hash)
        except errors.BackendUnavailable:
            raise
        except errors.BackendError as error:
            invoice = await self._lookup(held.payment_hash)
            if invoice is None:  # it can never be paid
                return await self._canceled(held, NODE_FORGOT)
            if invoice.state is InvoiceState.SETTLED:
                return await self._settled_by_node(held)
            if invoice.state is not InvoiceState.CANCELED:
                raise errors.BackendError(f"cannot cancel: {error}") from error
        return await self._canceled(held, failure)

    async def _canceled(self, held: HeldRequest, failure: str) -> bool:
        """Record the invoice cancelled and the request CANCELED with ``failure``."""
        await self._record_cancel(held.payment_hash)
        now = self._clock.now()
        await self._store.move_held_request(
            held.payment_hash,
            HeldState.CANCELED,
            now,
            failure=failure,
            keep_until=now + self._terms.response_retention,
        )
        log.info("held request %s cancelled: %s", held.payment_hash.hex(), failure)
        return True

    async def _record_cancel(self, payment_hash: PaymentHash) -> None:
        # The node's all-invoices stream never reports a cancellation.
        await self._store.apply_update(
            InvoiceUpdate(payment_hash, InvoiceState.CANCELED, 0, Msat(0), None)
        )


async def _next(stream: AsyncGenerator[Invoice, None]) -> Invoice | None:
    """The stream's next invoice; None when it ended."""
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return None


def _reap(trackers: dict[PaymentHash, asyncio.Task[None]]) -> None:
    """Forget the finished trackers; one that failed unexpectedly ends ``run()``."""
    for payment_hash, task in list(trackers.items()):
        if not task.done():
            continue
        del trackers[payment_hash]
        error = None if task.cancelled() else task.exception()
        if error is not None:
            raise error
