"""Tip jars (LNURL-pay with a Lightning Address) and payment links: the invoices the
gateway issues for payments that buy nothing but are simply received.

A tip jar (``TipJar``, from the configuration) answers at ``/.well-known/lnurlp/<name>``
(LUD-16), so ``name@domain`` is payable from any wallet; its invoices commit to its metadata
(description hash) and carry the payer's comment (LUD-12). A payment link (``PaymentLink``,
made by ``new_link``) has a page and an LNURL-pay endpoint for wallets; its amount is fixed
or the payer's within bounds. A reusable link's page invoices have the link's memo, its
LNURL ones commit to its metadata and take a comment.

Every invoice is recorded in the store (service ``tip:<name>`` or ``link:<id>``), so the
invoice watcher follows it and records its settlement like any other.

A single-use link is paid at most once: it has at most one invoice that can pay it
(``PaymentLink.open_hash``), of one kind (its metadata's description hash, no comment), so
the page and a wallet get the same one for the same amount. An open one with
``REUSE_MIN_SECONDS`` left is handed out again once the node confirms it is open, and never
replaced before it expires: another amount (or the same one in its last
``REUSE_MIN_SECONDS``) waits (409, ``Retry-After``). Only then (or once it is cancelled) does
another replace it, after the node cancelled it (a node that says it is settled means the
link is paid: 410), and only through the store's compare-and-set
(``add_link_invoice``): a request that loses the race cancels its own invoice and answers
with the winner's. So no payer can take away the invoice another holds.

Every refusal is a ``gateway.lnurl.LnurlError`` with its HTTP status; a failing node or
store is one too (503), so the web layer answers each with a JSON error, never a 500.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import secrets
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from gateway import errors, lnurl
from gateway.lnurl import Image, LnurlError, SuccessAction
from gateway.ports import (
    LINK_SERVICE,
    TIP_SERVICE,
    Clock,
    HoldInvoiceBackend,
    InvoiceBackend,
    InvoiceRecord,
    InvoiceState,
    InvoiceUpdate,
    LinkState,
    Msat,
    PaymentHash,
    PaymentLink,
    Store,
)
from gateway.service.challenge import MEMO_LIMIT

__all__ = [
    "DEFAULT_INVOICE_EXPIRY",
    "LINK_COMMENT_CHARS",
    "LINK_MIN_SECONDS",
    "REUSE_MIN_SECONDS",
    "LinkStatus",
    "TipJar",
    "Tips",
    "new_link",
]

log = logging.getLogger(__name__)

DEFAULT_INVOICE_EXPIRY = 600
# An open invoice of a single-use link is handed out again only with this long left to pay.
REUSE_MIN_SECONDS = 60
# A link's shortest life: it takes payments until REUSE_MIN_SECONDS are left.
LINK_MIN_SECONDS = 2 * REUSE_MIN_SECONDS
# Characters of comment a payment link's LNURL-pay endpoint takes (LUD-12).
LINK_COMMENT_CHARS = 140
_UNAVAILABLE = "the Lightning node cannot make an invoice now; try again later"
_STORE_FAILED = "the gateway's store is unavailable now; try again later"
_ARRIVING = "someone else is paying this payment link now; try again shortly"


@dataclass(frozen=True, slots=True)
class TipJar:
    """A tip jar: ``name@domain`` takes payments from ``min_msat`` to ``max_msat``.
    ``ValueError`` for a name that is not 1 to 64 of ``a-z0-9._+-``, an empty description,
    bounds that are not ``1 <= min <= max``, or ``comment_allowed`` outside 0 to
    ``lnurl.MAX_COMMENT_CHARS``."""

    name: str  # the Lightning Address's local part
    description: str  # the metadata's text/plain: what a wallet shows
    min_msat: Msat
    max_msat: Msat
    comment_allowed: int = 0  # LUD-12: the most characters of comment taken; 0: none
    image: Image | None = None
    success: SuccessAction | None = None

    def __post_init__(self) -> None:
        if lnurl.JAR_NAME.fullmatch(self.name) is None:
            raise ValueError(
                f"a tip jar's name is 1 to 64 of a-z, 0-9, '.', '_', '+', '-': {self.name!r}"
            )
        if not self.description:
            raise ValueError(f"tip jar {self.name}: the description is empty")
        if not 1 <= self.min_msat <= self.max_msat:
            raise ValueError(f"tip jar {self.name}: the amounts are not 1 msat <= min <= max")
        if not 0 <= self.comment_allowed <= lnurl.MAX_COMMENT_CHARS:
            raise ValueError(
                f"tip jar {self.name}: comments take 0 to {lnurl.MAX_COMMENT_CHARS} characters"
            )


@dataclass(frozen=True, slots=True)
class LinkStatus:
    """A payment link as its page shows it: its ``state`` now, and for a single-use link the
    invoice that can pay it (None before the first is asked for, and for a reusable link)."""

    link: PaymentLink
    state: LinkState
    invoice: InvoiceRecord | None


def new_link(
    *,
    min_msat: int,
    max_msat: int,
    memo: str,
    expires_in: float | None,
    single_use: bool,
    now: float,
) -> PaymentLink:
    """A new payment link with a fresh id (``lnurl.LINK_ID``), not yet recorded: a fixed
    amount when ``min_msat == max_msat``, else the payer's within them; it expires
    ``expires_in`` seconds after ``now`` (None: never). ``ValueError`` with a one-line reason
    for amounts that are not whole satoshis with ``1 sat <= min <= max`` (wallets pay whole
    satoshis), a memo over ``MEMO_LIMIT`` characters or with control characters
    (``lnurl.clean_text``; its CR LF and tabs are kept as it makes them), or a life shorter
    than ``LINK_MIN_SECONDS``."""
    if min_msat % 1000 or max_msat % 1000 or not 1000 <= min_msat <= max_msat:
        raise ValueError("the amounts must be whole satoshis with 1 sat <= min <= max")
    try:
        memo = lnurl.clean_text(memo)
    except ValueError:
        raise ValueError("the memo has control characters") from None
    if len(memo) > MEMO_LIMIT:
        raise ValueError(f"the memo is {len(memo)} characters; at most {MEMO_LIMIT}")
    if expires_in is not None and not LINK_MIN_SECONDS <= expires_in < math.inf:
        raise ValueError(f"a link expires at least {LINK_MIN_SECONDS} s from now")
    return PaymentLink(
        link_id=_new_link_id(),
        memo=memo,
        min_msat=Msat(min_msat),
        max_msat=Msat(max_msat),
        single_use=single_use,
        created_at=now,
        expires_at=None if expires_in is None else now + expires_in,
    )


def _new_link_id() -> str:
    """80 random bits as 16 lower-case base32 characters (``lnurl.LINK_ID``)."""
    return base64.b32encode(secrets.token_bytes(10)).decode().lower()


def _base_url(url: str) -> str:
    """``url`` without a trailing slash, checked: http(s), a host, no path, query or user."""
    base = url.rstrip("/")
    parts = urllib.parse.urlsplit(base)
    if (
        parts.scheme not in ("https", "http")
        or not parts.hostname
        or parts.path
        or parts.query
        or parts.fragment
        or parts.username is not None
    ):
        raise ValueError(f"the base URL must be an origin like https://pay.example.com: {url!r}")
    return base


class Tips:
    """Answers every tip jar and payment link of the gateway (see the module's docstring).

    ``backend`` makes the invoices; ``canceler`` cancels one on the node (LND's CancelInvoice,
    ``HoldInvoiceBackend``), which a single-use link needs to replace its invoice (without
    one, an invoice is replaced only once the store holds it expired or cancelled).
    ``base_url``: the public origin wallets reach, e.g. ``https://pay.example.com``.
    ``invoice_expiry``: seconds an invoice may be paid (a link's: no longer than it lives).
    ``ValueError`` for a bad base URL or expiry, a jar filed under another name than its
    own, or a success URL off the base URL's host (LUD-09 wants the callback's domain).
    """

    def __init__(
        self,
        *,
        backend: InvoiceBackend,
        canceler: HoldInvoiceBackend | None,
        store: Store,
        clock: Clock,
        jars: Mapping[str, TipJar],
        base_url: str,
        invoice_expiry: int = DEFAULT_INVOICE_EXPIRY,
        invoice_slots: asyncio.Semaphore | None = None,
    ) -> None:
        self._backend = backend
        self._canceler = canceler
        # The challenges' (``L402Service.invoice_slots``): anonymous tips must not queue more
        # calls on the node's invoice database than paying requests may. None: no limit.
        self._node_calls: contextlib.AbstractAsyncContextManager[object] = (
            contextlib.nullcontext() if invoice_slots is None else invoice_slots
        )
        self._store = store
        self._clock = clock
        self._base = _base_url(base_url)
        if invoice_expiry < 1:
            raise ValueError(f"the invoice expiry is at least 1 s, not {invoice_expiry}")
        self._invoice_expiry = invoice_expiry
        self._jars = dict(jars)
        host = urllib.parse.urlsplit(self._base).hostname
        for name, jar in self._jars.items():
            if name != jar.name:
                raise ValueError(f"tip jar {jar.name} is filed as {name!r}")
            if jar.success is not None and jar.success.url and jar.success.host != host:
                raise ValueError(
                    f"tip jar {name}: the success URL must be on {host}, the callback's host "
                    "(LUD-09)"
                )
        self._jar_metadata = {name: self._metadata_of(name, jar) for name, jar in jars.items()}

    @property
    def domain(self) -> str:
        """The base URL's host[:port]: a jar's Lightning Address is ``name@domain``."""
        return urllib.parse.urlsplit(self._base).netloc.lower()

    @property
    def jars(self) -> Mapping[str, TipJar]:
        """The tip jars by name."""
        return self._jars

    def address(self, name: str) -> str:
        """The jar's Lightning Address, ``name@domain``."""
        return f"{name}@{self.domain}"

    def jar_url(self, name: str) -> str:
        """The jar's LNURL-pay URL, where its Lightning Address leads (LUD-16)."""
        return lnurl.jar_url(self._base, name)

    def jar_lnurl(self, name: str) -> str:
        """The jar's LNURL (what its printed QR code holds)."""
        return lnurl.encode_lnurl(self.jar_url(name))

    def link_page_url(self, link_id: str) -> str:
        """The link's page."""
        return lnurl.link_page_url(self._base, link_id)

    def link_lnurl(self, link_id: str) -> str:
        """The LNURL of the link's LNURL-pay endpoint (what a wallet scans)."""
        return lnurl.link_lnurl(self._base, link_id)

    # Tip jars

    def _jar(self, name: str) -> tuple[TipJar, str]:
        """The jar ``name`` asks for (``name+tag`` falls back on ``name``, LUD-16) and its
        metadata; 404 for none."""
        jar = self._jars.get(name)
        if jar is None and "+" in name:
            jar = self._jars.get(name.partition("+")[0])
        if jar is None or lnurl.JAR_NAME.fullmatch(name) is None:
            raise LnurlError(f"no tip jar named {name[:64]!r} here", 404)
        cached = self._jar_metadata.get(name)
        return jar, cached if cached is not None else self._metadata_of(name, jar)

    def _metadata_of(self, name: str, jar: TipJar) -> str:
        return lnurl.metadata(jar.description, self.address(name), jar.image)

    async def jar_pay_request(self, name: str) -> dict[str, object]:
        """The jar's ``payRequest`` (LUD-06/16); 404 for an unknown name."""
        jar, metadata = self._jar(name)
        return lnurl.pay_request(
            f"{self.jar_url(name)}/callback",
            jar.min_msat,
            jar.max_msat,
            metadata,
            jar.comment_allowed,
        )

    async def jar_invoice(self, name: str, query: Mapping[str, str]) -> dict[str, object]:
        """The answer to the jar's callback: an invoice for the asked amount committing to
        the jar's metadata, recorded with the comment; its success action if it has one."""
        jar, metadata = self._jar(name)
        amount, comment = lnurl.read_callback(
            query, jar.min_msat, jar.max_msat, jar.comment_allowed
        )
        now = self._clock.now()
        record = await self._new_invoice(
            f"{TIP_SERVICE}{jar.name}",
            amount,
            "",
            lnurl.description_hash(metadata),
            self._invoice_expiry,
            comment,
            now,
        )
        with self._store_errors():
            try:
                await self._store.add_invoice(record)
            except errors.StoreError:
                await self._drop(record.payment_hash)
                raise
        log.info("tip jar %s: invoice %s for %d msat", jar.name, record.payment_hash.hex(), amount)
        return lnurl.callback_body(record.payment_request, jar.success)

    # Payment links

    async def create_link(
        self,
        *,
        min_msat: int,
        max_msat: int,
        memo: str,
        expires_in: float | None,
        single_use: bool,
    ) -> PaymentLink:
        """A new link (``new_link``), recorded. ``LnurlError``: 400 for what ``new_link``
        refuses, 503 when the store fails."""
        try:
            link = new_link(
                min_msat=min_msat,
                max_msat=max_msat,
                memo=memo,
                expires_in=expires_in,
                single_use=single_use,
                now=self._clock.now(),
            )
        except ValueError as error:
            raise LnurlError(str(error)) from None
        with self._store_errors():
            await self._store.add_link(link)
        log.info("payment link %s created", link.link_id)
        return link

    async def cancel_link(self, link_id: str) -> LinkStatus:
        """Cancel the link (again is no error) and, on the node, every open invoice of it,
        so nothing pays it any more. The answer's ``state`` is PAID when a single-use link
        was paid first (paid already, or its open invoice settled on the node before it
        could be cancelled: the watcher records that payment), else the link's state now
        (CANCELED; PAID for a single-use link paid meanwhile); ``invoice`` is a single-use
        link's open invoice as it was. 404 for an unknown link, 503 when the store fails or
        the node cannot cancel an invoice (the link is cancelled: cancel again to retry).
        Without a canceler its open invoices stay payable until they expire."""
        with self._store_errors():
            link = (
                await self._store.cancel_link(link_id, self._clock.now())
                if lnurl.LINK_ID.fullmatch(link_id)
                else None
            )
            if link is None:
                raise LnurlError(f"no payment link {link_id[:64]!r}", 404)
            # Every invoice of the link is recorded by now: the store takes no more.
            invoices = await self._store.list_invoices(
                InvoiceState.OPEN, service=f"{LINK_SERVICE}{link_id}"
            )
            current = (
                None if link.open_hash is None else await self._store.get_invoice(link.open_hash)
            )
        settled = failed = False
        for record in invoices:
            if self._canceler is None:
                break
            try:
                await self._cancel_on_node(self._canceler, record.payment_hash)
            except errors.InvoiceAlreadySettled:
                settled = True  # paid before it could be cancelled: the watcher records it
            except errors.BackendError as error:
                log.warning("payment link %s: cannot cancel an invoice: %s", link_id, error)
                failed = True
        if failed:
            raise LnurlError(
                "the link is cancelled, but the node could not cancel an open invoice of it "
                "(it can be paid until it expires): cancel it again later",
                503,
            )
        state = link.state(self._clock.now())
        if settled and link.single_use:
            state = LinkState.PAID
        log.info("payment link %s cancelled (%s)", link_id, state.value)
        return LinkStatus(link, state, current)

    async def link_status(self, link_id: str) -> LinkStatus:
        """The link, its state now and its open invoice; 404 for an unknown link."""
        link = await self._link(link_id)
        invoice = None
        if link.open_hash is not None:
            with self._store_errors():
                invoice = await self._store.get_invoice(link.open_hash)
        return LinkStatus(link, link.state(self._clock.now()), invoice)

    async def link_pay_request(self, link_id: str) -> dict[str, object]:
        """The link's ``payRequest`` (LUD-06); 404 unknown, 410 expired (or about to),
        paid or cancelled. A single-use link takes no comment."""
        link = await self._open_link(link_id)
        return lnurl.pay_request(
            f"{self.link_page_url(link_id)}/callback",
            link.min_msat,
            link.max_msat,
            self._link_metadata(link),
            _comment_allowed(link),
        )

    async def link_callback(self, link_id: str, query: Mapping[str, str]) -> dict[str, object]:
        """The answer to the link's LNURL callback: an invoice committing to its metadata
        (a single-use link's open one for the same amount: the page's). 400 for a bad
        amount or comment (a single-use link takes none), 404, 410 as ``link_pay_request``,
        409 while another amount's invoice holds a single-use link, 503."""
        link = await self._open_link(link_id)
        amount, comment = lnurl.read_callback(
            query, link.min_msat, link.max_msat, _comment_allowed(link)
        )
        record = await self._link_invoice(link, amount, comment, hashed=True)
        return lnurl.callback_body(record.payment_request, None)

    async def link_invoice(self, link_id: str, amount_msat: int | None) -> InvoiceRecord:
        """The invoice of the link's page for ``amount_msat`` (None: a fixed link's amount):
        a single-use link's is the one a wallet gets (``link_callback``), a reusable link's
        has its memo as the description. 400 for an amount missing or out of bounds, 404, 410
        as ``link_pay_request``; 409 while another amount's invoice holds a single-use link
        (the reason says when it frees up), 503."""
        link = await self._open_link(link_id)
        if amount_msat is None:
            if not link.fixed:
                raise LnurlError(f"choose an amount from {link.min_msat} to {link.max_msat} msat")
            amount_msat = link.min_msat
        if not link.min_msat <= amount_msat <= link.max_msat:
            raise LnurlError(
                f"the amount must be from {link.min_msat} to {link.max_msat} msat, "
                f"not {amount_msat}"
            )
        return await self._link_invoice(link, Msat(amount_msat), "", hashed=link.single_use)

    def _link_metadata(self, link: PaymentLink) -> str:
        return lnurl.metadata(link.memo or f"Payment link {link.link_id}")

    async def _link(self, link_id: str) -> PaymentLink:
        link = None
        if lnurl.LINK_ID.fullmatch(link_id):
            with self._store_errors():
                link = await self._store.get_link(link_id)
        if link is None:
            raise LnurlError(f"no payment link {link_id[:64]!r}", 404)
        return link

    async def _open_link(self, link_id: str) -> PaymentLink:
        """The link if it takes payments: 410 once it is paid, cancelled, expired or has
        less than ``REUSE_MIN_SECONDS`` to live (too little to pay an invoice)."""
        link = await self._link(link_id)
        now = self._clock.now()
        state = link.state(now)
        if state is not LinkState.OPEN:
            raise LnurlError(lnurl.LINK_GONE[state], 410)
        if link.expires_at is not None and link.expires_at - now < REUSE_MIN_SECONDS:
            raise LnurlError("this payment link expires in under a minute", 410)
        return link

    async def _link_invoice(
        self, link: PaymentLink, amount: Msat, comment: str, *, hashed: bool
    ) -> InvoiceRecord:
        """An invoice paying ``link``, recorded: committing to its metadata when ``hashed``,
        else with its memo; a single-use link's under its rules (the module's docstring)."""
        description_hash = lnurl.description_hash(self._link_metadata(link)) if hashed else b""
        now = self._clock.now()
        expiry = self._invoice_expiry
        if link.expires_at is not None:
            expiry = max(1, min(expiry, math.ceil(link.expires_at - now)))
        replaces = None
        if link.single_use:
            current = await self._holding(link, now)
            if current is not None:
                if _suits(current, amount, description_hash, now):
                    return current
                raise _held(current, link, now)
            replaces = link.open_hash
        record = await self._new_invoice(
            f"{LINK_SERVICE}{link.link_id}",
            amount,
            "" if hashed else link.memo,
            description_hash,
            expiry,
            comment,
            now,
        )
        with self._store_errors():
            try:
                added = await self._store.add_link_invoice(record, replaces)
            except errors.StoreError:
                await self._drop(record.payment_hash)
                raise
        if added:
            log.info(
                "payment link %s: invoice %s for %d msat",
                link.link_id,
                record.payment_hash.hex(),
                amount,
            )
            return record
        # Another request replaced the open invoice first, or the link was paid, cancelled
        # or forgotten meanwhile: this invoice must never be paid.
        await self._drop(record.payment_hash)
        link = await self._open_link(link.link_id)
        winner = None
        if link.open_hash is not None:
            with self._store_errors():
                winner = await self._store.get_invoice(link.open_hash)
        if winner is not None and _suits(winner, amount, description_hash, now):
            return winner
        if winner is not None and winner.state is InvoiceState.OPEN:
            raise _held(winner, link, now)
        raise LnurlError(_ARRIVING, 409, retry_after=1)

    async def _holding(self, link: PaymentLink, now: float) -> InvoiceRecord | None:
        """A single-use link's open invoice while it holds the link (open on the node and not
        expired: reused, or 409); else None once nothing can pay it any more (cancelled on
        the node, if it was not already). 409 while a payment arrives (ACCEPTED), 410 when the
        node says it is paid, 503 when the node cannot tell or cancel."""
        if link.open_hash is None:
            return None
        with self._store_errors():
            current = await self._store.get_invoice(link.open_hash)
        if current is None:
            pass  # a pruned record: cancel it on the node to be sure
        elif current.state is InvoiceState.CANCELED:
            return None
        elif current.state is InvoiceState.ACCEPTED:
            raise LnurlError(_ARRIVING, 409, retry_after=5)
        elif current.state is InvoiceState.OPEN and current.expires_at > now:
            state = await self._state_on_node(link, link.open_hash)
            if state is InvoiceState.OPEN:
                return current
            if state is InvoiceState.CANCELED:
                return None
        if self._canceler is None:
            if current is None or current.state is InvoiceState.EXPIRED:
                return None
            raise LnurlError(
                "this payment link's open invoice cannot be cancelled here; try again once it "
                "expires",
                409,
            )
        try:
            await self._cancel_on_node(self._canceler, link.open_hash)
        except errors.InvoiceAlreadySettled:
            raise LnurlError(lnurl.LINK_GONE[LinkState.PAID], 410) from None
        except errors.BackendError as error:
            log.warning("payment link %s: cannot cancel its invoice: %s", link.link_id, error)
            raise LnurlError(_UNAVAILABLE, 503) from None
        return None

    async def _state_on_node(self, link: PaymentLink, payment_hash: PaymentHash) -> InvoiceState:
        """The invoice's state on the node, recorded in the store when it is no longer OPEN
        (a cancellation whose record failed, a settlement the watcher has yet to see; one the
        node forgot is CANCELED). 410 for a settled one, 503 when the node cannot tell."""
        try:
            async with self._node_calls:
                invoice = await self._backend.lookup_invoice(payment_hash)
        except errors.InvoiceNotFound:
            update = InvoiceUpdate(payment_hash, InvoiceState.CANCELED, 0, Msat(0), None)
        except errors.BackendError as error:
            log.warning("payment link %s: cannot look up its invoice: %s", link.link_id, error)
            raise LnurlError(_UNAVAILABLE, 503) from None
        else:
            if invoice.state is InvoiceState.OPEN:
                return invoice.state
            update = InvoiceUpdate.of(invoice)
        with self._store_errors():
            await self._store.apply_update(update)
        if update.state is InvoiceState.SETTLED:
            raise LnurlError(lnurl.LINK_GONE[LinkState.PAID], 410)
        if update.state is not InvoiceState.CANCELED:  # ACCEPTED: a payment is arriving
            raise LnurlError(_ARRIVING, 409, retry_after=5)
        return update.state

    # Invoices

    async def _new_invoice(
        self,
        service: str,
        amount: Msat,
        memo: str,
        description_hash: bytes,
        expiry: int,
        comment: str,
        now: float,
    ) -> InvoiceRecord:
        """A new invoice on the node, as the record to store; 503 if the node fails."""
        try:
            async with self._node_calls:
                invoice = await self._backend.add_invoice(amount, memo, expiry, description_hash)
        except errors.BackendError as error:
            log.warning("%s: the node made no invoice: %s", service, error)
            raise LnurlError(_UNAVAILABLE, 503) from None
        return InvoiceRecord(
            payment_hash=invoice.payment_hash,
            payment_request=invoice.payment_request,
            amount_msat=amount,
            token_id=b"",
            service=service,
            method="",
            path="",
            state=InvoiceState.OPEN,
            created_at=now,
            expires_at=now + expiry,
            add_index=invoice.add_index,
            comment=comment,
        )

    async def _drop(self, payment_hash: PaymentHash) -> None:
        """Cancel an invoice made but not handed out, if the node can: it must not be paid."""
        if self._canceler is None:
            return
        try:
            await self._cancel_on_node(self._canceler, payment_hash)
        except errors.BackendError as error:
            # It stays payable until it expires: the one gap in exactly once, logged loudly.
            log.error("cannot cancel the unused invoice %s: %s", payment_hash.hex(), error)

    async def _cancel_on_node(
        self, canceler: HoldInvoiceBackend, payment_hash: PaymentHash
    ) -> None:
        """Cancel an invoice on the node (one it never made, forgot or reports cancelled
        already counts as cancelled) and record it CANCELED: the node's invoice stream never
        reports a cancellation, so the store would show it open until the sweeper looks after
        its expiry."""
        with contextlib.suppress(errors.InvoiceNotFound, errors.InvoiceAlreadyCanceled):
            async with self._node_calls:
                await canceler.cancel_invoice(payment_hash)
        update = InvoiceUpdate(payment_hash, InvoiceState.CANCELED, 0, Msat(0), None)
        try:
            await self._store.apply_update(update)
        except errors.StoreError as error:
            # The node refuses it already; the sweeper records it once it has expired.
            log.warning("invoice %s cancelled, not yet recorded: %s", payment_hash.hex(), error)

    @contextlib.contextmanager
    def _store_errors(self) -> Iterator[None]:
        try:
            yield
        except errors.StoreError as error:
            # One line: while the store is down, every unpaid request comes here.
            log.warning("the store failed: %s", error)
            raise LnurlError(_STORE_FAILED, 503) from None


def _comment_allowed(link: PaymentLink) -> int:
    """Characters of comment the link's LNURL-pay takes: none for a single-use link (its one
    invoice serves every payer, so it carries no payer's words)."""
    return 0 if link.single_use else LINK_COMMENT_CHARS


def _suits(record: InvoiceRecord, amount: Msat, description_hash: bytes, now: float) -> bool:
    """Whether a single-use link's invoice can be handed out for this request: open, of
    ``amount``, of the same kind (the same description hash, or a memo), and with
    ``REUSE_MIN_SECONDS`` to live."""
    return (
        record.state is InvoiceState.OPEN
        and record.amount_msat == amount
        and record.expires_at - now >= REUSE_MIN_SECONDS
        and lnurl.invoice_description_hash(record.payment_request) == description_hash
    )


def _held(record: InvoiceRecord, link: PaymentLink, now: float) -> LnurlError:
    """409 for a request the single-use link's open invoice does not suit: it holds the link
    until it expires (then it may be replaced), or until the link itself expires."""
    wait = max(1, math.ceil(record.expires_at - now))
    amount = f"{record.amount_msat // 1000} sat"
    if link.expires_at is not None and record.expires_at >= link.expires_at - 1:
        # No Retry-After: the link stops taking payments before the invoice frees it.
        reason = f"this payment link has an open invoice for {amount} until the link expires"
        return LnurlError(reason, 409)
    reason = f"this payment link has an open invoice for {amount}; ask again in {wait} s"
    return LnurlError(reason, 409, retry_after=wait)
