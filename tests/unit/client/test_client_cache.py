"""The token cache: scope, expiry, refusals, pending entries, the 0600 file written atomically."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from gateway import l402
from gateway.client import CachedToken, PendingPayment, TokenCache, TokenCacheError
from gateway.client.cache import new_token, scope_of, split_url
from tests.unit.client.client_helpers import NOW, make_challenge, make_macaroon

ORIGIN = "http://api.test:8080"


def token(
    url: str = f"{ORIGIN}/api/premium/fortune",
    *,
    created_at: float = NOW,
    valid_until: int | None = int(NOW) + 3600,
    extra: tuple[str, ...] = (),
    service: str = "premium",
) -> CachedToken:
    challenge = make_challenge(valid_until=valid_until, extra_caveats=extra, service=service)
    return new_token(url, "L402", challenge.macaroon_b64, challenge.preimage, 10_000, created_at)


def pending(url: str = f"{ORIGIN}/api/premium/fortune") -> PendingPayment:
    challenge = make_challenge()
    origin, path = split_url(url)
    return PendingPayment(
        origin=origin,
        scope=scope_of(path),
        url=url,
        method="GET",
        scheme="L402",
        macaroon_b64=challenge.macaroon_b64,
        invoice=challenge.invoice,
        payment_hash=challenge.payment_hash,
        amount_msat=10_000,
        destination="02" * 33,
        description="premium: GET /api/premium/fortune",
        created_at=NOW,
    )


def test_split_url_and_scope() -> None:
    assert split_url("HTTP://Api.Test:80/a/b?q=1#f") == ("http://api.test", "/a/b")
    assert split_url("https://api.test:443") == ("https://api.test", "/")
    assert split_url("https://api.test:8443/x") == ("https://api.test:8443", "/x")
    assert split_url("http://[::1]:8080/x/") == ("http://[::1]:8080", "/x/")
    with pytest.raises(ValueError, match="absolute"):
        split_url("/relative")
    assert scope_of("/api/premium/fortune") == "/api/premium/"
    assert scope_of("/api/echo") == "/api/"
    assert scope_of("/") == "/"
    assert scope_of("/dir/") == "/dir/"


def test_token_is_offered_within_its_origin_and_scope() -> None:
    cache = TokenCache()
    paid = token()
    cache.store(paid, NOW)
    assert paid.scope == "/api/premium/"
    assert paid.url == f"{ORIGIN}/api/premium/fortune"
    for url in (
        f"{ORIGIN}/api/premium/fortune",
        f"{ORIGIN}/api/premium/fortune?n=2",
        f"{ORIGIN}/api/premium/other/deeper",
        "HTTP://API.TEST:8080/api/premium/x",
    ):
        assert cache.find(url, "GET", NOW) == paid, url
    for url in (
        f"{ORIGIN}/api/quote",
        f"{ORIGIN}/api/premiumx",
        "http://api.test:8081/api/premium/fortune",
        "https://api.test:8080/api/premium/fortune",
        "http://other.test:8080/api/premium/fortune",
    ):
        assert cache.find(url, "GET", NOW) is None, url
    assert paid.authorization == f"L402 {paid.macaroon_b64}:{paid.preimage.hex()}"
    assert paid.preimage.hex() not in repr(paid)


def test_expired_tokens_are_not_offered_and_dropped_on_the_next_store() -> None:
    cache = TokenCache()
    short = token(valid_until=int(NOW) + 10)
    cache.store(short, NOW)
    assert cache.find(f"{ORIGIN}/api/premium/a", "GET", NOW + 9) == short
    assert cache.find(f"{ORIGIN}/api/premium/a", "GET", NOW + 10) is None
    forever = token(f"{ORIGIN}/free/x", valid_until=None)
    cache.store(forever, NOW + 20)
    assert cache.tokens() == [forever]
    assert cache.find(f"{ORIGIN}/free/y", "GET", NOW + 10**9) == forever


def test_402_excludes_the_path_401_drops_the_token() -> None:
    cache = TokenCache()
    paid = token(f"{ORIGIN}/api/echo")  # scope /api/
    cache.store(paid, NOW)
    quote = f"{ORIGIN}/api/quote"
    assert cache.find(quote, "GET", NOW) == paid
    cache.refused(paid.payment_hash, quote, 402)  # another service's route
    assert cache.find(quote, "GET", NOW) is None
    assert cache.find(f"{ORIGIN}/api/echo", "GET", NOW) is not None
    cache.refused(paid.payment_hash, quote, 402)  # twice: no change
    (kept,) = cache.tokens()
    assert kept.refused == ("/api/quote",)
    cache.refused(paid.payment_hash, f"{ORIGIN}/api/echo", 401)  # revoked
    assert cache.tokens() == []
    cache.refused(paid.payment_hash, quote, 402)  # unknown token: ignored


def test_402_where_the_token_had_worked_drops_it() -> None:
    cache = TokenCache()
    paid = token()
    cache.store(paid, NOW)
    url = f"{ORIGIN}/api/premium/fortune"
    cache.worked(paid.payment_hash, url)
    cache.worked(paid.payment_hash, url)
    (kept,) = cache.tokens()
    assert kept.worked == ("/api/premium/fortune",)
    cache.refused(paid.payment_hash, url, 402)  # e.g. expired early on the server
    assert cache.tokens() == []


def test_the_best_fitting_token_wins() -> None:
    cache = TokenCache()
    broad = token(f"{ORIGIN}/api/echo", created_at=NOW + 5)  # scope /api/, newest
    narrow = token(f"{ORIGIN}/api/premium/fortune", created_at=NOW)  # scope /api/premium/
    cache.store(broad, NOW)
    cache.store(narrow, NOW)
    assert cache.find(f"{ORIGIN}/api/premium/x", "GET", NOW) == narrow  # longest scope
    assert cache.find(f"{ORIGIN}/api/other", "GET", NOW) == broad
    # A token that already worked for exactly this path beats a longer scope.
    cache.worked(broad.payment_hash, f"{ORIGIN}/api/premium/x")
    found = cache.find(f"{ORIGIN}/api/premium/x", "GET", NOW)
    assert found is not None
    assert found.payment_hash == broad.payment_hash
    # Equal fit: the newest.
    newer = token(f"{ORIGIN}/api/premium/y", created_at=NOW + 10)
    cache.store(newer, NOW)
    assert cache.find(f"{ORIGIN}/api/premium/z", "GET", NOW) == newer


def test_paths_and_methods_caveats_decide_when_present() -> None:
    cache = TokenCache()
    paid = token(
        f"{ORIGIN}/api/premium/fortune",
        extra=(
            l402.paths_caveat("premium", ["/v2/*", "/api/premium/*"]),
            l402.methods_caveat("premium", ["GET"]),
        ),
    )
    cache.store(paid, NOW)
    assert paid.path_globs == (("/v2/*", "/api/premium/*"),)
    assert cache.find(f"{ORIGIN}/v2/anything", "GET", NOW) == paid  # outside the path scope
    assert cache.find(f"{ORIGIN}/api/other", "GET", NOW) is None
    assert cache.find(f"{ORIGIN}/v2/anything", "POST", NOW) is None
    assert cache.find(f"{ORIGIN}/v2/anything", "get", NOW) == paid


def test_store_keeps_at_most_max_tokens() -> None:
    cache = TokenCache(max_tokens=2)
    tokens = [token(f"{ORIGIN}/t{i}/x", created_at=NOW + i) for i in range(3)]
    for each in tokens:
        cache.store(each, NOW)
    assert {t.payment_hash for t in cache.tokens()} == {t.payment_hash for t in tokens[1:]}


def test_pending_entries_and_their_scope() -> None:
    cache = TokenCache()
    entry = pending()
    cache.add_pending(entry)
    assert cache.pending() == [entry]
    assert cache.pending(ORIGIN) == [entry]
    assert cache.pending("http://other.test") == []
    assert entry.covers(f"{ORIGIN}/api/premium/other")
    assert not entry.covers(f"{ORIGIN}/api/quote")
    assert not entry.covers("http://other.test/api/premium/fortune")
    # Storing the token clears the pending entry of the same payment.
    paid = new_token(entry.url, "L402", entry.macaroon_b64, b"\1" * 32, 10_000, NOW)
    assert paid.payment_hash == entry.payment_hash
    cache.store(paid, NOW)
    assert cache.pending() == []
    cache.add_pending(entry)
    cache.drop_pending(entry.payment_hash)
    cache.drop_pending(entry.payment_hash)
    assert cache.pending() == []


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_file_is_private_and_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "tokens.json"
    cache = TokenCache(path)
    assert cache.tokens() == []
    assert not path.exists()
    paid = token()
    entry = pending(f"{ORIGIN}/api/echo")
    cache.store(paid, NOW)
    cache.add_pending(entry)
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    assert sorted(os.listdir(path.parent)) == ["tokens.json", "tokens.json.lock"]
    document = json.loads(path.read_text())
    assert document["version"] == 1
    assert document["tokens"][0]["preimage"] == paid.preimage.hex()

    reopened = TokenCache(path)
    assert reopened.tokens() == [paid]
    assert reopened.pending() == [entry]
    assert reopened.find(f"{ORIGIN}/api/premium/x", "GET", NOW) == paid


def test_a_looser_file_is_replaced_by_a_private_one(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    TokenCache(path).store(token(), NOW)
    path.chmod(0o644)
    cache = TokenCache(path)
    cache.add_pending(pending())
    assert _mode(path) == 0o600


def test_two_caches_on_one_file_do_not_lose_each_others_entries(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    first, second = TokenCache(path), TokenCache(path)
    a, b = token(f"{ORIGIN}/a/x"), token(f"{ORIGIN}/b/x")
    assert first.tokens() == []
    assert second.tokens() == []
    first.store(a, NOW)
    second.store(b, NOW)
    assert {t.payment_hash for t in TokenCache(path).tokens()} == {a.payment_hash, b.payment_hash}
    assert second.find(f"{ORIGIN}/a/y", "GET", NOW) == a  # re-read after the other's write


def test_a_failed_write_leaves_the_old_file_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "tokens.json"
    cache = TokenCache(path)
    cache.store(token(), NOW)
    before = path.read_bytes()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(TokenCacheError, match="No space left"):
        cache.add_pending(pending())
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["tokens.json", "tokens.json.lock"]  # no temp left
    assert TokenCache(path).pending() == []


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b"[]",
        b'{"version": 2, "tokens": [], "pending": []}',
        b'{"version": 1, "tokens": [{"origin": "x"}], "pending": []}',
        b'{"version": 1, "tokens": [], "pending": [{"payment_hash": "zz"}]}',
    ],
)
def test_a_corrupt_file_is_an_error_never_a_fresh_start(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "tokens.json"
    path.write_bytes(content)
    cache = TokenCache(path)
    with pytest.raises(TokenCacheError, match="corrupt"):
        cache.pending()
    with pytest.raises(TokenCacheError, match="corrupt"):
        cache.add_pending(pending())
    assert path.read_bytes() == content


def test_a_token_with_a_bad_macaroon_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    cache = TokenCache(path)
    cache.store(token(), NOW)
    document = json.loads(path.read_text())
    document["tokens"][0]["macaroon"] = "AAAA"
    path.write_text(json.dumps(document))
    with pytest.raises(TokenCacheError, match="corrupt"):
        TokenCache(path).tokens()


def test_macaroon_helper_builds_l402_identifiers() -> None:
    challenge = make_challenge()
    macaroon = l402.decode_b64(make_macaroon(challenge.payment_hash))
    assert l402.Identifier.decode(macaroon.identifier).payment_hash == challenge.payment_hash
