"""What the core is asked (``RequestInfo``) and what it answers (``Decision``)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from gateway import l402


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """The parts of an HTTP request the core looks at.

    The adapter takes the credentials out of the request: ``authorization`` and ``cookies``
    hold them, and ``headers`` (what a price function, user code that may log, gets to see)
    holds none of them.
    """

    method: str
    path: str
    client: str
    authorization: tuple[str, ...] = ()
    query: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    # Values of the L402 cookies (``<macaroon>:<hex preimage>``), most specific path first.
    cookies: tuple[str, ...] = field(default=(), repr=False)
    # Methods the request asks the backend to read it as instead (override headers, _method).
    method_overrides: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PaidToken:
    """A verified token, as the protected handler sees it."""

    token_id: str
    payment_hash: str
    service: str
    tier: int
    capabilities: frozenset[str] | None  # None: the token is not limited to capabilities
    valid_until: int | None
    amount_msat: int


@dataclass(frozen=True, slots=True)
class CreditCharge:
    """Credit held for an allowed request on a credit route. The adapter ends it once the
    response status is known, before the response goes out: ``L402Service.finish_charge``."""

    reservation_id: int
    token_id: bytes
    reserved_msat: int
    balance_msat: int  # after the reservation
    metered: bool  # charge the cost the backend reports (at most ``reserved_msat``)
    charge_failures: bool  # a 5xx or an unreachable backend is charged too
    method: str
    path: str


@dataclass(frozen=True, slots=True)
class Allow:
    token: PaidToken | None  # None on a free route
    charge: CreditCharge | None = None  # set on a credit route


@dataclass(frozen=True, slots=True)
class PaymentChallenge:
    """402: pay this invoice, then present the macaroon with the invoice's preimage."""

    reason: l402.ChallengeReason
    macaroon: str  # standard base64
    invoice: str
    payment_hash: str
    amount_msat: int
    expires_at: float
    # What the payment buys, for the paywall page.
    service: str = ""
    method: str = ""
    path: str = ""
    lifetime: int = 0  # seconds the token is valid once issued
    issued_at: float | None = None  # the service clock when the challenge was made
    title: str = ""  # the route's, in words
    description: str = ""
    merchant: str = ""  # who sells
    fiat: str = ""  # the price in the operator's currency, for people ("" when unknown)
    # Credit routes: the invoice buys ``amount_msat`` of credit for the account, each request
    # costs ``price_msat`` (at most, when metered); ``balance_msat`` is the presented token's
    # balance when the challenge is a top-up (None otherwise).
    credit: bool = False
    price_msat: int = 0
    balance_msat: int | None = None

    def www_authenticate(self) -> tuple[str, ...]:
        """One header per scheme: L402, and LSAT for older clients."""
        return tuple(
            l402.format_challenge(self.macaroon, self.invoice, scheme)
            for scheme in ("L402", "LSAT")
        )


class Refusal(enum.StrEnum):
    """The reasons the core itself gives for refusing a request or a token.

    A ``Deny`` may also carry the reason of an ``l402`` error or of a ``pricing.Refused``
    verbatim: all of them are fixed text, safe to send to the client.
    """

    # 401: the token is not one this gateway can accept
    UNKNOWN_OR_REVOKED = "unknown or revoked token"
    UNKNOWN_INVOICE = "unknown invoice"
    INVOICE_UNKNOWN_TO_NODE = "invoice is unknown to the node"
    INVOICE_NOT_SETTLED = "invoice is not settled"
    INVALID_SIGNATURE = "invalid macaroon signature"
    MALFORMED_CAVEAT = "malformed caveat"
    CREDENTIAL_REQUIRED = "an L402 Authorization credential is required"
    # 400
    MACAROON_NOT_BASE64 = "macaroon must be base64 text"
    CREDIT_AMOUNT_INVALID = "requested credit amount must be a whole number of msat"
    CREDIT_AMOUNT_OUT_OF_BOUNDS = "requested credit amount is out of the route's bounds"
    # 404
    NO_CREDIT_ACCOUNT = "this token has no credit account"
    WITHDRAWALS_DISABLED = "withdrawals are not enabled"
    # 429
    TOO_MANY_CHALLENGES = "too many payment challenges"
    TOO_MANY_REDEEMS = "too many redeem requests"
    # 500, 502, 503
    PRICE_FUNCTION_FAILED = "price function failed"
    INVALID_PRICE = "price function returned an invalid price"
    NODE_FAILED_INVOICE = "Lightning node failed to create an invoice"
    NODE_REFUSED_INVOICE = "Lightning node refused to create an invoice"
    NODE_UNAVAILABLE = "Lightning node unavailable"
    STORE_UNAVAILABLE = "token store unavailable"
    SETTLEMENT_UNCONFIRMED = "settlement could not be confirmed"


@dataclass(frozen=True, slots=True)
class Deny:
    status: int
    reason: str  # a Refusal, or another layer's fixed text (see Refusal)
    retry_after: int | None = None
    realm: str | None = None  # a 401's challenge realm: the macaroon location


Decision = Allow | PaymentChallenge | Deny
