"""``gateway.cli.formats``: amounts printed exactly and read as the commands take them, and
the ``--state`` parser the listings share."""

from __future__ import annotations

import argparse

import pytest

from gateway.cli.formats import sat, sat_number, sat_to_msat, state_names, state_parser
from gateway.ports import LinkState, PayoutState


@pytest.mark.parametrize(
    ("msat", "text"),
    [
        (0, "0 sat"),
        (1, "0.001 sat"),
        (12_500, "12.5 sat"),
        (21_000, "21 sat"),
        (1_234_567_000, "1234567 sat"),
        (1_234_567_891, "1234567.891 sat"),
        (2_100_000_000_000_000_000, "2100000000000000 sat"),
        (-1_500, "-1.5 sat"),
    ],
)
def test_sat_is_exact(msat: int, text: str) -> None:
    assert sat(msat) == text
    assert sat_number(msat) == text.removesuffix(" sat")


@pytest.mark.parametrize(
    ("text", "msat"),
    [("21", 21_000), ("0.5", 500), ("21sat", 21_000), ("1500msat", 1_500), ("0", 0)],
)
def test_sat_to_msat(text: str, msat: int) -> None:
    assert sat_to_msat(text) == msat


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("-1", "'-1' is negative"),
        ("-0.5sat", "is negative"),
        ("1btc", "not an amount in sat"),
        ("0.0001", "msat precision"),
        ("inf", "msat precision"),
    ],
)
def test_sat_to_msat_refuses(text: str, reason: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=reason):
        sat_to_msat(text)


def test_one_state_parser_for_every_listing() -> None:
    assert state_parser(LinkState)("Canceled") is LinkState.CANCELED
    assert state_parser(PayoutState)("succeeded") is PayoutState.SUCCEEDED
    assert state_names(PayoutState) == ["pending", "succeeded", "failed"]
    with pytest.raises(argparse.ArgumentTypeError, match="use one of open, paid, expired"):
        state_parser(LinkState)("gone")
