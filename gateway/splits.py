"""Revenue splits, as arithmetic: a route's shares (``gateway.ports.Share``) read from the
configuration, checked, allocated over a payment, and kept as text with an invoice.

Amounts are integer msat. A payee's share of a payment of ``amount`` is its ``fixed_msat``
plus ``floor(amount * ppm / 1_000_000)``, given in split order while the payment lasts; the
merchant keeps the rest, every rounding remainder included. So the shares never add up to
more than the payment, and a payee never gets a fraction of a msat.
"""

from __future__ import annotations

import re
from decimal import Decimal

from gateway.ports import Msat, Share, Split

# A payee's name in the configuration (and in the ledger): lower case, digits, "_" and "-".
PAYEE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
# The ledger's name for the merchant's part of a payment: never a payee's (``PAYEE_NAME``).
MERCHANT = ""
PPM = 1_000_000

# ASCII digits only ("\d" takes any script's: "٣٠" would be 30), and not too many of them.
_PERCENT = re.compile(r"([0-9]+)(?:\.([0-9]+))?")
_WHOLE = re.compile(r"[0-9]+")
_PERCENT_DECIMALS = 4  # 0.0001% is 1 ppm: the finest share there is
# More than any amount there is (MAX_PRICE_MSAT has 17 digits); Python's int() refuses
# thousands of digits with a message of its own.
MAX_DIGITS = 17


def allocate(split: Split, amount_msat: int) -> list[tuple[str, Msat]]:
    """Each payee's share of a payment of ``amount_msat``, in split order (shares of 0
    included): ``fixed_msat + floor(amount * ppm / 1_000_000)``, but never more than what
    the shares before it left. The merchant keeps the rest (``amount - sum``)."""
    amount = max(0, amount_msat)
    left = amount
    shares: list[tuple[str, Msat]] = []
    for share in split:
        want = share.fixed_msat + amount * share.ppm // PPM
        given = max(0, min(want, left))
        left -= given
        shares.append((share.payee, Msat(given)))
    return shares


def ledger_entries(split: Split, amount_msat: int) -> list[tuple[str, Msat]]:
    """The ledger entries of a payment of ``amount_msat`` on a route with ``split``: one per
    payee whose share is above 0 (summed, should a payee appear twice), sorted by name, then
    the merchant's part (``MERCHANT``), 0 included. None at all for a payment of nothing."""
    if amount_msat <= 0:
        return []
    shares: dict[str, int] = {}
    for payee, share in allocate(split, amount_msat):
        if share > 0:
            shares[payee] = shares.get(payee, 0) + share
    kept = amount_msat - sum(shares.values())
    # Sorted: the stores lock payee rows in this order, so two settlements never deadlock.
    entries = [(payee, Msat(shares[payee])) for payee in sorted(shares)]
    return [*entries, (MERCHANT, Msat(kept))]


def encode_split(split: Split) -> str:
    """The text a split is stored as: ``"carol:300000:0,dave:0:1000"`` (payee, ppm, fixed
    msat); ``""`` for no split."""
    return ",".join(f"{share.payee}:{share.ppm:d}:{share.fixed_msat:d}" for share in split)


def decode_split(text: str) -> Split:
    """The split ``encode_split`` wrote as ``text``; ``ValueError`` for text it cannot have
    written."""
    if text == "":
        return ()
    shares = []
    for part in text.split(","):
        fields = part.split(":")
        if len(fields) != 3:
            raise ValueError(f"a stored share is payee:ppm:fixed_msat, got {_shown(part)}")
        payee, ppm, fixed = fields
        if not PAYEE_NAME.fullmatch(payee):
            raise ValueError(f"a stored share names no valid payee: {_shown(part)}")
        if not (_whole(ppm) and _whole(fixed)):
            raise ValueError(
                f"a stored share's ppm and fixed msat are whole numbers of at most {MAX_DIGITS} "
                f"digits: {_shown(part)}"
            )
        shares.append(Share(payee, int(ppm), Msat(int(fixed))))
    return tuple(shares)


def parse_share(text: str) -> Share:
    """A share as the configuration writes it: ``"carol:30%"``, ``"carol:12.5%"`` (at most
    4 decimals: 0.0001% is 1 ppm), ``"dave:1000msat"``, ``"dave:2sat"``. ``ValueError`` with
    the reason: a bad payee name, a percent not in (0, 100] or too precise, an amount that is
    not a positive whole number, an unknown unit."""
    payee, colon, amount = text.strip().partition(":")
    payee, amount = payee.strip(), amount.strip()
    if not colon:
        raise ValueError(
            f"share {_shown(text)}: write it as payee:percent or payee:amount, e.g. carol:30% or "
            "dave:1000msat"
        )
    if not PAYEE_NAME.fullmatch(payee):
        raise ValueError(
            f"share {_shown(text)}: payee name {_shown(payee)} must be 1 to 64 of a-z, 0-9, "
            "'_' and '-', starting with a letter or digit"
        )
    if amount.endswith("%"):
        return Share(payee, ppm=_percent_ppm(text, amount[:-1].strip()))
    for unit, msat in (("msat", 1), ("sat", 1000)):  # msat first: it ends with "sat"
        if amount.endswith(unit):
            number = amount[: -len(unit)].strip()
            if not _whole(number) or int(number) == 0:
                raise ValueError(
                    f"share {_shown(text)}: the amount must be a positive whole number of "
                    f"{unit}, at most {MAX_DIGITS} digits (0-9)"
                )
            return Share(payee, fixed_msat=Msat(int(number) * msat))
    raise ValueError(
        f"share {_shown(text)}: unknown unit in {_shown(amount)}; use a percent (30%), msat or sat"
    )


def _whole(number: str) -> bool:
    """Whether ``number`` is a whole number of ASCII digits, at most ``MAX_DIGITS`` of them."""
    return len(number) <= MAX_DIGITS and _WHOLE.fullmatch(number) is not None


def _shown(text: str) -> str:
    """``text`` in a message: quoted, cut short."""
    return repr(text if len(text) <= 100 else text[:100] + "...")


def _percent_ppm(text: str, number: str) -> int:
    match = _PERCENT.fullmatch(number)
    if match is None or len(match.group(1)) > MAX_DIGITS:
        raise ValueError(
            f"share {_shown(text)}: the percent must be a number (0-9), e.g. 30% or 12.5%"
        )
    if match.group(2) is not None and len(match.group(2)) > _PERCENT_DECIMALS:
        raise ValueError(
            f"share {_shown(text)}: at most {_PERCENT_DECIMALS} decimals in a percent "
            "(0.0001% is 1 ppm)"
        )
    ppm = int(Decimal(number) * (PPM // 100))
    if not 0 < ppm <= PPM:
        raise ValueError(f"share {_shown(text)}: the percent must be above 0 and at most 100")
    return ppm


def format_share(share: Share) -> str:
    """A share as the configuration would write it: ``carol:30%``, ``dave:1000msat``, or
    ``erin:12.5%+1000msat`` for one with both parts (which ``parse_share`` does not read)."""
    parts = []
    if share.ppm:
        percent = Decimal(share.ppm) / (PPM // 100)
        parts.append(f"{percent.normalize():f}%")
    if share.fixed_msat or not parts:
        parts.append(f"{share.fixed_msat:d}msat")
    return f"{share.payee}:{'+'.join(parts)}"


def split_problem(split: Split) -> str | None:
    """What is wrong with ``split``, or None: each share names a valid payee and is some
    part of the payment (ppm in 0..1_000_000, fixed msat not negative, not both 0), each
    payee appears once, and the percentages add up to at most 100%."""
    seen: set[str] = set()
    for share in split:
        if not PAYEE_NAME.fullmatch(share.payee):
            return f"payee name {share.payee!r} must be 1 to 64 of a-z, 0-9, '_' and '-'"
        if not 0 <= share.ppm <= PPM or share.fixed_msat < 0:
            return f"payee {share.payee}: a share is 0 to 100% plus a fixed msat of 0 or more"
        if share.ppm == 0 and share.fixed_msat == 0:
            return f"payee {share.payee}: a share of nothing"
        if share.payee in seen:
            return f"payee {share.payee} appears more than once"
        seen.add(share.payee)
    total = sum(share.ppm for share in split)
    if total > PPM:
        percent = (Decimal(total) / (PPM // 100)).normalize()
        return f"the percentages add up to {percent:f}%, more than 100%"
    return None
