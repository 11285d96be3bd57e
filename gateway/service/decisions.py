"""What the core is asked (``RequestInfo``) and what it answers (``Decision``)."""

from __future__ import annotations

import enum
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gateway import l402
from gateway.ports import Split, StoredRequest, StoredResponse

_T = TypeVar("_T")


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
    # The path and query as received, undecoded (``/a%20b?q=a+b``); empty when the adapter
    # does not give it. A pay-on-success replay compares it with the stored request's.
    target: str = ""
    # The adapter's loader of the request as the backend is to get it (it reads the body),
    # for a pay-on-success route's challenge; it may refuse (say a 413). None: the adapter
    # cannot keep requests, and such routes are refused.
    stored_request: Callable[[], Awaitable[StoredRequest | Deny]] | None = field(
        default=None, compare=False, repr=False
    )


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

    def grant(self) -> str:
        """The token as JSON text: what a pay-on-success request keeps for its later run."""
        return json.dumps(
            {
                "token_id": self.token_id,
                "payment_hash": self.payment_hash,
                "service": self.service,
                "tier": self.tier,
                "capabilities": None if self.capabilities is None else sorted(self.capabilities),
                "valid_until": self.valid_until,
                "amount_msat": self.amount_msat,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_grant(cls, text: str) -> PaidToken:
        """The token of ``grant()``'s text; ``ValueError`` for anything else."""
        try:
            fields: Any = json.loads(text)
            capabilities = fields["capabilities"]
            token = cls(
                token_id=_typed(fields["token_id"], str),
                payment_hash=_typed(fields["payment_hash"], str),
                service=_typed(fields["service"], str),
                tier=_typed(fields["tier"], int),
                capabilities=None
                if capabilities is None
                else frozenset(_typed(c, str) for c in _typed(capabilities, list)),
                valid_until=None
                if fields["valid_until"] is None
                else _typed(fields["valid_until"], int),
                amount_msat=_typed(fields["amount_msat"], int),
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"not a token grant: {error}") from None
        return token


def _typed(value: object, kind: type[_T]) -> _T:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"{type(value).__name__} where {kind.__name__} belongs")
    return value


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
    split: Split = ()  # the route's revenue split, credited with the charge


@dataclass(frozen=True, slots=True)
class Allow:
    token: PaidToken | None  # None on a free route
    charge: CreditCharge | None = None  # set on a credit route
    # A pay-on-success request already run: the adapter answers with it and calls nothing.
    replay: StoredResponse | None = None


FREE = Allow(None)  # a free route, or a price of 0


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
    # Pay on success: the request runs once the payment is held, within this many seconds,
    # and the invoice is settled only if it succeeds (None: an ordinary challenge).
    settle_timeout: float | None = None

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
    # 409, 410: a pay-on-success token answers only the request it paid for, while kept
    PAID_FOR_ANOTHER_REQUEST = "this token paid for another request"
    RESPONSE_GONE = "the response of this paid request is no longer kept"
    # 429
    TOO_MANY_CHALLENGES = "too many payment challenges"
    TOO_MANY_REDEEMS = "too many redeem requests"
    TOO_MANY_HELD_FOR_CLIENT = "too many pay-on-success requests of this client are pending"
    # 500, 501, 502, 503
    PRICE_FUNCTION_FAILED = "price function failed"
    INVALID_PRICE = "price function returned an invalid price"
    NODE_FAILED_INVOICE = "Lightning node failed to create an invoice"
    NODE_REFUSED_INVOICE = "Lightning node refused to create an invoice"
    NODE_UNAVAILABLE = "Lightning node unavailable"
    STORE_UNAVAILABLE = "token store unavailable"
    SETTLEMENT_UNCONFIRMED = "settlement could not be confirmed"
    HOLD_UNAVAILABLE = "pay-on-success needs the reverse proxy"
    TOO_MANY_HELD = "too many pay-on-success requests are pending"


@dataclass(frozen=True, slots=True)
class Deny:
    status: int
    reason: str  # a Refusal, or another layer's fixed text (see Refusal)
    retry_after: int | None = None
    realm: str | None = None  # a 401's challenge realm: the macaroon location


Decision = Allow | PaymentChallenge | Deny
