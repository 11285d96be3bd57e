"""The PostgreSQL schema of ``PostgresStore`` (``gateway.store.postgres``), its migrations, and
the advisory lock keys the instances sharing a database agree on.

``MIGRATIONS`` is the ordered list of steps; the ``schema_version`` table holds how many are
applied. ``migrate()`` applies the missing ones in one transaction under an advisory lock, so
instances starting at once migrate one after the other (the later ones find nothing to do),
and refuses a database whose version is newer than this code knows (``SchemaVersionError``).
Append new steps; never edit a released one.

The tables mirror SQLite's (``gateway.store.sqlite_file``) with PostgreSQL types: ``bytea``
for hashes and keys, ``bigint`` for msat and indices, ``double precision`` for unix times. A
``seq`` identity column plays SQLite's rowid where rows created in the same instant need an
order (and a key to prune by).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, TypeAlias

from gateway.errors import ConfigError, SchemaVersionError, StoreError

if TYPE_CHECKING:
    from asyncpg import Record
    from asyncpg.pool import PoolConnectionProxy

log = logging.getLogger(__name__)

# A pooled connection (a proxy: not subscriptable at run time).
Connection: TypeAlias = "PoolConnectionProxy[Record]"

# Advisory lock keys (bigint), shared by every instance on the database; all begin with
# "L402" (``gateway.leader.LEADER_LOCK`` too). The two-int form of the per-client held-request
# locks (``HELD_CLIENT_LOCKS``) is a key space of its own, so it never meets these.
MIGRATION_LOCK = 0x4C34_3032_0000_0001
EVENTS_LOCK = 0x4C34_3032_0000_0002
FAN_OUT_LOCK = 0x4C34_3032_0000_0003
HELD_LOCK = 0x4C34_3032_0000_0004
HELD_CLIENT_LOCKS = 0x4C34_3032  # the first int of pg_advisory_xact_lock(int, int)

# Step n (1-based) brings the schema from version n-1 to n.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: everything SQLite's steps 1 to 5 built, plus the shared rate limit buckets.
    (
        """
        CREATE TABLE root_keys (
            key_id     bytea PRIMARY KEY,  -- sha256(macaroon identifier)
            token_id   bytea NOT NULL,
            root_key   bytea NOT NULL,
            created_at double precision NOT NULL
        )
        """,
        "CREATE INDEX root_keys_token_id ON root_keys (token_id)",
        """
        CREATE TABLE invoices (
            seq              bigint GENERATED ALWAYS AS IDENTITY,
            payment_hash     bytea PRIMARY KEY,
            payment_request  text NOT NULL,
            amount_msat      bigint NOT NULL,
            token_id         bytea NOT NULL,
            service          text NOT NULL,
            method           text NOT NULL,
            path             text NOT NULL,
            state            text NOT NULL CHECK (
                                 state IN ('OPEN', 'ACCEPTED', 'SETTLED', 'CANCELED', 'EXPIRED')
                             ),
            created_at       double precision NOT NULL,
            expires_at       double precision NOT NULL,
            add_index        bigint NOT NULL,
            settle_index     bigint NOT NULL,
            amount_paid_msat bigint NOT NULL,
            settled_at       double precision,
            buys_credit      boolean NOT NULL
        )
        """,
        "CREATE INDEX invoices_created_at ON invoices (created_at, seq)",
        "CREATE INDEX invoices_state_created_at ON invoices (state, created_at, seq)",
        "CREATE INDEX invoices_state_expires_at ON invoices (state, expires_at)",
        "CREATE INDEX invoices_token_id ON invoices (token_id)",
        """
        CREATE TABLE cursor (
            id           integer PRIMARY KEY CHECK (id = 0),
            add_index    bigint NOT NULL,
            settle_index bigint NOT NULL
        )
        """,
        "INSERT INTO cursor (id, add_index, settle_index) VALUES (0, 0, 0)",
        # The CHECKs are the last line against a balance going negative.
        """
        CREATE TABLE accounts (
            token_id       bytea PRIMARY KEY,
            service        text NOT NULL,
            credited_msat  bigint NOT NULL CHECK (credited_msat >= 0),
            spent_msat     bigint NOT NULL CHECK (spent_msat >= 0),
            reserved_msat  bigint NOT NULL CHECK (reserved_msat >= 0),
            withdrawn_msat bigint NOT NULL CHECK (withdrawn_msat >= 0),
            created_at     double precision NOT NULL,
            last_used_at   double precision,
            CHECK (credited_msat - spent_msat - reserved_msat - withdrawn_msat >= 0)
        )
        """,
        # A sequence never gives an id twice, so a late settle cannot hit another request's.
        """
        CREATE TABLE reservations (
            id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            token_id    bytea NOT NULL,
            amount_msat bigint NOT NULL CHECK (amount_msat >= 0),
            expires_at  double precision NOT NULL
        )
        """,
        "CREATE INDEX reservations_expires_at ON reservations (expires_at)",
        """
        CREATE TABLE charges (
            seq         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            token_id    bytea NOT NULL,
            at          double precision NOT NULL,
            method      text NOT NULL,
            path        text NOT NULL,
            amount_msat bigint NOT NULL CHECK (amount_msat > 0)
        )
        """,
        "CREATE INDEX charges_token_id_at ON charges (token_id, at, seq)",
        "CREATE INDEX charges_at ON charges (at, seq)",
        """
        CREATE TABLE withdrawals (
            seq              bigint GENERATED ALWAYS AS IDENTITY,
            payment_hash     bytea PRIMARY KEY,
            token_id         bytea NOT NULL,
            payment_request  text NOT NULL,
            amount_msat      bigint NOT NULL CHECK (amount_msat >= 0),
            fee_reserve_msat bigint NOT NULL CHECK (fee_reserve_msat >= 0),
            fee_msat         bigint NOT NULL
                             CHECK (fee_msat >= 0 AND fee_msat <= fee_reserve_msat),
            state            text NOT NULL CHECK (state IN ('PENDING', 'SUCCEEDED', 'FAILED')),
            created_at       double precision NOT NULL,
            resolved_at      double precision
        )
        """,
        "CREATE INDEX withdrawals_state_created_at ON withdrawals (state, created_at, seq)",
        "CREATE INDEX withdrawals_created_at ON withdrawals (created_at, seq)",
        """
        CREATE TABLE held_requests (
            seq              bigint GENERATED ALWAYS AS IDENTITY,
            payment_hash     bytea PRIMARY KEY,
            preimage         bytea NOT NULL,
            token_id         bytea NOT NULL,
            client           text NOT NULL,
            token_grant      text NOT NULL,
            state            text NOT NULL CHECK (
                                 state IN ('WAITING', 'RUNNING', 'SUCCEEDED', 'FAILED',
                                           'SETTLED', 'CANCELED', 'EXPIRED')
                             ),
            method           text,
            target           text,
            request_headers  text,
            request_body     bytea,
            created_at       double precision NOT NULL,
            expires_at       double precision NOT NULL,
            updated_at       double precision NOT NULL,
            status           integer,
            response_headers text,
            response_body    bytea,
            failure          text NOT NULL,
            keep_until       double precision,
            delivered_at     double precision,
            CHECK ((target IS NULL) = (method IS NULL)
                   AND (request_headers IS NULL) = (method IS NULL)
                   AND (request_body IS NULL) = (method IS NULL)),
            CHECK ((response_headers IS NULL) = (status IS NULL)
                   AND (response_body IS NULL) = (status IS NULL))
        )
        """,
        "CREATE INDEX held_requests_state_created_at ON held_requests (state, created_at, seq)",
        "CREATE INDEX held_requests_client_state ON held_requests (client, state)",
        "CREATE INDEX held_requests_keep_until ON held_requests (keep_until)",
        # Event ids commit in id order (``EVENTS_LOCK``), so a fan-out cursor past an id has
        # seen every event up to it.
        """
        CREATE TABLE events (
            id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            type       text NOT NULL,
            resource   text NOT NULL,
            payload    text NOT NULL,
            created_at double precision NOT NULL,
            webhook_id text NOT NULL CHECK (length(webhook_id) = 32)
        )
        """,
        "CREATE INDEX events_created_at ON events (created_at)",
        """
        CREATE TABLE webhook_deliveries (
            event_id        bigint NOT NULL,
            endpoint        text NOT NULL,
            event_type      text NOT NULL,
            state           text NOT NULL CHECK (state IN ('PENDING', 'DELIVERED', 'DEAD')),
            attempts        integer NOT NULL CHECK (attempts >= 0),
            next_attempt_at double precision NOT NULL,
            last_status     integer,
            last_error      text NOT NULL,
            delivered_at    double precision,
            PRIMARY KEY (endpoint, event_id)
        )
        """,
        "CREATE INDEX webhook_deliveries_state ON webhook_deliveries (state, event_id)",
        "CREATE INDEX webhook_deliveries_event_id ON webhook_deliveries (event_id)",
        """
        CREATE TABLE webhook_endpoints (
            name   text PRIMARY KEY,
            cursor bigint NOT NULL  -- the last event id fanned out to it
        )
        """,
        # A token bucket per client and limit, shared by the instances. ``granted``: whether
        # the take that last wrote the row got its token (RETURNING sees only the new row).
        """
        CREATE TABLE rate_buckets (
            bucket     text PRIMARY KEY,
            tokens     double precision NOT NULL,
            updated_at double precision NOT NULL,
            granted    boolean NOT NULL
        )
        """,
        "CREATE INDEX rate_buckets_updated_at ON rate_buckets (updated_at)",
    ),
    # 2: revenue splits, as SQLite's step 6. Each invoice keeps its route's split; the
    # ledger's entries, one per payee share and one with payee '' (the merchant's part) per
    # payment, keyed by the payment so that it is split once; each payee's running totals
    # (the CHECKs: an accrued never goes negative); the payouts.
    (
        "ALTER TABLE invoices ADD COLUMN split text NOT NULL DEFAULT ''",
        """
        CREATE TABLE split_entries (
            source     text NOT NULL,
            payee      text NOT NULL,  -- '': the merchant's part
            share_msat bigint NOT NULL CHECK (share_msat >= 0),
            at         double precision NOT NULL,
            PRIMARY KEY (source, payee)
        )
        """,
        """
        CREATE TABLE payees (
            payee              text PRIMARY KEY,
            earned_msat        bigint NOT NULL CHECK (earned_msat >= 0),
            paid_msat          bigint NOT NULL CHECK (paid_msat >= 0),
            fees_msat          bigint NOT NULL CHECK (fees_msat >= 0),
            pending_msat       bigint NOT NULL CHECK (pending_msat >= 0),
            merchant_fees_msat bigint NOT NULL CHECK (merchant_fees_msat >= 0),
            last_payout_at     double precision,
            CHECK (earned_msat - paid_msat - fees_msat - pending_msat >= 0)
        )
        """,
        """
        CREATE TABLE payouts (
            seq              bigint GENERATED ALWAYS AS IDENTITY,
            payment_hash     bytea PRIMARY KEY,
            payee            text NOT NULL,
            destination      text NOT NULL,
            payment_request  text NOT NULL,
            amount_msat      bigint NOT NULL CHECK (amount_msat > 0),
            fee_reserve_msat bigint NOT NULL CHECK (fee_reserve_msat >= 0),
            payee_pays_fee   boolean NOT NULL,
            state            text NOT NULL CHECK (state IN ('PENDING', 'SUCCEEDED', 'FAILED')),
            created_at       double precision NOT NULL,
            fee_msat         bigint NOT NULL
                             CHECK (fee_msat >= 0 AND fee_msat <= fee_reserve_msat),
            resolved_at      double precision,
            failure          text NOT NULL
        )
        """,
        "CREATE INDEX payouts_payee_created_at ON payouts (payee, created_at, seq)",
        "CREATE INDEX payouts_state_created_at ON payouts (state, created_at, seq)",
        "CREATE INDEX payouts_created_at ON payouts (created_at, seq)",
    ),
    # 3: tips and payment links, as SQLite's step 7: each invoice keeps its payer's comment;
    # the payment links, their running totals and a single-use link's open invoice.
    (
        "ALTER TABLE invoices ADD COLUMN comment text NOT NULL DEFAULT ''",
        """
        CREATE TABLE payment_links (
            seq          bigint GENERATED ALWAYS AS IDENTITY,
            link_id      text PRIMARY KEY,
            memo         text NOT NULL,
            min_msat     bigint NOT NULL CHECK (min_msat >= 1),
            max_msat     bigint NOT NULL CHECK (max_msat >= min_msat),
            single_use   boolean NOT NULL,
            created_at   double precision NOT NULL,
            expires_at   double precision,  -- NULL: never
            canceled_at  double precision,
            paid_count   bigint NOT NULL CHECK (paid_count >= 0),
            paid_msat    bigint NOT NULL CHECK (paid_msat >= 0),
            last_paid_at double precision,
            open_hash    bytea
        )
        """,
        "CREATE INDEX payment_links_created_at ON payment_links (created_at, seq)",
    ),
)

LATEST = len(MIGRATIONS)

# What an operator runs once, as a superuser, for a least-privilege gateway role: it owns only
# its own schema (its tables and migrations), connects to one database, and nothing else.
# Advisory locks need no privilege.
ROLE_GRANTS = """\
CREATE ROLE l402_gateway LOGIN PASSWORD 'choose-one';
CREATE DATABASE l402;
REVOKE ALL ON DATABASE l402 FROM PUBLIC;
GRANT CONNECT ON DATABASE l402 TO l402_gateway;
\\connect l402
CREATE SCHEMA l402 AUTHORIZATION l402_gateway;
ALTER ROLE l402_gateway IN DATABASE l402 SET search_path = l402;
"""

_CREATE_VERSION = """
    CREATE TABLE IF NOT EXISTS schema_version (
        id      integer PRIMARY KEY CHECK (id = 0),
        version integer NOT NULL
    )
"""
_GET_VERSION = "SELECT version FROM schema_version WHERE id = 0"
_PUT_VERSION = """
    INSERT INTO schema_version (id, version) VALUES (0, $1)
    ON CONFLICT (id) DO UPDATE SET version = excluded.version
"""


async def migrate(connection: Connection, where: str) -> None:
    """Apply the missing ``MIGRATIONS`` steps, all in one transaction (or none). ``where``
    names the database in messages (no password)."""
    async with connection.transaction():
        # Held to the commit: a second instance waits here, then finds the schema current.
        await connection.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await connection.execute(_CREATE_VERSION)
        current = await connection.fetchval(_GET_VERSION) or 0
        check_version(current, where)
        for number in range(current + 1, LATEST + 1):
            for statement in MIGRATIONS[number - 1]:
                await connection.execute(statement)
        if current < LATEST:
            await connection.execute(_PUT_VERSION, LATEST)
    if current < LATEST:
        log.info("migrated database %s from schema %d to %d", where, current, LATEST)


async def check_readable(connection: Connection, where: str) -> None:
    """A database opened read-only: one a gateway has brought to this schema (a read-only
    store cannot migrate it), and not a newer one."""
    if await connection.fetchval("SELECT to_regclass('schema_version')") is None:
        raise ConfigError(f"store: {where} is not a gateway database (it has no gateway schema)")
    current = await connection.fetchval(_GET_VERSION) or 0
    check_version(current, where)
    if current < LATEST:
        raise StoreError(
            f"{where} has schema version {current}, older than this gateway's {LATEST}; "
            "start a gateway that may write to it once to migrate it, then open it read-only"
        )


def check_version(version: int, where: str) -> None:
    if version > LATEST:
        raise SchemaVersionError(
            f"{where} has schema version {version}, but this gateway knows only up to "
            f"{LATEST}: it was written by a newer gateway; upgrade this one "
            "(downgrading a database is not supported)"
        )
