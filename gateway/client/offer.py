"""Reading a 402: the L402 challenge, its BOLT11 invoice, and the checks made before paying.

Pure: no I/O, the time is passed in. :func:`read_offer` turns the ``WWW-Authenticate`` values
(and the problem+json body, when there is one) into a checked :class:`Offer` or raises:

* ``ChallengeError``: no usable L402/LSAT challenge, or its macaroon has no L402 identifier;
* ``InvoiceRejected``: the invoice does not decode (bad bech32 or signature), is for another
  network than the client's, has no amount, asks for another amount than the body's
  ``amount_msat``, has expired, or pays another payment hash than the macaroon is bound to.

Networks, by invoice prefix: ``lnbc`` mainnet, ``lntb`` testnet, ``lntbs`` signet,
``lnbcrt`` regtest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from gateway import l402
from gateway.client import bolt11
from gateway.client.errors import ChallengeError, InvoiceRejected

__all__ = [
    "NETWORKS",
    "DecodedInvoice",
    "Offer",
    "amount_from_problem",
    "decode_invoice",
    "has_l402_challenge",
    "normalize_network",
    "read_offer",
    "token_valid_until",
]

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
_MAX_PROBLEM_BYTES = 64 * 1024


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


def has_l402_challenge(www_authenticate: Sequence[str]) -> bool:
    """Whether any ``WWW-Authenticate`` value offers the L402 or LSAT scheme."""
    for value in www_authenticate:
        for match in _SCHEME_RE.finditer(value):
            if match.group(1).lower() in ("l402", "lsat"):
                return True
    return False


def amount_from_problem(body: bytes | None) -> int | None:
    """``amount_msat`` of a problem+json (or any JSON object) body, else None."""
    if not body or len(body) > _MAX_PROBLEM_BYTES:
        return None
    try:
        problem = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(problem, dict):
        return None
    amount = problem.get("amount_msat")
    if isinstance(amount, int) and not isinstance(amount, bool):
        return amount
    return None


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


def token_valid_until(macaroon: l402.Macaroon) -> int | None:
    """The earliest ``<service>_valid_until`` caveat of the macaroon, None if it has none."""
    until: int | None = None
    for raw in macaroon.caveats:
        try:
            caveat = l402.Caveat.parse(raw)
        except l402.MalformedToken:
            continue
        if caveat.key.endswith("_valid_until") and caveat.value.isdigit():
            value = int(caveat.value)
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
) -> Offer:
    """Parse and check a 402; ``network`` None skips the network check (inspection only)."""
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
    asked = amount_from_problem(body)
    if asked is not None and asked != invoice.amount_msat:
        raise InvoiceRejected(
            f"invoice asks {invoice.amount_msat} msat but the response says {asked} msat"
        )
    if now >= invoice.expires_at:
        raise InvoiceRejected("invoice has expired")
    if invoice.payment_hash != identifier.payment_hash:
        raise InvoiceRejected("invoice pays another payment hash than the macaroon is bound to")
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
        valid_until=token_valid_until(macaroon),
        services=_services(macaroon),
    )
