"""Framework-neutral HTTP rendering of the core's decisions."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from http import HTTPStatus

from gateway import l402
from gateway.service import Deny, PaidToken, PaymentChallenge
from gateway.text import whole_number

# The realm of a 401's challenge when the decision names none (the default location).
DEFAULT_REALM = "l402-gateway"

# Credit routes (``billing = "credit"``). Every response carries the token's balance after
# the request; a 402 also says what its invoice buys and what a request costs.
BALANCE_HEADER = "L402-Balance-Msat"
CREDIT_HEADER = "L402-Credit-Msat"
PRICE_HEADER = "L402-Price-Msat"
# Sent by a backend to report a metered request's actual cost; the proxy takes it out.
COST_HEADER = "L402-Cost-Msat"
# A pay-on-success route's 402: ``on-success; timeout=<seconds>``. The request runs while the
# payment is held, within that time, and the payment completes only if it succeeded.
SETTLE_HEADER = "L402-Settle"


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def render(decision: PaymentChallenge | Deny) -> HttpResponse:
    """A problem+json response (RFC 9457) with the WWW-Authenticate headers the status needs.

    A 402 carries the L402 and LSAT challenges, and on a credit route the credit headers
    (``credit_headers``) and the same figures as ``credit_msat``, ``price_msat`` and
    ``balance_msat`` (null unless the challenge is a top-up), and on a pay-on-success route
    ``settle_headers``. A 401 carries a parameter-only
    challenge (RFC 9110 requires one), never an invoice: an invalid credential must not mint
    invoices.
    """
    status = 402 if isinstance(decision, PaymentChallenge) else decision.status
    problem: dict[str, object] = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": decision.reason,
    }
    headers = [("Content-Type", "application/problem+json"), ("Cache-Control", "no-store")]
    if isinstance(decision, PaymentChallenge):
        problem.update(
            invoice=decision.invoice,
            macaroon=decision.macaroon,
            payment_hash=decision.payment_hash,
            amount_msat=decision.amount_msat,
            expires_at=int(decision.expires_at),
        )
        if decision.credit:
            problem.update(
                credit_msat=decision.amount_msat,
                price_msat=decision.price_msat,
                balance_msat=decision.balance_msat,
            )
        headers += [("WWW-Authenticate", value) for value in decision.www_authenticate()]
        headers += credit_headers(decision)
        headers += settle_headers(decision)
    else:
        if status == 401:
            realm = decision.realm or DEFAULT_REALM
            value = l402.format_error_challenge(realm, "invalid_token", decision.reason)
            headers.append(("WWW-Authenticate", value))
        if decision.retry_after is not None:
            headers.append(("Retry-After", str(decision.retry_after)))
    return HttpResponse(status, tuple(headers), json.dumps(problem).encode())


def credit_headers(challenge: PaymentChallenge) -> tuple[tuple[str, str], ...]:
    """A credit route's 402 headers: the credit the invoice buys, the price of a request, and
    the presented token's balance when the challenge is a top-up; none on another route."""
    if not challenge.credit:
        return ()
    headers = [
        (CREDIT_HEADER, str(challenge.amount_msat)),
        (PRICE_HEADER, str(challenge.price_msat)),
    ]
    if challenge.balance_msat is not None:
        headers.append((BALANCE_HEADER, str(challenge.balance_msat)))
    return tuple(headers)


def settle_headers(challenge: PaymentChallenge) -> tuple[tuple[str, str], ...]:
    """A pay-on-success route's 402 header (``SETTLE_HEADER``); none on another route."""
    if challenge.settle_timeout is None:
        return ()
    return ((SETTLE_HEADER, f"on-success; timeout={challenge.settle_timeout:g}"),)


@functools.lru_cache(maxsize=4096)  # a paying client sends the same token again and again
def token_header_value(token: PaidToken) -> str:
    """The verified token's facts as compact JSON, for the header passed upstream: the text a
    pay-on-success request keeps for its later run (``PaidToken.grant``)."""
    return token.grant()


def content_length(value: str | None) -> int | None:
    """A ``Content-Length`` value as a number; None for none, or for one that is not ASCII
    digits (``isdigit`` alone takes '²', which ``int`` refuses) or too long (``int`` refuses
    thousands of digits)."""
    return None if value is None else whole_number(value)


def client_address(peer: str | None, forwarded_for: str | None, trust_forwarded_for: bool) -> str:
    """The address rate limits apply to: the peer, or the last X-Forwarded-For hop if trusted.

    The trusted proxy in front appends the address it saw; everything before that came from
    the client and could be anything, so a client could pick a fresh rate-limit bucket for
    every request if the first hop were taken.
    """
    if trust_forwarded_for and forwarded_for:
        last = forwarded_for.rsplit(",", 1)[-1].strip()
        if last:
            return last
    return peer or "unknown"
