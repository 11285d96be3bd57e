"""Prepaid credit: spending a token's balance, request by request, and reading it.

On a route with ``Rule.credit`` a payment buys credit for the account of the token's id (the
store credits it when the invoice settles). Each allowed request holds its price from the
balance (``spend``: a reservation in the store, atomic across processes); the adapter ends
the hold once the response status is known (``finish``): charged, partly charged (metered),
or released (a failure). ``account_of`` checks a credential the way the credit endpoints
need it: genuine and paid, whatever request it names and even when expired (an expired
token's balance is still its holder's).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
from dataclasses import dataclass

from gateway import errors, l402
from gateway.ports import (
    Account,
    Charge,
    Clock,
    InvoiceBackend,
    InvoiceState,
    InvoiceUpdate,
    Msat,
    PaymentHash,
    Reserved,
    Split,
    Store,
)
from gateway.pricing import CreditTerms
from gateway.service.decisions import Allow, CreditCharge, Deny, PaidToken, Refusal
from gateway.text import printable

log = logging.getLogger(__name__)

# Request header: the credit (msat) a client asks a credit route's invoice to buy.
CREDIT_AMOUNT_HEADER = "L402-Credit-Msat"
# How many of an account's latest charges token info shows.
RECENT_CHARGES = 20
# Default of ``[credit] reservation_seconds``: longer than any request may take upstream.
RESERVATION_SECONDS = 330.0
# A refused hold asks the node about at most this many invoices of the account (the token's
# own purchase and its latest top-ups), so a client that does not pay cannot make one request
# cost the node more than this.
LATE_PAYMENT_LOOKUPS = 3
_DIGITS = re.compile(r"[0-9]{1,20}")


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """A credit token's account, for its holder (``L402Service.token_info``)."""

    token_id: str  # hex
    service: str
    balance_msat: int
    credited_msat: int
    spent_msat: int
    reserved_msat: int
    withdrawn_msat: int
    valid_until: int | None  # of the presented macaroon (None: it does not expire)
    recent: tuple[Charge, ...]  # the latest charges, newest first
    withdrawals: WithdrawalTerms | None = None  # None: withdrawals are not enabled


@dataclass(frozen=True, slots=True)
class WithdrawalTerms:
    """The fee reserve a withdrawal holds back: ``max(fee_min_msat, amount * fee_ppm / 1e6)``,
    so a holder can work out the most they may withdraw."""

    fee_min_msat: int
    fee_ppm: int


def requested_credit(
    headers: tuple[tuple[str, str], ...], terms: CreditTerms, shortfall: int
) -> Msat | Deny:
    """The credit a challenge's invoice buys: what the request asks for in
    ``CREDIT_AMOUNT_HEADER`` (within the route's bounds), else the route's amount, raised to
    ``shortfall`` (what the request needs beyond the balance, capped at the most a client may
    ask for) so that paying the invoice is always enough to serve the request."""
    name = CREDIT_AMOUNT_HEADER.lower()
    asked = [value.strip() for key, value in headers if key.lower() == name]
    if not asked:
        return Msat(max(terms.amount_msat, min(shortfall, terms.max_msat)))
    if len(asked) > 1 or not _DIGITS.fullmatch(asked[0]):
        return Deny(400, Refusal.CREDIT_AMOUNT_INVALID)
    amount = int(asked[0])
    if not terms.min_msat <= amount <= terms.max_msat:
        return Deny(
            400,
            f"{Refusal.CREDIT_AMOUNT_OUT_OF_BOUNDS}: {terms.min_msat} to {terms.max_msat} msat",
        )
    return Msat(amount)


def valid_until(macaroon: l402.Macaroon, service: str) -> int | None:
    """The earliest ``<service>_valid_until`` of the macaroon's caveats (None: none)."""
    key = f"{service}_valid_until"
    until: int | None = None
    for raw in macaroon.caveats:
        try:
            caveat = l402.Caveat.parse(raw)
        except l402.MalformedToken:
            continue  # shown, not enforced: verification fails closed on it elsewhere
        if caveat.key == key and _DIGITS.fullmatch(caveat.value):
            value = int(caveat.value)
            until = value if until is None else min(until, value)
    return until


class CreditLedger:
    """Holds, charges and reads the credit of token accounts."""

    def __init__(
        self,
        *,
        backend: InvoiceBackend,
        store: Store,
        clock: Clock,
        location: str,
        reservation_seconds: float,
    ) -> None:
        if not reservation_seconds > 0:
            raise ValueError("reservation_seconds must be positive")
        self._backend = backend
        self._store = store
        self._clock = clock
        self._location = location
        self._reservation_seconds = reservation_seconds

    async def spend(
        self,
        token: PaidToken,
        terms: CreditTerms,
        price: Msat,
        method: str,
        path: str,
        *,
        split: Split = (),
    ) -> Allow | Reserved:
        """Hold ``price`` from the token's account: ``Allow`` with the charge to finish, or
        the ``Reserved`` that says the balance did not cover it.

        A payer may present its credential before the watcher has seen the payment (the
        preimage is proof enough to verify it), or pay a top-up and go on presenting its old
        credential: a refusal then asks the node about those payments
        (``_credit_late_payment``), so a paid one is credited rather than answered with
        another invoice. Raises ``StoreError``, and ``BackendError`` when the node cannot
        answer that question. ``split`` is the route's: its shares of the charge are
        credited to the payees with it.
        """
        held = await self.hold(token, terms, price, method, path, split=split)
        if isinstance(held, Reserved) and await self._credit_late_payment(token):
            held = await self.hold(token, terms, price, method, path, split=split)
        return held

    async def hold(
        self,
        token: PaidToken,
        terms: CreditTerms,
        price: Msat,
        method: str,
        path: str,
        *,
        split: Split = (),
    ) -> Allow | Reserved:
        """``spend`` without asking about a payment not yet seen: one store write."""
        token_id = bytes.fromhex(token.token_id)
        reserved = await self._reserve(token_id, price)
        if reserved.reservation is None:
            return reserved
        charge = CreditCharge(
            reservation_id=reserved.reservation.reservation_id,
            token_id=token_id,
            reserved_msat=price,
            balance_msat=reserved.balance_msat,
            metered=terms.metered,
            charge_failures=terms.charge_failures,
            method=method.upper(),
            path=path,
            split=split,
        )
        return Allow(token, charge)

    async def _reserve(self, token_id: bytes, price: Msat) -> Reserved:
        expires_at = self._clock.now() + self._reservation_seconds
        try:
            # A caller cancelled while it waits leaves no hold (the store's promise).
            return await self._store.reserve(token_id, price, expires_at)
        except asyncio.CancelledError:
            if _caller_cancelled():
                raise
            raise errors.StoreError("the store cancelled a reservation") from None

    async def _credit_late_payment(self, token: PaidToken) -> bool:
        """Whether a credit purchase of the token's account was paid but not yet seen, and
        is now credited (the store credits it once per payment hash, whoever reports it).

        Asked about, in turn, until one is settled: the token's own invoice (its preimage
        proves it paid), then the account's newest OPEN credit invoices still payable (a
        top-up paid while its holder still presents the old macaroon; one past its expiry
        was paid, if at all, while payable, and is the watcher's and the sweeper's). At most
        ``LATE_PAYMENT_LOOKUPS`` node lookups in all; none when the token's own invoice is
        settled and the account has no OPEN one still payable (one more store read, by token
        id).
        """
        own = PaymentHash(bytes.fromhex(token.payment_hash))
        lookups = 0
        record = await self._store.get_invoice(own)
        if record is not None and record.buys_credit and record.state is not InvoiceState.SETTLED:
            lookups += 1
            if await self._credited(own):
                return True
        now = self._clock.now()
        top_ups = await self._store.list_open_credit_invoices(
            bytes.fromhex(token.token_id), LATE_PAYMENT_LOOKUPS
        )
        for top_up in top_ups:
            if lookups >= LATE_PAYMENT_LOOKUPS:
                break
            if top_up.payment_hash == own or top_up.expires_at <= now:
                continue
            lookups += 1
            try:
                if await self._credited(top_up.payment_hash):
                    return True
            except errors.InvoiceNotFound:
                continue  # the node does not know it: never paid (the sweeper ends it)
        return False

    async def _credited(self, payment_hash: PaymentHash) -> bool:
        """Whether the node reports the invoice SETTLED; its update is then applied."""
        invoice = await self._backend.lookup_invoice(payment_hash)
        if invoice.state is not InvoiceState.SETTLED:
            return False
        await self._store.apply_update(InvoiceUpdate.of(invoice))
        return True

    async def finish(
        self, charge: CreditCharge, *, status: int | None, cost: str | int | None, served: bool
    ) -> int | None:
        """End ``charge`` (see ``L402Service.finish_charge``); the balance after it."""
        amount = self._amount(charge, status, cost) if served else Msat(0)
        try:
            # A caller cancelled now (its client left) still has its charge written (the
            # store's promise).
            # The payees' shares of the charge are credited in the same write.
            balance = await self._store.settle_reservation(
                charge.reservation_id, amount, charge.method, charge.path, split=charge.split
            )
        except asyncio.CancelledError:
            if _caller_cancelled():
                raise
            # The store's own task was cancelled (SQLite's committer, at shutdown).
            self._log_unfinished(charge, "the store cancelled the write")
            return None
        except errors.StoreError:
            self._log_unfinished(charge, "store failed")
            return None
        if balance is None and amount:
            # Served all the same: a handler (an application's, under a middleware) may take
            # longer than any upstream timeout the proxy sets.
            log.warning(
                "%s %s took longer than [credit] reservation_seconds: its hold was given back "
                "before it finished, and %d msat went uncharged",
                charge.method,
                printable(charge.path, 200),
                amount,
            )
        return balance

    @staticmethod
    def _log_unfinished(charge: CreditCharge, failure: str) -> None:
        log.exception(
            "%s while charging %s %s; its hold is released after it expires",
            failure,
            charge.method,
            printable(charge.path, 200),
        )

    def _amount(self, charge: CreditCharge, status: int | None, cost: str | int | None) -> Msat:
        failed = status is None or status >= 500
        if failed and not charge.charge_failures:
            return Msat(0)
        if not charge.metered:
            return Msat(charge.reserved_msat)
        reported = _cost(cost)
        if reported is None or reported > charge.reserved_msat:
            log.warning(
                "%s %s: the backend reported %s, not a cost of 0 to %d msat; charging %d",
                charge.method,
                printable(charge.path, 200),
                "no cost" if cost is None else f"cost {printable(repr(cost), 40)}",
                charge.reserved_msat,
                charge.reserved_msat,
            )
            return Msat(charge.reserved_msat)
        return reported

    async def account_of(self, authorization: tuple[str, ...]) -> bytes | Deny:
        """The token id of a genuine, paid credential that has an account (see
        ``L402Service.account_of``)."""
        found = await self._account(authorization)
        return found if isinstance(found, Deny) else found[0].token_id

    async def token_info(self, authorization: tuple[str, ...]) -> TokenInfo | Deny:
        """The account of the credential (see ``L402Service.token_info``)."""
        found = await self._account(authorization)
        if isinstance(found, Deny):
            return found
        account, until = found
        try:
            recent = await self._store.list_charges(account.token_id, RECENT_CHARGES)
        except errors.StoreError:
            log.exception("store failed while reading a credit account")
            return Deny(503, Refusal.STORE_UNAVAILABLE, retry_after=5)
        return TokenInfo(
            token_id=account.token_id.hex(),
            service=account.service,
            balance_msat=account.balance_msat,
            credited_msat=account.credited_msat,
            spent_msat=account.spent_msat,
            reserved_msat=account.reserved_msat,
            withdrawn_msat=account.withdrawn_msat,
            valid_until=until,
            recent=tuple(recent),
        )

    async def _account(self, authorization: tuple[str, ...]) -> tuple[Account, int | None] | Deny:
        """The account of a genuine, paid credential and the presented macaroon's
        ``valid_until``: its signature (with the stored root key) and preimage are checked,
        not its caveats, so an expired token or one for another request still finds it."""
        try:
            credential = l402.parse_authorization(authorization)
            if credential is None:
                return Deny(401, Refusal.CREDENTIAL_REQUIRED, realm=self._location)
            identifier = l402.identifier_of(credential)
            macaroon = credential.macaroons[0]
            digest = hashlib.sha256(credential.preimage).digest()
            if not hmac.compare_digest(digest, identifier.payment_hash):
                raise l402.TokenRejected("preimage does not match the payment hash")
            root_key = await self._store.get_root_key(identifier.key_id)
            if root_key is None:
                raise l402.TokenRejected(Refusal.UNKNOWN_OR_REVOKED)
            if not macaroon.verify_signature(root_key):
                raise l402.TokenRejected(Refusal.INVALID_SIGNATURE)
            account = await self._store.get_account(identifier.token_id)
        except l402.L402Error as error:
            return Deny(401, error.reason, realm=self._location)
        except errors.StoreError:
            log.exception("store failed while reading a credit account")
            return Deny(503, Refusal.STORE_UNAVAILABLE, retry_after=5)
        if account is None:
            return Deny(404, Refusal.NO_CREDIT_ACCOUNT)
        return account, valid_until(macaroon, account.service)


def _caller_cancelled() -> bool:
    """Whether the running task was cancelled, rather than a future it awaited."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _cost(cost: str | int | None) -> Msat | None:
    """A reported cost as msat; None unless it is a whole number >= 0."""
    if isinstance(cost, bool):
        return None
    if isinstance(cost, int):
        return Msat(cost) if cost >= 0 else None
    if isinstance(cost, str) and _DIGITS.fullmatch(cost.strip()):
        return Msat(int(cost.strip()))
    return None
