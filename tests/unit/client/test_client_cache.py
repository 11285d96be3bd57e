"""The token cache: scope, expiry, refusals, pending entries, the 0600 file written atomically
and locked, its file work off the event loop."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from gateway import l402
from gateway.client import CachedToken, PendingPayment, TokenCache, TokenCacheError, body_digest
from gateway.client.tokens import new_token, scope_of, split_url
from tests.fakes import NOW
from tests.unit.client.client_helpers import make_challenge, make_macaroon

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


async def test_token_is_offered_within_its_origin_and_scope() -> None:
    cache = TokenCache()
    paid = token()
    await cache.store(paid, NOW)
    assert paid.scope == "/api/premium/"
    assert paid.url == f"{ORIGIN}/api/premium/fortune"
    for url in (
        f"{ORIGIN}/api/premium/fortune",
        f"{ORIGIN}/api/premium/fortune?n=2",
        f"{ORIGIN}/api/premium/other/deeper",
        "HTTP://API.TEST:8080/api/premium/x",
    ):
        assert await cache.find(url, "GET", NOW) == paid, url
    for url in (
        f"{ORIGIN}/api/quote",
        f"{ORIGIN}/api/premiumx",
        "http://api.test:8081/api/premium/fortune",
        "https://api.test:8080/api/premium/fortune",
        "http://other.test:8080/api/premium/fortune",
    ):
        assert await cache.find(url, "GET", NOW) is None, url
    assert paid.authorization == f"L402 {paid.macaroon_b64}:{paid.preimage.hex()}"
    assert paid.preimage.hex() not in repr(paid)


async def test_expired_tokens_are_not_offered_and_dropped_on_the_next_store() -> None:
    cache = TokenCache()
    short = token(valid_until=int(NOW) + 10)
    await cache.store(short, NOW)
    assert await cache.find(f"{ORIGIN}/api/premium/a", "GET", NOW + 9) == short
    assert await cache.find(f"{ORIGIN}/api/premium/a", "GET", NOW + 10) is None
    forever = token(f"{ORIGIN}/free/x", valid_until=None)
    await cache.store(forever, NOW + 20)
    assert await cache.tokens() == [forever]
    assert await cache.find(f"{ORIGIN}/free/y", "GET", NOW + 10**9) == forever


async def test_402_excludes_the_path_401_drops_the_token() -> None:
    cache = TokenCache()
    paid = token(f"{ORIGIN}/api/echo")  # scope /api/
    await cache.store(paid, NOW)
    quote = f"{ORIGIN}/api/quote"
    assert await cache.find(quote, "GET", NOW) == paid
    await cache.refused(paid.payment_hash, quote, 402)  # another service's route
    assert await cache.find(quote, "GET", NOW) is None
    assert await cache.find(f"{ORIGIN}/api/echo", "GET", NOW) is not None
    await cache.refused(paid.payment_hash, quote, 402)  # twice: no change
    (kept,) = await cache.tokens()
    assert kept.refused == ("/api/quote",)
    await cache.refused(paid.payment_hash, f"{ORIGIN}/api/echo", 401)  # revoked
    assert await cache.tokens() == []
    await cache.refused(paid.payment_hash, quote, 402)  # unknown token: ignored


async def test_402_where_the_token_had_worked_drops_it() -> None:
    cache = TokenCache()
    paid = token()
    await cache.store(paid, NOW)
    url = f"{ORIGIN}/api/premium/fortune"
    await cache.worked(paid.payment_hash, url)
    await cache.worked(paid.payment_hash, url)
    (kept,) = await cache.tokens()
    assert kept.worked == ("/api/premium/fortune",)
    await cache.refused(paid.payment_hash, url, 402)  # e.g. expired early on the server
    assert await cache.tokens() == []


async def test_the_best_fitting_token_wins() -> None:
    cache = TokenCache()
    broad = token(f"{ORIGIN}/api/echo", created_at=NOW + 5)  # scope /api/, newest
    narrow = token(f"{ORIGIN}/api/premium/fortune", created_at=NOW)  # scope /api/premium/
    await cache.store(broad, NOW)
    await cache.store(narrow, NOW)
    assert await cache.find(f"{ORIGIN}/api/premium/x", "GET", NOW) == narrow  # longest scope
    assert await cache.find(f"{ORIGIN}/api/other", "GET", NOW) == broad
    # A token that already worked for exactly this path beats a longer scope.
    await cache.worked(broad.payment_hash, f"{ORIGIN}/api/premium/x")
    found = await cache.find(f"{ORIGIN}/api/premium/x", "GET", NOW)
    assert found is not None
    assert found.payment_hash == broad.payment_hash
    # Equal fit: the newest.
    newer = token(f"{ORIGIN}/api/premium/y", created_at=NOW + 10)
    await cache.store(newer, NOW)
    assert await cache.find(f"{ORIGIN}/api/premium/z", "GET", NOW) == newer


async def test_paths_and_methods_caveats_decide_when_present() -> None:
    cache = TokenCache()
    paid = token(
        f"{ORIGIN}/api/premium/fortune",
        extra=(
            l402.paths_caveat("premium", ["/v2/*", "/api/premium/*"]),
            l402.methods_caveat("premium", ["GET"]),
        ),
    )
    await cache.store(paid, NOW)
    assert paid.path_globs == (("/v2/*", "/api/premium/*"),)
    assert await cache.find(f"{ORIGIN}/v2/anything", "GET", NOW) == paid  # outside the path scope
    assert await cache.find(f"{ORIGIN}/api/other", "GET", NOW) is None
    assert await cache.find(f"{ORIGIN}/v2/anything", "POST", NOW) is None
    assert await cache.find(f"{ORIGIN}/v2/anything", "get", NOW) == paid


async def test_store_keeps_at_most_max_tokens() -> None:
    cache = TokenCache(max_tokens=2)
    tokens = [token(f"{ORIGIN}/t{i}/x", created_at=NOW + i) for i in range(3)]
    for each in tokens:
        await cache.store(each, NOW)
    assert {t.payment_hash for t in await cache.tokens()} == {t.payment_hash for t in tokens[1:]}


async def test_pending_entries_and_their_scope() -> None:
    cache = TokenCache()
    entry = pending()
    await cache.add_pending(entry)
    assert await cache.pending() == [entry]
    assert await cache.pending(ORIGIN) == [entry]
    assert await cache.pending("http://other.test") == []
    assert entry.covers(f"{ORIGIN}/api/premium/other")
    assert not entry.covers(f"{ORIGIN}/api/quote")
    assert not entry.covers("http://other.test/api/premium/fortune")
    # Storing the token clears the pending entry of the same payment.
    paid = new_token(entry.url, "L402", entry.macaroon_b64, b"\1" * 32, 10_000, NOW)
    assert paid.payment_hash == entry.payment_hash
    await cache.store(paid, NOW)
    assert await cache.pending() == []
    await cache.add_pending(entry)
    await cache.drop_pending(entry.payment_hash)
    await cache.drop_pending(entry.payment_hash)
    assert await cache.pending() == []


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_file_is_private_and_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "tokens.json"
    cache = TokenCache(path)
    assert await cache.tokens() == []
    assert not path.exists()
    paid = token()
    entry = pending(f"{ORIGIN}/api/echo")
    await cache.store(paid, NOW)
    await cache.add_pending(entry)
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    assert sorted(os.listdir(path.parent)) == ["tokens.json", "tokens.json.lock"]
    document = json.loads(path.read_text())
    assert document["version"] == 1
    assert document["tokens"][0]["preimage"] == paid.preimage.hex()

    reopened = TokenCache(path)
    assert await reopened.tokens() == [paid]
    assert await reopened.pending() == [entry]
    assert await reopened.find(f"{ORIGIN}/api/premium/x", "GET", NOW) == paid


async def test_a_looser_file_is_replaced_by_a_private_one(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    await TokenCache(path).store(token(), NOW)
    path.chmod(0o644)
    cache = TokenCache(path)
    await cache.add_pending(pending())
    assert _mode(path) == 0o600


async def test_two_caches_on_one_file_do_not_lose_each_others_entries(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    first, second = TokenCache(path), TokenCache(path)
    a, b = token(f"{ORIGIN}/a/x"), token(f"{ORIGIN}/b/x")
    assert await first.tokens() == []
    assert await second.tokens() == []
    await first.store(a, NOW)
    await second.store(b, NOW)
    assert {t.payment_hash for t in await TokenCache(path).tokens()} == {
        a.payment_hash,
        b.payment_hash,
    }
    assert await second.find(f"{ORIGIN}/a/y", "GET", NOW) == a  # re-read after the other's write


async def test_a_failed_write_leaves_the_old_file_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "tokens.json"
    cache = TokenCache(path)
    await cache.store(token(), NOW)
    before = path.read_bytes()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(TokenCacheError, match="No space left"):
        await cache.add_pending(pending())
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["tokens.json", "tokens.json.lock"]  # no temp left
    assert await TokenCache(path).pending() == []


# Holds an exclusive flock on argv[1] until stdin closes (or for 10 s at most).
HOLD_LOCK = """
import fcntl, os, select, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
select.select([sys.stdin], [], [], 10.0)
"""


async def test_a_lock_held_by_another_process_stalls_the_change_not_the_loop(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tokens.json"
    cache = TokenCache(path)
    paid = token()
    await cache.store(paid, NOW)
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HOLD_LOCK,
        f"{path}.lock",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert holder.stdin is not None
    assert holder.stdout is not None
    entry = pending(f"{ORIGIN}/api/echo")
    try:
        assert await holder.stdout.readline() == b"locked\n"
        adding = asyncio.create_task(cache.add_pending(entry))
        started = time.monotonic()
        for _ in range(5):  # other tasks run while the change waits for the lock ...
            await asyncio.sleep(0.01)
        assert time.monotonic() - started < 5.0
        assert not adding.done()
        # ... and the cache still answers: reading takes no lock.
        assert await cache.find(f"{ORIGIN}/api/premium/x", "GET", NOW) == paid
        assert await cache.pending() == []
    finally:
        holder.stdin.close()  # the other process lets go
        await holder.wait()
    await asyncio.wait_for(adding, 10)
    assert await TokenCache(path).pending() == [entry]


async def test_concurrent_changes_are_all_kept(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    first, second = TokenCache(path), TokenCache(path)
    tokens = [token(f"{ORIGIN}/t{i}/x") for i in range(20)]
    await asyncio.gather(
        *(first.store(each, NOW) for each in tokens[::2]),
        *(second.store(each, NOW) for each in tokens[1::2]),
    )
    assert {t.payment_hash for t in await TokenCache(path).tokens()} == {
        t.payment_hash for t in tokens
    }


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
async def test_a_corrupt_file_is_an_error_never_a_fresh_start(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "tokens.json"
    path.write_bytes(content)
    cache = TokenCache(path)
    with pytest.raises(TokenCacheError, match="corrupt"):
        await cache.pending()
    with pytest.raises(TokenCacheError, match="corrupt"):
        await cache.add_pending(pending())
    assert path.read_bytes() == content


async def test_a_token_with_a_bad_macaroon_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    cache = TokenCache(path)
    await cache.store(token(), NOW)
    document = json.loads(path.read_text())
    document["tokens"][0]["macaroon"] = "AAAA"
    path.write_text(json.dumps(document))
    with pytest.raises(TokenCacheError, match="corrupt"):
        await TokenCache(path).tokens()


async def test_a_pay_on_success_binding_round_trips_and_older_files_load(tmp_path: Path) -> None:
    """The request body's digest is kept with a pay-on-success token and its pending entry,
    written only when set; a file without it (an older client's) loads, and its token is
    offered to no request, since which body it paid for is not known."""
    path = tmp_path / "tokens.json"
    url = f"{ORIGIN}/api/jobs?id=1"
    job = body_digest(b"job 1")
    challenge = make_challenge()
    bound = new_token(
        url,
        "L402",
        challenge.macaroon_b64,
        challenge.preimage,
        10_000,
        NOW,
        "POST /api/jobs?id=1",
        job,
    )
    plain = token()
    entry = replace(
        pending(url), method="POST", paid_request="POST /api/jobs?id=1", paid_body_sha256=job
    )
    cache = TokenCache(path)
    await cache.store(bound, NOW)
    await cache.store(plain, NOW)
    await cache.add_pending(entry)
    document = json.loads(path.read_text())
    by_hash = {raw["payment_hash"]: raw for raw in document["tokens"]}
    assert by_hash[bound.payment_hash.hex()]["paid_body_sha256"] == job
    assert "paid_body_sha256" not in by_hash[plain.payment_hash.hex()]
    assert "paid_request" not in by_hash[plain.payment_hash.hex()]
    assert document["pending"][0]["paid_body_sha256"] == job

    reopened = TokenCache(path)
    assert sorted(await reopened.tokens(), key=lambda t: t.url) == sorted(
        [bound, plain], key=lambda t: t.url
    )
    assert await reopened.pending() == [entry]
    assert await reopened.find(url, "POST", NOW, job) == bound
    assert await reopened.find(url, "POST", NOW, body_digest(b"job 2")) is None
    assert await reopened.find(url, "POST", NOW) is None

    # An older file: the binding to the request only.
    for raw in document["tokens"]:
        raw.pop("paid_body_sha256", None)
    for raw in document["pending"]:
        raw.pop("paid_body_sha256", None)
    path.write_text(json.dumps(document))
    older = TokenCache(path)
    loaded = {t.payment_hash: t for t in await older.tokens()}
    assert loaded[bound.payment_hash] == replace(bound, paid_body_sha256=None)
    assert loaded[plain.payment_hash] == plain
    [old_entry] = await older.pending()
    assert old_entry == replace(entry, paid_body_sha256=None)
    for body in (job, body_digest(None), None):
        assert await older.find(url, "POST", NOW, body) is None
    assert not old_entry.covers(url, "POST", job)

    # Not a digest: corrupt, never silently unbound.
    document["tokens"][0]["paid_body_sha256"] = "job 1"
    path.write_text(json.dumps(document))
    with pytest.raises(TokenCacheError, match="corrupt"):
        await TokenCache(path).tokens()


def test_macaroon_helper_builds_l402_identifiers() -> None:
    challenge = make_challenge()
    macaroon = l402.decode_b64(make_macaroon(challenge.payment_hash))
    assert l402.Identifier.decode(macaroon.identifier).payment_hash == challenge.payment_hash
