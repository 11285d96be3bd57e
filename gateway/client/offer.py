"""Reading a 402: the L402 challenge, its BOLT11 invoice, and the checks made before paying.

Pure: no I/O, the time is passed in. :func:`read_offer` turns the ``WWW-Authenticate`` values
(and the problem+json body, when there is one) into a checked :class:`Offer` or raises:

* ``ChallengeError``: no usable L402/LSAT challenge, or its macaroon has no L402 identifier;
* ``InvoiceRejected``: the invoice does not decode (bad bech32 or signature), is for another
  network than the client's, has no amount, asks for another amount than the body's
  ``amount_msat`` (or than the credit the 402 says it buys), has expired, or pays another
  payment hash than the macaroon is bound to.

**Credit.** On a route billed from a prepaid balance the 402's invoice buys credit: the
response says how much (``L402-Credit-Msat``), what a request costs (``L402-Price-Msat``) and,
for a top-up, the balance left (``L402-Balance-Msat``); the same facts may come as
``credit_msat``, ``price_msat`` and ``balance_msat`` in the JSON body. A top-up's macaroon
carries the token id of the token it tops up (:func:`offered_token_id`).

**Pay on success.** A route that settles on success says so in the 402:
``L402-Settle: on-success; timeout=<s>`` (:func:`settle_terms`). Its invoice is a hold
invoice: once the payment reaches the gateway, the gateway runs the request (the backend gets
up to ``timeout`` seconds) while the payment is held, then takes the payment if the request
succeeded, else cancels it and the payer is refunded. A header that names ``on-success``
but does not parse cleanly (a bad timeout, several values) reads as pay on success for a time
not known, which the budget refuses unless it has no cap.

Networks, by invoice prefix: ``lnbc`` mainnet, ``lntb`` testnet, ``lntbs`` signet,
``lnbcrt`` regtest.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterable, Mapping, Sequence
from dataclasses import dataclass

from gateway import l402
from gateway.client import bolt11
from gateway.client.errors import ChallengeError, InvoiceRejected
from gateway.l402 import MAX_SETTLE_TIMEOUT
from gateway.text import whole_number

__all__ = [
    "BALANCE_HEADER",
    "CREDIT_HEADER",
    "MAX_PROBLEM_BYTES",
    "MAX_SETTLE_TIMEOUT",
    "NETWORKS",
    "PRICE_HEADER",
    "SETTLE_HEADER",
    "DecodedInvoice",
    "Offer",
    "amount_from_problem",
    "balance_from_headers",
    "decode_invoice",
    "has_l402_challenge",
    "normalize_network",
    "offered_token_id",
    "read_at_most",
    "read_offer",
    "settle_terms",
    "token_valid_until",
]

BALANCE_HEADER = "L402-Balance-Msat"  # on every response of a credit route
CREDIT_HEADER = "L402-Credit-Msat"  # on a credit 402: the credit its invoice buys
PRICE_HEADER = "L402-Price-Msat"  # on a credit 402: what one request costs (at most)
SETTLE_HEADER = "L402-Settle"  # on a pay-on-success 402: "on-success; timeout=<s>"

# bolt11 currency (the invoice prefix after "ln") -> network
_CURRENCIES = {"bc": "mainnet", "tb": "testnet", "tbs": "signet", "bcrt": "regtest"}
NETWORKS = frozenset(_CURRENCIES.values())
_ALIASES = {
    "bitcoin": "mainnet",
    "main": "mainnet",
    "testnet3": "testnet",
    "testnet4": "testnet",
    "test": "testnet",
}
# An auth-scheme: a token at the start of a value or after a comma, not followed by "=".
_SCHEME_RE = re.compile(
    r"(?:^|,)[ \t]*([!#$%&'*+\-.^_`|~0-9A-Za-z]+)(?=[ \t]+[^=\s]|[ \t]*(?:,|$))"
)
MAX_PROBLEM_BYTES = 64 * 1024  # a larger 402 body is not read
_MAX_MSAT_DIGITS = 19  # fits an int64, like every amount the gateway sends
_SECONDS_RE = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,6})?")


def normalize_network(name: str) -> str:
    """``mainnet``, ``testnet``, ``signet`` or ``regtest`` (LND's names are accepted too)."""
    lowered = name.strip().lower()
    network = _ALIASES.get(lowered, lowered)
    if network not in NETWORKS:
        raise ValueError(f"unknown network {name!r}: use one of {', '.join(sorted(NETWORKS))}")
    return network


@dataclass(frozen=True, slots=True)
class DecodedInvoice:
    """The facts of a BOLT11 invoice the client checks and logs."""

    network: str
    amount_msat: int | None
    payment_hash: bytes
    destination: str
    description: str
    created_at: int
    expires_at: int


def decode_invoice(invoice: str) -> DecodedInvoice:
    """Decode (and verify the signature of) a BOLT11 invoice; InvoiceRejected if it cannot."""
    try:
        decoded = bolt11.decode(invoice)
    except bolt11.Bolt11Error as error:
        raise InvoiceRejected(f"invoice does not decode: {error}") from None
    network = _CURRENCIES.get(decoded.currency)
    if network is None:
        raise InvoiceRejected(f"invoice is for an unknown network (ln{decoded.currency[:10]})")
    description = decoded.description
    if description is None:
        hashed = decoded.description_hash.hex() if decoded.description_hash else None
        description = f"description hash {hashed}"
    return DecodedInvoice(
        network=network,
        amount_msat=decoded.amount_msat,
        payment_hash=decoded.payment_hash,
        destination=decoded.payee.hex(),
        description=description,
        created_at=decoded.timestamp,
        expires_at=decoded.timestamp + decoded.expiry,
    )


@dataclass(frozen=True, slots=True)
class Offer:
    """A checked 402 challenge: what paying it costs and what it buys."""

    scheme: str  # "L402" or "LSAT": the scheme to answer with
    macaroon_b64: str
    invoice: str
    payment_hash: bytes
    amount_msat: int
    network: str
    destination: str
    description: str
    created_at: int
    expires_at: int
    # From the macaroon's caveats: when the token expires (None: no expiry caveat) and the
    # services it is for.
    valid_until: int | None
    services: tuple[str, ...]
    # A credit route's 402 (see the module docstring): the credit the invoice buys (None: not
    # a credit route), the price of one request, the balance of the token presented.
    credit_msat: int | None = None
    price_msat: int | None = None
    balance_msat: int | None = None
    # Pay on success (see the module docstring): the request runs while the payment is held,
    # the backend gets up to settle_timeout seconds (None: the 402 did not say).
    settles_on_success: bool = False
    settle_timeout: float | None = None


def has_l402_challenge(www_authenticate: Sequence[str]) -> bool:
    """Whether any ``WWW-Authenticate`` value offers the L402 or LSAT scheme."""
    for value in www_authenticate:
        for match in _SCHEME_RE.finditer(value):
            if match.group(1).lower() in ("l402", "lsat"):
                return True
    return False


def _problem(body: bytes | None) -> dict[str, object]:
    """A problem+json (or any JSON object) body; empty if it is not one."""
    if not body or len(body) > MAX_PROBLEM_BYTES:
        return {}
    try:
        problem = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested too deep for json
        return {}
    return problem if isinstance(problem, dict) else {}


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def amount_from_problem(body: bytes | None) -> int | None:
    """``amount_msat`` of a problem+json (or any JSON object) body, else None."""
    return _int(_problem(body).get("amount_msat"))


def _msat_header(headers: Mapping[str, str], name: str) -> int | None:
    """A header holding a whole, non-negative number of msat; None if absent or not one."""
    return whole_number((headers.get(name) or "").strip(), _MAX_MSAT_DIGITS)


def balance_from_headers(headers: Mapping[str, str]) -> int | None:
    """The credit balance a response reports (``L402-Balance-Msat``), None without one."""
    return _msat_header(headers, BALANCE_HEADER)


def _credit_facts(
    headers: Mapping[str, str], problem: dict[str, object]
) -> tuple[int | None, int | None, int | None]:
    """(credit, price, balance) in msat: each from its header, else from the body."""
    facts = []
    for header, key in (
        (CREDIT_HEADER, "credit_msat"),
        (PRICE_HEADER, "price_msat"),
        (BALANCE_HEADER, "balance_msat"),
    ):
        value = _msat_header(headers, header)
        if value is None:
            value = _int(problem.get(key))
        facts.append(value if value is not None and value >= 0 else None)
    credit, price, balance = facts
    return credit, price, balance


def settle_terms(headers: Mapping[str, str]) -> tuple[bool, float | None]:
    """``(settles_on_success, settle_timeout)`` from a 402's ``L402-Settle`` header.

    ``on-success; timeout=30`` -> ``(True, 30.0)``. The value is case-insensitive, spaces
    around ``;`` and ``=`` and unknown parameters are allowed. ``on-success`` without a
    usable timeout (none, not a number of seconds up to ``MAX_SETTLE_TIMEOUT``, given twice,
    a parameter without ``=``, over 256 characters, or ``on-success`` anywhere but as the
    mode of a single value) gives ``(True, None)``: held for a time not known, which the
    budget refuses. Absent or another settlement: ``(False, None)``."""
    # Every value (a multidict's items repeat a header given twice), names in any case.
    lowered = SETTLE_HEADER.lower()
    values = [text for name, text in headers.items() if name.lower() == lowered]
    value = ", ".join(values)
    if "on-success" not in value.lower():
        return False, None
    if len(value) > 256:
        return True, None
    mode, *parameters = value.split(";")
    if mode.strip().lower() != "on-success":
        return True, None
    timeout: float | None = None
    seen_timeout = False
    for parameter in parameters:
        if not parameter.strip():
            continue  # "on-success;" or ";;"
        name, equals, text = parameter.partition("=")
        if not equals or not name.strip():
            return True, None
        if name.strip().lower() != "timeout":
            continue
        text = text.strip()
        if len(text) >= 2 and text[0] == text[-1] == '"':
            text = text[1:-1]
        if seen_timeout or not _SECONDS_RE.fullmatch(text) or float(text) > MAX_SETTLE_TIMEOUT:
            return True, None
        seen_timeout = True
        timeout = float(text)
    return True, timeout


def _challenge(www_authenticate: Sequence[str]) -> l402.Challenge:
    """The L402 challenge among the values (else the LSAT one); values that fail are skipped."""
    found: list[l402.Challenge] = []
    first_error: l402.L402Error | None = None
    for value in www_authenticate:
        try:
            found.append(l402.parse_challenge(value))
        except l402.L402Error as error:
            first_error = first_error or error
    for challenge in found:
        if challenge.scheme == "L402":
            return challenge
    if found:
        return found[0]
    reason = first_error.reason if first_error else "no L402 challenge"
    raise ChallengeError(f"unusable L402 challenge: {reason}")


def offered_token_id(www_authenticate: Sequence[str]) -> bytes | None:
    """The token id of the challenge's macaroon; None if there is no usable one."""
    try:
        macaroon = l402.decode_b64(_challenge(www_authenticate).macaroon_b64)
        return l402.Identifier.decode(macaroon.identifier).token_id
    except (ChallengeError, l402.L402Error):
        return None


def token_valid_until(macaroon: l402.Macaroon) -> int | None:
    """The earliest ``<service>_valid_until`` caveat of the macaroon, None if it has none."""
    until: int | None = None
    for raw in macaroon.caveats:
        try:
            caveat = l402.Caveat.parse(raw)
        except l402.MalformedToken:
            continue
        value = whole_number(caveat.value)
        if caveat.key.endswith("_valid_until") and value is not None:
            until = value if until is None else min(until, value)
    return until


def _services(macaroon: l402.Macaroon) -> tuple[str, ...]:
    names: list[str] = []
    for raw in macaroon.caveats:
        try:
            caveat = l402.Caveat.parse(raw)
        except l402.MalformedToken:
            continue
        if caveat.key == "services":
            names += [entry.partition(":")[0] for entry in caveat.value.split(",") if entry]
    return tuple(dict.fromkeys(names))


def read_offer(
    www_authenticate: Sequence[str],
    body: bytes | None,
    *,
    network: str | None,
    now: float,
    headers: Mapping[str, str] | None = None,
) -> Offer:
    """Parse and check a 402; ``network`` None skips the network check (inspection only).

    ``headers``: the response's (case-insensitive, as HTTP libraries give them), for the
    credit facts and the settlement (``L402-Settle``)."""
    challenge = _challenge(www_authenticate)
    try:
        macaroon = l402.decode_b64(challenge.macaroon_b64)
        identifier = l402.Identifier.decode(macaroon.identifier)
    except l402.L402Error as error:
        raise ChallengeError(f"unusable L402 macaroon: {error.reason}") from None
    invoice = decode_invoice(challenge.invoice)
    if network is not None and invoice.network != normalize_network(network):
        raise InvoiceRejected(
            f"invoice is for {invoice.network}, this client pays on {normalize_network(network)}"
        )
    if invoice.amount_msat is None or invoice.amount_msat <= 0:
        raise InvoiceRejected("invoice has no amount")
    problem = _problem(body)
    asked = _int(problem.get("amount_msat"))
    if asked is not None and asked != invoice.amount_msat:
        raise InvoiceRejected(
            f"invoice asks {invoice.amount_msat} msat but the response says {asked} msat"
        )
    credit, price, balance = _credit_facts(headers or {}, problem)
    settles_on_success, settle_timeout = settle_terms(headers or {})
    if credit is not None and credit != invoice.amount_msat:
        raise InvoiceRejected(
            f"invoice asks {invoice.amount_msat} msat but the response says it buys "
            f"{credit} msat of credit"
        )
    if now >= invoice.expires_at:
        raise InvoiceRejected("invoice has expired")
    if invoice.payment_hash != identifier.payment_hash:
        raise InvoiceRejected("invoice pays another payment hash than the macaroon is bound to")
    valid_until = token_valid_until(macaroon)
    if valid_until is not None and now >= valid_until:
        raise InvoiceRejected("the token offered has expired already (its valid_until caveat)")
    return Offer(
        scheme=challenge.scheme,
        macaroon_b64=challenge.macaroon_b64,
        invoice=challenge.invoice,
        payment_hash=invoice.payment_hash,
        amount_msat=invoice.amount_msat,
        network=invoice.network,
        destination=invoice.destination,
        description=invoice.description,
        created_at=invoice.created_at,
        expires_at=invoice.expires_at,
        valid_until=valid_until,
        services=_services(macaroon),
        credit_msat=credit,
        price_msat=price,
        balance_msat=balance,
        settles_on_success=settles_on_success,
        settle_timeout=settle_timeout,
    )


async def read_at_most(chunks: AsyncIterable[bytes], limit: int) -> bytes:
    """A body from ``chunks``, read up to ``limit + 1`` bytes (one over: too large); a peer
    chooses its size."""
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            break
    return bytes(body[: limit + 1])
