"""The paying client, free of any HTTP library: :class:`L402Client` and :class:`Exchange`.

An HTTP integration drives one :class:`Exchange` per request::

    exchange = await client.exchange(url, method, body_sha256=body_digest(body))
    authorization = exchange.authorization        # a cached token, or None
    while True:
        send the request (with ``Authorization: <authorization>`` when not None)
        retry = await exchange.step(status, www_authenticate_values, read_body, headers)
        if retry is None:
            return the response
        authorization = retry.authorization       # None: send without Authorization

``step`` records what the server said about a token it was sent, and on a 402 with an L402
challenge pays or reuses a token that appeared meanwhile. One exchange pays at most once,
consults the cache after a 402 at most twice and retries without a token (after a 401 for a
cached one) at most once, so it ends after at most five requests; when it gives up, the
caller gets the last response (e.g. a 402 for a freshly paid token) as it came.
``body_sha256`` is the request body's digest (:func:`~gateway.client.tokens.body_digest`;
no body: ``body_digest(None)``), or None when the integration cannot know the body (a
stream): it decides which pay-on-success token the request may be sent with.

**Credit.** A response of a credit route reports the balance left (``L402-Balance-Msat``):
``step`` keeps it as a :class:`Balance` (:attr:`L402Client.last_balance`, and per account:
:attr:`L402Client.balances`). When the balance runs out the gateway answers 402 with a top-up
for the same account: the client pays it like any 402 (the budget bounds the credit bought),
keeps the top-up's token in the old one's place and retries.

Paying (:meth:`L402Client.authorize`), under a lock per origin so that concurrent requests in
one process never pay twice for the same scope:

1. resolve the pending payments of the origin (a crash may have left some): each is looked up
   at the payer; SUCCEEDED becomes a token (and a spending log entry, ``recovered``), FAILED
   or unknown is dropped, IN_FLIGHT in this URL's scope is waited for (``in_flight_wait``
   seconds, then ``PaymentInFlight``: nothing is paid);
2. a cached token for the request now (from step 1 or a concurrent request) is used unpaid
   (a pay-on-success token only by the very request it paid for: same body included);
3. the offer is read and checked (:func:`~gateway.client.offer.read_offer`), the budget
   checked, ``confirm`` asked; any "no" raises before a payment starts;
4. a pending entry is written durably, the payer pays with the budget's fee cap, the token
   replaces the pending entry in one write, and the spending log gets an entry.

**Pay on success.** For an offer that settles on success (``L402-Settle``, see
:mod:`~gateway.client.offer`) the payment stays in flight while the gateway runs the request,
so the payer gets at least the backend's time plus ``SETTLE_MARGIN`` seconds. When such a
payment fails and the HTTP integration gave ``ask_gateway``, the gateway is asked why
(:mod:`~gateway.client.on_success`): a refund raises ``PaymentRefunded``. The token is good
for that one request only (method, path and query, body: see :mod:`~gateway.client.tokens`):
a re-send of the same request (after the answer to the retry was lost) collects the stored
response with it unpaid; a request with another body pays for its own. It leaves the cache
once a response to it came (a 409 or 410 included: the gateway answers no more with it; any
response at all when its body is not known, since no later request may use it).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from gateway.client.budget import Budget
from gateway.client.cache import TokenCache
from gateway.client.errors import PaymentDeclined, PaymentInFlight, PaymentUnverified
from gateway.client.offer import (
    MAX_SETTLE_TIMEOUT,
    Offer,
    balance_from_headers,
    has_l402_challenge,
    normalize_network,
    offered_token_id,
    read_offer,
)
from gateway.client.on_success import AskGateway, explain_failure
from gateway.client.tokens import (
    CachedToken,
    PendingPayment,
    new_token,
    request_of,
    scope_of,
    split_url,
)
from gateway.errors import PaymentFailed
from gateway.ports import Clock, Msat, Payer, Payment, PaymentHash, PaymentStatus, SystemClock

__all__ = [
    "SETTLE_MARGIN",
    "Balance",
    "Confirm",
    "Exchange",
    "L402Client",
    "Retry",
    "SpendEntry",
    "SystemClock",
]

log = logging.getLogger(__name__)

Confirm = Callable[[Offer], Awaitable[bool]]
_POLL_START = 0.2
_POLL_MAX = 2.0
# s a pay-on-success payment may take beyond the backend's time: the route to the gateway,
# and its settle or cancel coming back.
SETTLE_MARGIN = 30.0


@dataclass(frozen=True, slots=True)
class SpendEntry:
    """One payment the client made: what, to whom, for which URL, at what fee."""

    time: float
    url: str
    method: str
    payment_hash: str
    amount_msat: int
    fee_msat: int
    destination: str
    description: str
    # True when the payment was found by crash recovery rather than made in this run.
    recovered: bool = False


@dataclass(frozen=True, slots=True)
class Balance:
    """A credit balance a response reported (``L402-Balance-Msat``)."""

    balance_msat: int
    url: str  # of the request
    time: float
    # Hex id of the token sent (its credit account); None when the request carried none.
    token_id: str | None


@dataclass(frozen=True, slots=True)
class Retry:
    """Send the request again, with this ``Authorization`` value (None: without one)."""

    authorization: str | None


class _InFlight:
    """Marker: the payer still reports the payment as in flight."""


_IN_FLIGHT = _InFlight()


class L402Client:
    """Pays L402 challenges with ``payer`` within ``budget`` and keeps the tokens in ``cache``.

    ``network``: the network the payer is on (``regtest``, ``mainnet``...); an invoice for
    another one is refused. None skips that check (only sensible when nothing is paid).
    ``payment_timeout``: seconds the payer may try (for a pay-on-success offer at least its
    backend time plus ``SETTLE_MARGIN``). ``confirm``: asked with the checked offer right
    before paying; False raises ``PaymentDeclined``.
    """

    def __init__(
        self,
        payer: Payer,
        *,
        network: str | None,
        budget: Budget,
        cache: TokenCache | None = None,
        clock: Clock | None = None,
        payment_timeout: float = 60.0,
        in_flight_wait: float = 30.0,
        confirm: Confirm | None = None,
    ) -> None:
        self.payer = payer
        self.network = normalize_network(network) if network is not None else None
        self.budget = budget
        self.cache = cache if cache is not None else TokenCache()
        self.clock: Clock = clock or SystemClock()
        self.payment_timeout = payment_timeout
        self.in_flight_wait = in_flight_wait
        self.confirm = confirm
        self._log: list[SpendEntry] = []
        self._balances: dict[str, Balance] = {}
        self._last_balance: Balance | None = None
        self._spent = 0
        self._reserved = 0
        self._locks: dict[str, asyncio.Lock] = {}

    @property
    def spending_log(self) -> tuple[SpendEntry, ...]:
        """Every payment of this client, oldest first (recovered ones included)."""
        return tuple(self._log)

    @property
    def spent_msat(self) -> int:
        """Prices plus fees of :attr:`spending_log`: what counts against the total budget."""
        return self._spent

    @property
    def last_balance(self) -> Balance | None:
        """The balance the latest response that reported one reported."""
        return self._last_balance

    @property
    def balances(self) -> dict[str, Balance]:
        """The latest balance of each credit account seen, by hex token id."""
        return dict(self._balances)

    def _note_balance(self, url: str, token: CachedToken | None, balance_msat: int) -> None:
        token_id = token.token_id.hex() if token is not None else None
        balance = Balance(balance_msat, url, self.clock.now(), token_id)
        if token_id is not None:
            self._balances[token_id] = balance
        self._last_balance = balance

    async def exchange(
        self, url: str, method: str, *, body_sha256: str | None = None, may_pay: bool = True
    ) -> Exchange:
        """Start the L402 side of one request, with the cached token for it if there is one.

        ``body_sha256``: the request body's :func:`~gateway.client.tokens.body_digest`; None
        when it is not known (then no pay-on-success token is reused for it, and one bought
        for it serves only its own retry). ``may_pay`` False: a 402 goes to the caller as it
        came (a redirect that follows a payment, say).
        """
        cached = await self.cache.find(url, method, self.clock.now(), body_sha256)
        return Exchange(self, url, method, cached, body_sha256, may_pay=may_pay)

    async def recover(self) -> list[SpendEntry]:
        """Resolve every pending payment now; the spending log entries of those that succeeded.

        Payments still in flight stay pending. Call it at start-up to finish what a crash
        interrupted; :meth:`authorize` does it anyway for the origin it pays.
        """
        before = len(self._log)
        for entry in await self.cache.pending():
            await self._resolve(entry)
        return self._log[before:]

    async def authorize(
        self,
        url: str,
        method: str,
        www_authenticate: Sequence[str],
        body: bytes | None,
        *,
        exclude: Collection[bytes] = (),
        headers: Mapping[str, str] | None = None,
        ask_gateway: AskGateway | None = None,
        body_sha256: str | None = None,
    ) -> tuple[CachedToken, SpendEntry | None]:
        """A token for a request that got a 402, and the payment if it was paid just now.

        ``body``: the 402's. ``exclude``: payment hashes of tokens already refused for this
        request. ``headers``: the 402's, for the credit facts and the settlement of the offer.
        ``ask_gateway``: how to ask the gateway why a pay-on-success payment failed (None: not
        asked). ``body_sha256``: the *request's* body digest (see :meth:`exchange`).
        """
        origin, _ = split_url(url)
        lock = self._locks.setdefault(origin, asyncio.Lock())
        async with lock:
            await self._resolve_origin(origin, url, method, body_sha256)
            token = await self.cache.find(url, method, self.clock.now(), body_sha256)
            if token is not None and token.payment_hash not in exclude:
                return token, None
            offer = read_offer(
                www_authenticate, body, network=self.network, now=self.clock.now(), headers=headers
            )
            return await self._pay(url, method, offer, ask_gateway, body_sha256)

    # -- internals -------------------------------------------------------------------------

    async def _resolve_origin(
        self, origin: str, url: str, method: str, body_sha256: str | None
    ) -> None:
        deadline = time.monotonic() + self.in_flight_wait
        delay = _POLL_START
        while True:
            waiting = [
                entry
                for entry in await self.cache.pending(origin)
                if await self._resolve(entry) is _IN_FLIGHT
                and entry.covers(url, method, body_sha256)
            ]
            if not waiting:
                return
            if time.monotonic() >= deadline:
                raise PaymentInFlight(
                    f"payment {waiting[0].payment_hash.hex()} for {waiting[0].url} is still in "
                    "flight; not paying again until it ends"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, _POLL_MAX)

    async def _resolve(
        self, entry: PendingPayment
    ) -> tuple[CachedToken, SpendEntry] | _InFlight | None:
        payment = await self.payer.lookup_payment(PaymentHash(entry.payment_hash))
        if payment is None or payment.status is PaymentStatus.FAILED:
            log.info(
                "pending payment %s did not go through; dropped", entry.payment_hash.hex()[:16]
            )
            await self.cache.drop_pending(entry.payment_hash)
            return None
        if payment.status is PaymentStatus.SUCCEEDED:
            log.info("pending payment %s had succeeded; token kept", entry.payment_hash.hex()[:16])
            return await self._finish(entry, payment, recovered=True)
        return _IN_FLIGHT

    async def _pay(
        self,
        url: str,
        method: str,
        offer: Offer,
        ask_gateway: AskGateway | None,
        body_sha256: str | None,
    ) -> tuple[CachedToken, SpendEntry]:
        fee_limit = self.budget.check(offer, self._spent + self._reserved)
        worst_case = offer.amount_msat + fee_limit
        self._reserved += worst_case  # held from the check on, so no other payment overtakes it
        try:
            if self.confirm is not None and not await self.confirm(offer):
                raise PaymentDeclined("payment declined; nothing was paid", offer)
            return await self._send(url, method, offer, fee_limit, ask_gateway, body_sha256)
        finally:
            self._reserved -= worst_case

    async def _send(
        self,
        url: str,
        method: str,
        offer: Offer,
        fee_limit: int,
        ask_gateway: AskGateway | None,
        body_sha256: str | None,
    ) -> tuple[CachedToken, SpendEntry]:
        origin, path = split_url(url)
        on_success = offer.settles_on_success
        entry = PendingPayment(
            origin=origin,
            scope=scope_of(path),
            url=url,
            method=method.upper(),
            scheme=offer.scheme,
            macaroon_b64=offer.macaroon_b64,
            invoice=offer.invoice,
            payment_hash=offer.payment_hash,
            amount_msat=offer.amount_msat,
            destination=offer.destination,
            description=offer.description,
            created_at=self.clock.now(),
            paid_request=request_of(method, url) if on_success else None,
            paid_body_sha256=body_sha256 if on_success else None,
        )
        await self.cache.add_pending(entry)  # durable before a single msat moves
        log.info(
            "paying %d msat (fee up to %d) to %s for %s%s",
            offer.amount_msat,
            fee_limit,
            offer.destination[:16],
            origin,
            path,
        )
        payment_timeout = self.payment_timeout
        if offer.settles_on_success:  # in flight while the gateway runs the request
            # A time not said (paid only by a budget without a cap): the longest believed.
            held = MAX_SETTLE_TIMEOUT if offer.settle_timeout is None else offer.settle_timeout
            payment_timeout = max(payment_timeout, held + SETTLE_MARGIN)
        try:
            payment = await self.payer.send_payment(
                offer.invoice, max_fee_msat=Msat(fee_limit), payment_timeout=payment_timeout
            )
        except PaymentFailed as error:
            await self.cache.drop_pending(offer.payment_hash)  # final: nothing was paid
            if not offer.settles_on_success or ask_gateway is None:
                raise
            explained = await explain_failure(ask_gateway, url, offer, error)
            if explained is error:
                raise
            raise explained from error
        # Any other error leaves the outcome unknown: the entry stays for _resolve.
        return await self._finish(entry, payment, recovered=False)

    async def _finish(
        self, entry: PendingPayment, payment: Payment, *, recovered: bool
    ) -> tuple[CachedToken, SpendEntry]:
        preimage = payment.preimage
        if (
            payment.status is not PaymentStatus.SUCCEEDED
            or preimage is None
            or hashlib.sha256(preimage).digest() != entry.payment_hash
        ):
            await self.cache.drop_pending(entry.payment_hash)
            raise PaymentUnverified(
                f"payer reported payment {entry.payment_hash.hex()} as {payment.status.value} "
                "without the matching preimage"
            )
        now = self.clock.now()
        token = new_token(
            entry.url,
            entry.scheme,
            entry.macaroon_b64,
            preimage,
            entry.amount_msat,
            now,
            entry.paid_request,
            entry.paid_body_sha256,
        )
        await self.cache.store(token, now)
        amount = payment.amount_msat or entry.amount_msat
        spend = SpendEntry(
            time=now,
            url=entry.url,
            method=entry.method,
            payment_hash=entry.payment_hash.hex(),
            amount_msat=amount,
            fee_msat=payment.fee_msat,
            destination=entry.destination,
            description=entry.description,
            recovered=recovered,
        )
        self._log.append(spend)
        self._spent += amount + payment.fee_msat
        return token, spend


class Exchange:
    """The L402 side of one HTTP request (see the module docstring for the loop)."""

    def __init__(
        self,
        client: L402Client,
        url: str,
        method: str,
        cached: CachedToken | None,
        body_sha256: str | None = None,
        *,
        may_pay: bool = True,
    ) -> None:
        self._client = client
        self._may_pay = may_pay
        self._url = url
        self._method = method.upper()
        self._body_sha256 = body_sha256
        self._sent = cached
        self._tried: set[bytes] = set()
        self._paid = False
        self._authorizations = 0
        self._bare_retry = False
        # The token sent with the latest request, if any, and the payment made, if any.
        self.token: CachedToken | None = self._sent
        self.paid: SpendEntry | None = None

    @property
    def authorization(self) -> str | None:
        """The ``Authorization`` value for the first request (a cached token), or None."""
        return self._sent.authorization if self._sent else None

    async def step(
        self,
        status: int,
        www_authenticate: Sequence[str],
        read_body: Callable[[], Awaitable[bytes]],
        headers: Mapping[str, str] | None = None,
        ask_gateway: AskGateway | None = None,
    ) -> Retry | None:
        """Digest a response: None to hand it to the caller, else how to send the request again.

        ``read_body`` is only awaited for a 402 carrying an L402 challenge. ``headers``: the
        response's (case-insensitive, as HTTP libraries give them), for the credit balance and
        the offer. ``ask_gateway``: see :meth:`L402Client.authorize`.
        """
        client = self._client
        sent, self._sent = self._sent, None
        balance = balance_from_headers(headers) if headers is not None else None
        if balance is not None:
            client._note_balance(self._url, sent, balance)
        if status not in (401, 402):
            if sent is not None and sent.paid_request is not None:
                if status < 400 or status in (409, 410) or sent.paid_body_sha256 is None:
                    # Pay on success: the response it paid for came (or is gone for good), or
                    # no later request could collect it (its body is not known).
                    await client.cache.remove(sent.payment_hash)
            elif sent is not None and status < 400:
                await client.cache.worked(sent.payment_hash, self._url)
            return None
        if sent is not None:
            self._tried.add(sent.payment_hash)
            top_up = status == 402 and offered_token_id(www_authenticate) == sent.token_id
            if not top_up:  # a top-up: the token is good, only its balance ran out
                await client.cache.refused(sent.payment_hash, self._url, status)
        if status == 402 and has_l402_challenge(www_authenticate):
            if self._paid or not self._may_pay or self._authorizations >= 2:
                return None
            self._authorizations += 1
            body = await read_body()
            token, payment = await client.authorize(
                self._url,
                self._method,
                www_authenticate,
                body,
                exclude=self._tried,
                headers=headers,
                ask_gateway=ask_gateway,
                body_sha256=self._body_sha256,
            )
            if payment is not None:
                self._paid = True
                self.paid = payment
            self._sent = self.token = token
            return Retry(token.authorization)
        if status == 401 and sent is not None and not self._bare_retry:
            self._bare_retry = True
            self.token = None
            return Retry(None)
        return None
