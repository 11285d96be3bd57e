"""Split arithmetic (``gateway.splits``): allocation, the ledger entries of a payment, the
stored text, the configuration's share form and the checks."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.ports import Msat, Share, Split
from gateway.splits import (
    MERCHANT,
    PAYEE_NAME,
    allocate,
    decode_split,
    encode_split,
    format_share,
    ledger_entries,
    parse_share,
    split_problem,
)

names = st.from_regex(PAYEE_NAME, fullmatch=True)
shares = st.builds(
    Share,
    payee=names,
    ppm=st.integers(0, 1_000_000),
    fixed_msat=st.integers(0, 10**12).map(Msat),
)
splits = st.lists(shares, max_size=6).map(tuple)
amounts = st.integers(0, 10**15)


def test_a_percent_share_rounds_down_and_the_merchant_keeps_the_remainder() -> None:
    split = (Share("carol", 300_000), Share("dave", 125_000))
    assert allocate(split, 10_001) == [("carol", 3000), ("dave", 1250)]
    assert ledger_entries(split, 10_001) == [("carol", 3000), ("dave", 1250), (MERCHANT, 5751)]


def test_a_fixed_share_is_paid_first_come_while_the_payment_lasts() -> None:
    split = (Share("carol", fixed_msat=Msat(700)), Share("dave", 500_000, Msat(100)))
    assert allocate(split, 1000) == [("carol", 700), ("dave", 300)]
    assert allocate(split, 500) == [("carol", 500), ("dave", 0)]
    # a share of 0 is no entry, the merchant's part always one
    assert ledger_entries(split, 500) == [("carol", 500), (MERCHANT, 0)]


def test_a_whole_percent_split_takes_everything() -> None:
    split = (Share("carol", 600_000), Share("dave", 400_000))
    assert allocate(split, 999) == [("carol", 599), ("dave", 399)]
    assert ledger_entries(split, 1_000) == [("carol", 600), ("dave", 400), (MERCHANT, 0)]


def test_nothing_to_split_makes_no_entries() -> None:
    assert ledger_entries((Share("carol", 300_000),), 0) == []
    assert allocate((Share("carol", 300_000),), -5) == [("carol", 0)]
    assert ledger_entries((), 1000) == [(MERCHANT, 1000)]


def test_entries_are_sorted_by_payee_and_a_repeated_payee_summed() -> None:
    split = (Share("zed", 100_000), Share("amy", 100_000), Share("zed", fixed_msat=Msat(5)))
    assert ledger_entries(split, 1000) == [("amy", 100), ("zed", 105), (MERCHANT, 795)]


@given(splits, amounts)
def test_shares_never_exceed_the_amount(split: Split, amount: int) -> None:
    allocated = allocate(split, amount)
    assert [payee for payee, _ in allocated] == [share.payee for share in split]
    assert all(share >= 0 for _, share in allocated)
    assert sum(share for _, share in allocated) <= amount
    entries = ledger_entries(split, amount)
    if amount:
        assert entries[-1][0] == MERCHANT
        assert sum(share for _, share in entries) == amount
        assert all(share >= 0 for _, share in entries)
    else:
        assert entries == []


@given(splits, amounts)
def test_each_share_is_at_most_what_it_asks(split: Split, amount: int) -> None:
    for share, (_, allocated) in zip(split, allocate(split, amount), strict=True):
        assert allocated <= share.fixed_msat + amount * share.ppm // 1_000_000


@given(splits)
def test_the_stored_text_round_trips(split: Split) -> None:
    text = encode_split(split)
    assert decode_split(text) == split
    assert isinstance(text, str)


def test_the_stored_text() -> None:
    split = (Share("carol", 300_000), Share("dave", fixed_msat=Msat(1000)))
    assert encode_split(split) == "carol:300000:0,dave:0:1000"
    assert encode_split(()) == ""
    assert decode_split("") == ()


@pytest.mark.parametrize(
    "text",
    [
        "carol",
        "carol:1",
        "carol:1:2:3",
        "Carol:1:2",
        "carol:-1:0",
        "carol:1:x",
        "carol:1:2,",
        ",carol:1:2",
        "carol:1.5:0",
        "carol:\u0663\u0660:0",  # Arabic-Indic digits: not ASCII
        "carol:1:" + "9" * 18,
        "carol:1:" + "9" * 5000,  # not int()'s limit message
    ],
)
def test_undecodable_text_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="stored share"):
        decode_split(text)


@pytest.mark.parametrize(
    ("text", "share"),
    [
        ("carol:30%", Share("carol", 300_000)),
        ("carol:12.5%", Share("carol", 125_000)),
        ("carol:0.0001%", Share("carol", 1)),
        ("carol:100%", Share("carol", 1_000_000)),
        ("carol:100.0000%", Share("carol", 1_000_000)),
        (" erin_2 : 7 % ", Share("erin_2", 70_000)),
        ("dave:1000msat", Share("dave", fixed_msat=Msat(1000))),
        ("dave:2sat", Share("dave", fixed_msat=Msat(2000))),
        ("9-lives:1msat", Share("9-lives", fixed_msat=Msat(1))),
    ],
)
def test_a_configured_share_is_read(text: str, share: Share) -> None:
    assert parse_share(text) == share


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("carol", "payee:percent or payee:amount"),
        ("Carol:30%", "payee name 'Carol'"),
        ("-carol:30%", "payee name"),
        (":30%", "payee name ''"),
        ("c" * 65 + ":30%", "payee name"),
        ("carol:0%", "above 0 and at most 100"),
        ("carol:100.0001%", "above 0 and at most 100"),
        ("carol:250%", "above 0 and at most 100"),
        ("carol:12.00001%", "at most 4 decimals"),
        ("carol:-5%", "must be a number"),
        ("carol:1e2%", "must be a number"),
        ("carol:%", "must be a number"),
        ("dave:0msat", "positive whole number of msat"),
        ("dave:1.5sat", "positive whole number of sat"),
        ("dave:-3sat", "positive whole number of sat"),
        ("dave:msat", "positive whole number of msat"),
        ("dave:1000", "unknown unit"),
        ("dave:5btc", "unknown unit"),
        # Only ASCII digits ("\d" also takes other scripts': these would be 30)
        ("carol:\u0663\u0660%", "must be a number (0-9)"),
        ("carol:\uff13\uff10%", "must be a number (0-9)"),
        ("dave:\u0663\u0660msat", "positive whole number of msat, at most 17 digits (0-9)"),
        ("dave:" + "9" * 18 + "msat", "at most 17 digits"),
        ("dave:" + "9" * 5000 + "sat", "at most 17 digits"),
        ("carol:" + "1" * 5000 + "%", "must be a number"),
    ],
)
def test_a_bad_share_is_refused_with_its_reason(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)) as raised:
        parse_share(text)
    assert len(str(raised.value)) < 300  # a long share is shown cut short


def test_the_largest_amount_written_is_read() -> None:
    assert parse_share("dave:" + "9" * 17 + "msat").fixed_msat == 10**17 - 1


@given(names, st.integers(1, 1_000_000))
def test_a_formatted_percent_share_reads_back(payee: str, ppm: int) -> None:
    share = Share(payee, ppm)
    assert parse_share(format_share(share)) == share


def test_shares_are_formatted_as_configured() -> None:
    assert format_share(Share("carol", 300_000)) == "carol:30%"
    assert format_share(Share("carol", 125_000)) == "carol:12.5%"
    assert format_share(Share("dave", fixed_msat=Msat(1000))) == "dave:1000msat"
    assert format_share(Share("erin", 10_000, Msat(5))) == "erin:1%+5msat"


def test_a_good_split_has_no_problem() -> None:
    assert split_problem(()) is None
    assert split_problem((Share("carol", 600_000), Share("dave", 400_000, Msat(5)))) is None


@pytest.mark.parametrize(
    ("split", "problem"),
    [
        ((Share("carol", 300_000), Share("carol", 100_000)), "carol appears more than once"),
        ((Share("carol", 600_000), Share("dave", 400_001)), "add up to 100.0001%, more than"),
        ((Share("Carol", 1),), "payee name 'Carol'"),
        ((Share("carol"),), "a share of nothing"),
        ((Share("carol", -1),), "0 to 100%"),
        ((Share("carol", 1_000_001),), "0 to 100%"),
        ((Share("carol", fixed_msat=Msat(-1)),), "0 to 100%"),
    ],
)
def test_a_bad_split_is_described(split: Split, problem: str) -> None:
    found = split_problem(split)
    assert found is not None
    assert problem in found
