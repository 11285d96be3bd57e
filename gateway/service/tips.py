"""Tip jars (LNURL-pay with a Lightning Address) and payment links: the invoices the
gateway issues for payments that buy nothing but are simply received.

A tip jar (``TipJar``, from the configuration) answers at ``/.well-known/lnurlp/<name>``
(LUD-16), so ``name@domain`` is payable from any wallet; its invoices commit to its metadata
(description hash) and carry the payer's comment (LUD-12). A payment link
(``PaymentLink``, made by ``create_link``) has a page whose invoice has the link's memo, and
an LNURL-pay endpoint for wallets; its amount is fixed or the payer's within bounds.

Every invoice is recorded in the store (service ``tip:<name>`` or ``link:<id>``), so the
invoice watcher follows it and records its settlement like any other.

A single-use link is paid at most once: it has at most one invoice that can pay it
(``PaymentLink.open_hash``). That one is reused while it suits (open, the same amount and
kind, ``REUSE_MIN_SECONDS`` left); another replaces it only after the node cancelled it (a
node that says it is settled means the link is being paid: "paid"), and only through the
store's compare-and-set (``add_link_invoice``): a request that loses the race cancels its own
invoice and answers with the winner's.

Every refusal is a ``gateway.lnurl.LnurlError`` with its HTTP status; a failing node or
store is one too (503), so the web layer answers each with a JSON error, never a 500.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
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
    "REUSE_MIN_SECONDS",
    "LinkStatus",
    "TipJar",
    "Tips",
]

log = logging.getLogger(__name__)

DEFAULT_INVOICE_EXPIRY = 600
# An open invoice of a single-use link is handed out again only with this long left to pay.
REUSE_MIN_SECONDS = 60
# Characters of comment a payment link's LNURL-pay endpoint takes (LUD-12).
LINK_COMMENT_CHARS = 140
# LUD-16's name characters, and '+' (a "name+tag" address falls back on "name").
_JAR_NAME = re.compile(r"[a-z0-9._+-]{1,64}")
_LINK_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # secrets.token_urlsafe's alphabet
_UNAVAILABLE = "the Lightning node cannot make an invoice now; try again later"
_STORE_FAILED = "the gateway's store is unavailable now; try again later"
_GONE = {
    LinkState.PAID: "this payment link is paid already",
    LinkState.EXPIRED: "this payment link has expired",
    LinkState.CANCELED: "this payment link was cancelled",
}


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
        if _JAR_NAME.fullmatch(self.name) is None:
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
    ) -> None:
        self._backend = backend
        self._canceler = canceler
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
        return f"{self._base}/.well-known/lnurlp/{name}"

    def jar_lnurl(self, name: str) -> str:
        return lnurl.encode_lnurl(self.jar_url(name))

    def link_page_url(self, link_id: str) -> str:
        return f"{self._base}/.well-known/l402/links/{link_id}"

    def link_lnurl(self, link_id: str) -> str:
        """The LNURL of the link's LNURL-pay endpoint (what a reusable link's QR holds)."""
        return lnurl.encode_lnurl(f"{self.link_page_url(link_id)}/lnurl")

    # Tip jars

    def _jar(self, name: str) -> tuple[TipJar, str]:
        """The jar ``name`` asks for (``name+tag`` falls back on ``name``, LUD-16) and its
        metadata; 404 for none."""
        jar = self._jars.get(name)
        if jar is None and "+" in name:
            jar = self._jars.get(name.partition("+")[0])
        if jar is None or _JAR_NAME.fullmatch(name) is None:
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
        """A new link, recorded: a fixed amount when ``min_msat == max_msat``, else the
        payer's within them; it expires ``expires_in`` seconds from now (None: never).
        ``LnurlError`` (400) for bounds not ``1 <= min <= max``, a memo over ``MEMO_LIMIT``
        characters or with control characters, an ``expires_in`` not above 0."""
        if not 1 <= min_msat <= max_msat:
            raise LnurlError("the amounts must be 1 msat <= min <= max")
        if len(memo) > MEMO_LIMIT or not memo.isprintable():
            raise LnurlError(f"the memo must be at most {MEMO_LIMIT} printable characters")
        if expires_in is not None and not expires_in > 0:
            raise LnurlError("a link expires a positive number of seconds from now")
        now = self._clock.now()
        link = PaymentLink(
            link_id=secrets.token_urlsafe(12),
            memo=memo,
            min_msat=Msat(min_msat),
            max_msat=Msat(max_msat),
            single_use=single_use,
            created_at=now,
            expires_at=None if expires_in is None else now + expires_in,
        )
        await self._store.add_link(link)
        log.info("payment link %s created", link.link_id)
        return link

    async def cancel_link(self, link_id: str) -> PaymentLink:
        """Cancel the link (again is no error) and, on the node, its open invoice (a
        single-use link's), so nothing pays it any more; 404 for an unknown link, 503 when
        the node cannot cancel the invoice (the link is cancelled: cancel again to retry)."""
        with self._store_errors():
            link = (
                await self._store.cancel_link(link_id, self._clock.now())
                if _LINK_ID.fullmatch(link_id)
                else None
            )
        if link is None:
            raise LnurlError(f"no payment link {link_id[:64]!r}", 404)
        if link.open_hash is not None and self._canceler is not None:
            try:
                await self._cancel_on_node(self._canceler, link.open_hash)
            except errors.InvoiceAlreadySettled:
                pass  # paid: the watcher records it
            except errors.BackendError as error:
                log.warning("payment link %s: cannot cancel its invoice: %s", link_id, error)
                raise LnurlError(
                    "the link is cancelled, but the node could not cancel its open invoice "
                    "(it can be paid until it expires): cancel it again later",
                    503,
                ) from None
        log.info("payment link %s cancelled", link_id)
        return link

    async def link_status(self, link_id: str) -> LinkStatus:
        """The link, its state now and its open invoice; 404 for an unknown link."""
        link = await self._link(link_id)
        invoice = None
        if link.open_hash is not None:
            with self._store_errors():
                invoice = await self._store.get_invoice(link.open_hash)
        return LinkStatus(link, link.state(self._clock.now()), invoice)

    async def link_pay_request(self, link_id: str) -> dict[str, object]:
        """The link's ``payRequest`` (LUD-06); 404 unknown, 410 expired, paid or cancelled."""
        link = await self._open_link(link_id)
        return lnurl.pay_request(
            f"{self.link_page_url(link_id)}/callback",
            link.min_msat,
            link.max_msat,
            self._link_metadata(link),
            LINK_COMMENT_CHARS,
        )

    async def link_callback(self, link_id: str, query: Mapping[str, str]) -> dict[str, object]:
        """The answer to the link's LNURL callback: an invoice committing to its metadata."""
        link = await self._open_link(link_id)
        amount, comment = lnurl.read_callback(
            query, link.min_msat, link.max_msat, LINK_COMMENT_CHARS
        )
        hashed = lnurl.description_hash(self._link_metadata(link))
        record = await self._link_invoice(link, amount, hashed, comment)
        return lnurl.callback_body(record.payment_request, None)

    async def link_invoice(self, link_id: str, amount_msat: int | None) -> InvoiceRecord:
        """The invoice of the link's page (its memo as the description) for ``amount_msat``
        (None: a fixed link's amount). 400 for an amount missing or out of bounds, 404, 410
        as ``link_pay_request``; 409 when another payer's invoice holds a single-use link."""
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
        return await self._link_invoice(link, Msat(amount_msat), b"", "")

    def _link_metadata(self, link: PaymentLink) -> str:
        return lnurl.metadata(link.memo or f"Payment link {link.link_id}")

    async def _link(self, link_id: str) -> PaymentLink:
        link = None
        if _LINK_ID.fullmatch(link_id):
            with self._store_errors():
                link = await self._store.get_link(link_id)
        if link is None:
            raise LnurlError(f"no payment link {link_id[:64]!r}", 404)
        return link

    async def _open_link(self, link_id: str) -> PaymentLink:
        link = await self._link(link_id)
        state = link.state(self._clock.now())
        if state is not LinkState.OPEN:
            raise LnurlError(_GONE[state], 410)
        return link

    async def _link_invoice(
        self, link: PaymentLink, amount: Msat, description_hash: bytes, comment: str
    ) -> InvoiceRecord:
        """An invoice paying ``link``, recorded; a single-use link's under its rules."""
        now = self._clock.now()
        expiry = self._invoice_expiry
        if link.expires_at is not None:
            expiry = max(1, min(expiry, math.ceil(link.expires_at - now)))
        replaces = None
        if link.single_use:
            replaces = link.open_hash
            current = await self._replaceable(link, amount, description_hash, comment, now)
            if current is not None:
                return current
        record = await self._new_invoice(
            f"{LINK_SERVICE}{link.link_id}",
            amount,
            link.memo if not description_hash else "",
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
        if winner is not None and _suits(winner, amount, description_hash, comment, now):
            return winner
        raise LnurlError("someone else is paying this payment link now; try again", 409)

    async def _replaceable(
        self, link: PaymentLink, amount: Msat, description_hash: bytes, comment: str, now: float
    ) -> InvoiceRecord | None:
        """A single-use link's open invoice if it suits the request (reuse it); else None
        once nothing can pay it any more (cancelled on the node)."""
        if link.open_hash is None:
            return None
        with self._store_errors():
            current = await self._store.get_invoice(link.open_hash)
        if current is not None:
            if _suits(current, amount, description_hash, comment, now):
                return current
            if current.state is InvoiceState.CANCELED:
                return None
        if self._canceler is None:
            if current is None or current.state is InvoiceState.EXPIRED:
                return None
            raise LnurlError(
                "this payment link has an open invoice for another amount; try again once it "
                "expires",
                409,
            )
        try:
            await self._cancel_on_node(self._canceler, link.open_hash)
        except errors.InvoiceAlreadySettled:
            raise LnurlError(_GONE[LinkState.PAID], 410) from None
        except errors.BackendError as error:
            log.warning("payment link %s: cannot cancel its invoice: %s", link.link_id, error)
            raise LnurlError(_UNAVAILABLE, 503) from None
        return None

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
        """Cancel an invoice on the node (one it never made or forgot counts as cancelled)
        and record it CANCELED: the node's invoice stream never reports a cancellation, so
        the store would show it open until the sweeper looks after its expiry."""
        with contextlib.suppress(errors.InvoiceNotFound):
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
        except errors.StoreError:
            log.exception("the store failed")
            raise LnurlError(_STORE_FAILED, 503) from None


def _suits(
    record: InvoiceRecord, amount: Msat, description_hash: bytes, comment: str, now: float
) -> bool:
    """Whether an open invoice can be handed out for this request: open, of ``amount``, of
    the same kind (the same description hash, or a memo) and comment, and with
    ``REUSE_MIN_SECONDS`` to live."""
    return (
        record.state is InvoiceState.OPEN
        and record.amount_msat == amount
        and record.comment == comment
        and record.expires_at - now >= REUSE_MIN_SECONDS
        and lnurl.invoice_description_hash(record.payment_request) == description_hash
    )
