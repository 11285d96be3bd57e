"""``PostgresStore``: the ``Store`` on PostgreSQL, for several gateway instances sharing one
database (``store.url = "postgresql://..."``).

Connections: an ``asyncpg`` pool. Each store call runs on a pooled connection: one statement
on its own, or several in a short transaction of their own (READ COMMITTED). What SQLite got
from its single write lock comes from PostgreSQL's locks here, so it holds across instances:
a debit is one ``UPDATE ... WHERE balance >= amount``; a read-check-write locks its row first
(``SELECT ... FOR UPDATE``) or is one conditional ``UPDATE``; the advisory locks of
``postgres_schema`` order the webhook events and hold the held-request caps (counted in a
transaction). No group commit as SQLite's: the pool runs concurrent calls side by side.

Transactions: ``transaction()`` takes a pooled connection, opens a transaction on it and
yields operations bound to it. Unlike SQLite's, transactions on one store do not wait for each
other and the store's own calls run beside an open one, on other connections, seeing only what
is committed. A store call from inside its own transaction, or a nested transaction, raises
``RuntimeError`` (it could wait on a row lock of its own transaction for ever). Cancelled or
failed, a transaction rolls back and its connection goes back to the pool clean (asyncpg
waits for the cancelled query, then resets the connection, rolling back, before reuse).

Errors: PostgreSQL and connection failures are ``StoreError`` naming the operation and the
URL without its user part and password (``url_for_display``). ``read_only``: every transaction
is read-only (``default_transaction_read_only``), nothing is migrated.

Sessions (``SESSION_SETTINGS``): an instance that vanishes inside a transaction must not keep
its locks (the global advisory locks stop every instance's settlements) until the server's
TCP keepalive notices, two hours by default.

Text is sorted ``COLLATE "C"`` (by code point, as SQLite compares), whatever the database's
collation.

The least-privilege role (``postgres_schema.ROLE_GRANTS``): a login role that owns one schema
of its own in one database (its tables, so it can migrate them) and may connect there; it
needs no other privilege, and is no superuser.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import urllib.parse
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
)
from dataclasses import replace
from typing import Any, TypeVar

import asyncpg

from gateway.config.checks import POSTGRES_URL_HINT, postgres_url_problem
from gateway.errors import StoreClosed, StoreError
from gateway.ports import (
    Account,
    Charge,
    Clock,
    CreditTotals,
    Cursor,
    DeliveryState,
    HeldRequest,
    HeldState,
    InvoiceRecord,
    InvoiceState,
    InvoiceTotal,
    InvoiceUpdate,
    LinkState,
    Msat,
    PayeeBalance,
    PaymentHash,
    PaymentLink,
    Payout,
    PayoutState,
    Reservation,
    Reserved,
    RevenueBucket,
    Split,
    SplitTotals,
    StoredResponse,
    StoreOperations,
    SystemClock,
    WebhookDelivery,
    WebhookEvent,
    Withdrawal,
    WithdrawalState,
)
from gateway.store import rows as convert
from gateway.store.credit import (
    SETTLED_AFTER_EXPIRY,
    check_amount,
    check_bucket,
    check_pending,
    credit_bought,
    duplicate_withdrawal,
    invoice_key_id,
    refund,
    resolution_fee,
)
from gateway.store.held import ANSWERED, HELD_FINAL, check_move, check_new, keeps_request
from gateway.store.held import predecessors as held_predecessors
from gateway.store.ledger import (
    Entries,
    LinkPayment,
    charge_entries,
    charge_source,
    check_link_invoice,
    check_new_link,
    check_new_payout,
    check_resolution,
    duplicate_payout,
    earned,
    invoice_source,
    link_payment,
    payee_change,
    resolved,
    settlement_entries,
)
from gateway.store.outbox import (
    ENDPOINT_REMOVED,
    NewEvent,
    held_events,
    invoice_events,
    payout_events,
    withdrawal_events,
)
from gateway.store.postgres_schema import (
    EVENTS_LOCK,
    FAN_OUT_LOCK,
    HELD_CLIENT_LOCKS,
    HELD_LOCK,
    Connection,
    check_readable,
    migrate,
)

T = TypeVar("T")
log = logging.getLogger(__name__)
Work = Callable[[Connection], Awaitable[T]]

# What a failed database call raises: a server error, a broken or misused connection, the
# network, a connect timeout. InternalClientError: a call on a connection whose session the
# server has just ended (IDLE_IN_TRANSACTION_TIMEOUT) before asyncpg has noticed.
_DATABASE_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)

# Seconds a pooled session may sit idle inside a transaction before the server ends it, and
# so its locks: the gateway's transactions are short and never wait for the network. No
# lock_timeout besides: a lock's holder is either working or ended by this.
IDLE_IN_TRANSACTION_TIMEOUT = 15.0
# The server gives up on a vanished peer after 10 + 3 * 5 s of silence, or 30 s of data
# unacknowledged.
SESSION_SETTINGS = {
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "30000",
}

_NESTED = "store transactions do not nest"
_REENTERED = "the store was called inside its own transaction; call the transaction's methods"

_PUT_ROOT_KEY = """
    INSERT INTO root_keys (key_id, token_id, root_key, created_at) VALUES ($1, $2, $3, $4)
    ON CONFLICT (key_id) DO NOTHING
"""
_GET_ROOT_KEY_ROW = "SELECT token_id, root_key FROM root_keys WHERE key_id = $1"
_REVOKE = "DELETE FROM root_keys WHERE token_id = $1"
_ADD_INVOICE = """
    INSERT INTO invoices (
        payment_hash, payment_request, amount_msat, token_id, service, method, path, state,
        created_at, expires_at, add_index, settle_index, amount_paid_msat, settled_at,
        buys_credit, split, comment
    ) VALUES (
        $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17
    )
    ON CONFLICT (payment_hash) DO NOTHING
"""
_GET_INVOICE = """
    SELECT payment_hash, payment_request, amount_msat, token_id, service, method, path, state,
           created_at, expires_at, add_index, settle_index, amount_paid_msat, settled_at,
           buys_credit, split, comment
    FROM invoices WHERE payment_hash = $1
"""
# The row locked to the commit: a racing report waits, then finds it SETTLED already.
_LOCK_INVOICE = _GET_INVOICE + "FOR UPDATE"
# Writes what ``InvoiceRecord.updated`` decided (the state rules are not repeated in SQL).
_SET_STATE = """
    UPDATE invoices SET state = $1, settle_index = $2, amount_paid_msat = $3, settled_at = $4
    WHERE payment_hash = $5
"""
# $1 the state, $3 the service, each NULL for any; LIMIT NULL is no limit.
_LIST_INVOICES = """
    SELECT payment_hash, payment_request, amount_msat, token_id, service, method, path, state,
           created_at, expires_at, add_index, settle_index, amount_paid_msat, settled_at,
           buys_credit, split, comment
    FROM invoices WHERE ($1::text IS NULL OR state = $1) AND ($3::text IS NULL OR service = $3)
    ORDER BY created_at DESC, seq DESC LIMIT $2
"""
_INVOICE_TOTALS = """
    SELECT service, state, count(*), coalesce(sum(amount_msat), 0)::bigint,
           coalesce(sum(CASE WHEN state != 'SETTLED' THEN 0
                             WHEN amount_paid_msat > 0 THEN amount_paid_msat
                             ELSE amount_msat END), 0)::bigint
    FROM invoices GROUP BY service, state ORDER BY service COLLATE "C", state COLLATE "C"
"""
_LIST_OVERDUE = """
    SELECT payment_hash, payment_request, amount_msat, token_id, service, method, path, state,
           created_at, expires_at, add_index, settle_index, amount_paid_msat, settled_at,
           buys_credit, split, comment
    FROM invoices WHERE state = 'OPEN' AND expires_at < $1 ORDER BY expires_at, seq LIMIT $2
"""
# As SQLite's: settled at (created at, when the node gave no time) bucketed from the epoch;
# the amount paid, or the invoice's when none was reported.
_REVENUE = """
    SELECT (floor(at / $1::double precision) * $1)::bigint AS start, service, count(*),
           sum(amount)::bigint
    FROM (
        SELECT coalesce(settled_at, created_at) AS at, service,
               CASE WHEN amount_paid_msat > 0 THEN amount_paid_msat ELSE amount_msat END AS amount
        FROM invoices WHERE state = 'SETTLED' AND expires_at >= $2
    ) AS settled
    WHERE at >= $3 GROUP BY start, service ORDER BY start, service COLLATE "C"
"""
_LIST_OPEN_CREDIT_INVOICES = """
    SELECT payment_hash, payment_request, amount_msat, token_id, service, method, path, state,
           created_at, expires_at, add_index, settle_index, amount_paid_msat, settled_at,
           buys_credit, split, comment
    FROM invoices WHERE token_id = $1 AND state = 'OPEN' AND buys_credit
    ORDER BY created_at DESC, seq DESC LIMIT $2
"""
# SKIP LOCKED: rows another pruner (or a racing update) holds are left for the next pass.
_PRUNE_INVOICES = """
    DELETE FROM invoices WHERE payment_hash IN (
        SELECT payment_hash FROM invoices
        WHERE state IN ('CANCELED', 'EXPIRED') AND expires_at < $1
        LIMIT $2 FOR UPDATE SKIP LOCKED
    )
    RETURNING payment_hash, token_id
"""
_PRUNE_ROOT_KEYS_BY_ID = "DELETE FROM root_keys WHERE key_id = ANY($1::bytea[])"
# A token's remaining root keys (and its account, if it never received anything) go with its
# last invoice: top-ups share the token id, and an unpaid one must not take the paid token
# along.
_PRUNE_ROOT_KEYS = """
    DELETE FROM root_keys AS k WHERE token_id = ANY($1::bytea[])
      AND NOT EXISTS (SELECT 1 FROM invoices AS i WHERE i.token_id = k.token_id)
"""
_PRUNE_ACCOUNTS = """
    DELETE FROM accounts AS a WHERE token_id = ANY($1::bytea[]) AND credited_msat = 0
      AND NOT EXISTS (SELECT 1 FROM invoices AS i WHERE i.token_id = a.token_id)
"""
_GET_CURSOR = "SELECT add_index, settle_index FROM cursor WHERE id = 0"
_SAVE_CURSOR = """
    UPDATE cursor
    SET add_index = greatest(add_index, $1), settle_index = greatest(settle_index, $2)
    WHERE id = 0
"""

# Credit. The balance is credited_msat - spent_msat - reserved_msat - withdrawn_msat.
_OPEN_ACCOUNT = """
    INSERT INTO accounts (
        token_id, service, credited_msat, spent_msat, reserved_msat, withdrawn_msat, created_at
    ) VALUES ($1, $2, 0, 0, 0, 0, $3)
    ON CONFLICT (token_id) DO NOTHING
"""
# Opens the account too if the challenge did not: a settled payment is never lost.
_CREDIT = """
    INSERT INTO accounts AS a (
        token_id, service, credited_msat, spent_msat, reserved_msat, withdrawn_msat, created_at
    ) VALUES ($1, $2, $3, 0, 0, 0, $4)
    ON CONFLICT (token_id) DO UPDATE SET credited_msat = a.credited_msat + excluded.credited_msat
"""
_GET_ACCOUNT = """
    SELECT token_id, service, credited_msat, spent_msat, reserved_msat, withdrawn_msat,
           created_at, last_used_at
    FROM accounts WHERE token_id = $1
"""
_LIST_ACCOUNTS = """
    SELECT token_id, service, credited_msat, spent_msat, reserved_msat, withdrawn_msat,
           created_at, last_used_at
    FROM accounts ORDER BY coalesce(last_used_at, created_at) DESC, token_id DESC LIMIT $1
"""
# One statement: the balance test and the debit are one conditional UPDATE (a racing one
# waits for the row, then tests the balance again), the reservation is written only with it.
# The balance after: the debit's, else the account's as it was (0 without an account).
_RESERVE = """
    WITH debited AS (
        UPDATE accounts SET reserved_msat = reserved_msat + $2, last_used_at = $3
        WHERE token_id = $1 AND credited_msat - spent_msat - reserved_msat - withdrawn_msat >= $2
        RETURNING credited_msat - spent_msat - reserved_msat - withdrawn_msat AS balance
    ), held AS (
        INSERT INTO reservations (token_id, amount_msat, expires_at)
        SELECT $1, $2, $4 FROM debited RETURNING id
    )
    SELECT (SELECT id FROM held), coalesce(
        (SELECT balance FROM debited),
        (SELECT credited_msat - spent_msat - reserved_msat - withdrawn_msat
         FROM accounts WHERE token_id = $1),
        0
    )
"""
# One statement: the reservation goes (once: a second settle waits for the first, then finds
# none) only if it covers the charge; its amount is released and the charge recorded. Returns
# the amount it held (NULL: nothing happened), the balance after, and the amount of one that
# does not cover the charge (read in the statement's snapshot: one a racing settle deleted
# meanwhile still shows, so only a too small amount counts).
_SETTLE = """
    WITH gone AS (
        DELETE FROM reservations WHERE id = $1 AND amount_msat >= $2
        RETURNING token_id, amount_msat
    ), settled AS (
        UPDATE accounts AS a
        SET reserved_msat = a.reserved_msat - gone.amount_msat, spent_msat = a.spent_msat + $2
        FROM gone WHERE a.token_id = gone.token_id
        RETURNING credited_msat - spent_msat - reserved_msat - withdrawn_msat AS balance
    ), charged AS (
        INSERT INTO charges (token_id, at, method, path, amount_msat)
        SELECT token_id, $3, $4, $5, $2 FROM gone WHERE $2 > 0
    )
    SELECT (SELECT amount_msat FROM gone), coalesce((SELECT balance FROM settled), 0),
           (SELECT amount_msat FROM reservations WHERE id = $1 AND amount_msat < $2)
"""
# The accounts are locked in token_id order before they are updated: two passes at once
# (their reservations apart, SKIP LOCKED, their accounts not) then wait for each other in one
# order, never in a cycle. The update only touches rows the pass has locked.
_RELEASE_EXPIRED = """
    WITH expired AS (
        DELETE FROM reservations WHERE id IN (
            SELECT id FROM reservations WHERE expires_at < $1
            ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED
        )
        RETURNING token_id, amount_msat
    ), per_token AS (
        SELECT token_id, sum(amount_msat)::bigint AS amount FROM expired GROUP BY token_id
    ), locked AS MATERIALIZED (
        SELECT a.token_id, per_token.amount
        FROM accounts AS a JOIN per_token ON a.token_id = per_token.token_id
        ORDER BY a.token_id FOR UPDATE OF a
    ), released AS (
        UPDATE accounts AS a SET reserved_msat = a.reserved_msat - locked.amount
        FROM locked WHERE a.token_id = locked.token_id
    )
    SELECT count(*) FROM expired
"""
_LIST_CHARGES = """
    SELECT token_id, at, method, path, amount_msat FROM charges
    WHERE token_id = $1 ORDER BY at DESC, seq DESC LIMIT $2
"""
_PRUNE_CHARGES = """
    DELETE FROM charges WHERE seq IN (
        SELECT seq FROM charges WHERE at < $1 ORDER BY at, seq LIMIT $2
    )
"""
# One statement, so one snapshot: the totals reconcile even while others write.
_CREDIT_TOTALS = """
    SELECT a.*, w.* FROM (
        SELECT count(*), coalesce(sum(credited_msat), 0)::bigint,
               coalesce(sum(spent_msat), 0)::bigint, coalesce(sum(reserved_msat), 0)::bigint,
               coalesce(sum(credited_msat - spent_msat - reserved_msat - withdrawn_msat), 0)
                   ::bigint
        FROM accounts
    ) AS a, (
        SELECT coalesce(sum(CASE state WHEN 'SUCCEEDED' THEN amount_msat + fee_msat END), 0)
                   ::bigint,
               coalesce(sum(CASE state WHEN 'PENDING' THEN amount_msat + fee_reserve_msat END),
                        0)::bigint
        FROM withdrawals
    ) AS w
"""
_ADD_WITHDRAWAL = """
    INSERT INTO withdrawals (
        payment_hash, token_id, payment_request, amount_msat, fee_reserve_msat, state,
        created_at, fee_msat, resolved_at
    ) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
"""
_GET_WITHDRAWAL = """
    SELECT payment_hash, token_id, payment_request, amount_msat, fee_reserve_msat, state,
           created_at, fee_msat, resolved_at
    FROM withdrawals WHERE payment_hash = $1
"""
_LOCK_WITHDRAWAL = _GET_WITHDRAWAL + "FOR UPDATE"
# $1 the state and $2 the token id, NULL for any.
_LIST_WITHDRAWALS = """
    SELECT payment_hash, token_id, payment_request, amount_msat, fee_reserve_msat, state,
           created_at, fee_msat, resolved_at
    FROM withdrawals
    WHERE ($1::text IS NULL OR state = $1) AND ($2::bytea IS NULL OR token_id = $2)
    ORDER BY created_at DESC, seq DESC LIMIT $3
"""
_WITHDRAW = """
    UPDATE accounts SET withdrawn_msat = withdrawn_msat + $2
    WHERE token_id = $1 AND credited_msat - spent_msat - reserved_msat - withdrawn_msat >= $2
    RETURNING credited_msat - spent_msat - reserved_msat - withdrawn_msat
"""
_RESOLVE_WITHDRAWAL = """
    UPDATE withdrawals SET state = $1, fee_msat = $2, resolved_at = $3 WHERE payment_hash = $4
"""
_REFUND_WITHDRAWAL = "UPDATE accounts SET withdrawn_msat = withdrawn_msat - $1 WHERE token_id = $2"

# The split ledger. A payee's accrued is earned_msat - paid_msat - fees_msat - pending_msat.
# The primary key (source, payee) refuses a payment split twice.
_ADD_SPLIT_ENTRY = (
    "INSERT INTO split_entries (source, payee, share_msat, at) VALUES ($1, $2, $3, $4)"
)
# A payee's row is made by its first share; it stays locked to the commit.
_EARN = """
    INSERT INTO payees AS p (
        payee, earned_msat, paid_msat, fees_msat, pending_msat, merchant_fees_msat
    ) VALUES ($1, $2, 0, 0, 0, 0)
    ON CONFLICT (payee) DO UPDATE SET earned_msat = p.earned_msat + excluded.earned_msat
"""
_GET_PAYEE = """
    SELECT payee, earned_msat, paid_msat, fees_msat, pending_msat, merchant_fees_msat,
           last_payout_at
    FROM payees WHERE payee = $1
"""
_LIST_PAYEES = """
    SELECT payee, earned_msat, paid_msat, fees_msat, pending_msat, merchant_fees_msat,
           last_payout_at
    FROM payees ORDER BY payee COLLATE "C"
"""
# The accrued test and the debit are one conditional UPDATE: a racing one waits for the row,
# then tests the accrued again, so debits from every instance never add up to more.
_DEBIT_PAYEE = """
    UPDATE payees SET pending_msat = pending_msat + $2
    WHERE payee = $1 AND earned_msat - paid_msat - fees_msat - pending_msat >= $2
"""
# A resolved payout's debit leaves pending (``gateway.store.ledger.payee_change``); the
# latest successful payout's time only grows (greatest() ignores NULL).
_RESOLVE_PAYEE = """
    UPDATE payees SET
        pending_msat = pending_msat - $2,
        paid_msat = paid_msat + $3,
        fees_msat = fees_msat + $4,
        merchant_fees_msat = merchant_fees_msat + $5,
        last_payout_at = greatest(last_payout_at, $6::double precision)
    WHERE payee = $1
"""
_ADD_PAYOUT = """
    INSERT INTO payouts (
        payment_hash, payee, destination, payment_request, amount_msat, fee_reserve_msat,
        payee_pays_fee, state, created_at, fee_msat, resolved_at, failure
    ) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
"""
_GET_PAYOUT = """
    SELECT payment_hash, payee, destination, payment_request, amount_msat, fee_reserve_msat,
           payee_pays_fee, state, created_at, fee_msat, resolved_at, failure
    FROM payouts WHERE payment_hash = $1
"""
_LOCK_PAYOUT = _GET_PAYOUT + "FOR UPDATE"
_RESOLVE_PAYOUT = """
    UPDATE payouts SET state = $1, fee_msat = $2, resolved_at = $3, failure = $4
    WHERE payment_hash = $5
"""
# $1 the payee and $2 the state, NULL for any; LIMIT NULL is no limit.
_LIST_PAYOUTS = """
    SELECT payment_hash, payee, destination, payment_request, amount_msat, fee_reserve_msat,
           payee_pays_fee, state, created_at, fee_msat, resolved_at, failure
    FROM payouts WHERE ($1::text IS NULL OR payee = $1) AND ($2::text IS NULL OR state = $2)
    ORDER BY created_at DESC, seq DESC LIMIT $3
"""
# One statement, so one snapshot: the totals reconcile even while others write.
_SPLIT_TOTALS = """
    SELECT e.*, p.* FROM (
        SELECT coalesce(sum(share_msat), 0)::bigint,
               coalesce(sum(CASE WHEN payee = '' THEN share_msat END), 0)::bigint
        FROM split_entries
    ) AS e, (
        SELECT coalesce(sum(earned_msat), 0)::bigint, coalesce(sum(paid_msat), 0)::bigint,
               coalesce(sum(pending_msat), 0)::bigint,
               coalesce(sum(earned_msat - paid_msat - fees_msat - pending_msat), 0)::bigint,
               coalesce(sum(fees_msat), 0)::bigint, coalesce(sum(merchant_fees_msat), 0)::bigint
        FROM payees
    ) AS p
"""

# Payment links.
_ADD_LINK = """
    INSERT INTO payment_links (
        link_id, memo, min_msat, max_msat, single_use, created_at, expires_at, canceled_at,
        paid_count, paid_msat, last_paid_at, open_hash
    ) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
    ON CONFLICT (link_id) DO NOTHING
"""
_GET_LINK = """
    SELECT link_id, memo, min_msat, max_msat, single_use, created_at, expires_at, canceled_at,
           paid_count, paid_msat, last_paid_at, open_hash
    FROM payment_links WHERE link_id = $1
"""
# $1 the state (NULL: any), judged at $2 (the CASE is ``PaymentLink.state``); LIMIT NULL is
# no limit.
_LIST_LINKS = """
    SELECT link_id, memo, min_msat, max_msat, single_use, created_at, expires_at, canceled_at,
           paid_count, paid_msat, last_paid_at, open_hash
    FROM payment_links
    WHERE $1::text IS NULL OR $1 = CASE WHEN single_use AND paid_count > 0 THEN 'PAID'
                                        WHEN canceled_at IS NOT NULL THEN 'CANCELED'
                                        WHEN expires_at <= $2 THEN 'EXPIRED'
                                        ELSE 'OPEN' END
    ORDER BY created_at DESC, seq DESC LIMIT $3
"""
_CANCEL_LINK = """
    UPDATE payment_links SET canceled_at = coalesce(canceled_at, $2) WHERE link_id = $1
    RETURNING link_id, memo, min_msat, max_msat, single_use, created_at, expires_at, canceled_at,
              paid_count, paid_msat, last_paid_at, open_hash
"""
# The one statement that lets an invoice of a link be recorded: the link must be neither
# cancelled nor expired (at the invoice's creation, $4), and a single-use link's open invoice
# must still be the one replaced ($3), and the link unpaid; then its open invoice is the new
# one ($2). A compare-and-set: of two instances replacing the same invoice the second waits
# for the first's row lock, then finds the open hash changed and updates nothing; a
# ``cancel_link`` waits likewise, so it sees every invoice recorded before it. A reusable
# link's row keeps its values.
_CLAIM_LINK_INVOICE = """
    UPDATE payment_links
    SET open_hash = CASE WHEN single_use THEN $2 ELSE open_hash END
    WHERE link_id = $1 AND canceled_at IS NULL
      AND (expires_at IS NULL OR expires_at > $4)
      AND (NOT single_use OR (open_hash IS NOT DISTINCT FROM $3 AND paid_count = 0))
"""
# The latest payment's time only grows (greatest() ignores NULL).
_PAY_LINK = """
    UPDATE payment_links SET
        paid_count = paid_count + 1,
        paid_msat = paid_msat + $2,
        last_paid_at = greatest(last_paid_at, $3::double precision)
    WHERE link_id = $1
    RETURNING link_id, memo, min_msat, max_msat, single_use, created_at, expires_at, canceled_at,
              paid_count, paid_msat, last_paid_at, open_hash
"""

# Pay-on-success requests; states as a text array.
_ADD_HELD = """
    INSERT INTO held_requests (
        payment_hash, preimage, token_id, client, token_grant, state, method, target,
        request_headers, request_body, created_at, expires_at, updated_at, status,
        response_headers, response_body, failure, keep_until, delivered_at
    ) VALUES (
        $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19
    )
    ON CONFLICT (payment_hash) DO NOTHING
"""
_GET_HELD = """
    SELECT payment_hash, preimage, token_id, client, token_grant, state, method, target,
           request_headers, request_body, created_at, expires_at, updated_at, status,
           response_headers, response_body, failure, keep_until, delivered_at
    FROM held_requests WHERE payment_hash = $1
"""
_LIST_HELD = """
    SELECT payment_hash, preimage, token_id, client, token_grant, state, method, target,
           request_headers, request_body, created_at, expires_at, updated_at, status,
           response_headers, response_body, failure, keep_until, delivered_at
    FROM held_requests WHERE state = ANY($1::text[]) ORDER BY created_at, seq LIMIT $2
"""
_LIST_HELD_HASHES = """
    SELECT payment_hash FROM held_requests WHERE state = ANY($1::text[])
    ORDER BY created_at, seq LIMIT $2
"""
# $2 the client, or NULL for every client.
_COUNT_HELD = """
    SELECT count(*) FROM held_requests
    WHERE state = ANY($1::text[]) AND ($2::text IS NULL OR client = $2)
"""
# The state test and the write are one statement: of two instances moving the same row, only
# the first finds it in a state that may become the new one. An empty failure keeps the
# earlier text; keep_until never grows past a delivery's (least() ignores NULL).
_MOVE_HELD = """
    UPDATE held_requests SET
        state = $1, updated_at = $2, failure = coalesce(nullif($3, ''), failure),
        keep_until = least(keep_until, $4::double precision){changes}
    WHERE payment_hash = $5 AND state = ANY($6::text[])
    RETURNING payment_hash, preimage, token_id, client, token_grant, state, method, target,
              request_headers, request_body, created_at, expires_at, updated_at, status,
              response_headers, response_body, failure, keep_until, delivered_at
"""
# The method and target stay (a replay is checked against them); the CASE keeps a row stored
# without a request as it is (the table's CHECKs tie the four columns together).
_DROP_REQUEST = """,
    request_headers = CASE WHEN method IS NULL THEN NULL ELSE '[]' END,
    request_body = CASE WHEN method IS NULL THEN NULL ELSE ''::bytea END"""
_SET_RESPONSE = ", status = $7, response_headers = $8, response_body = $9"
_DELIVER_HELD = """
    UPDATE held_requests
    SET delivered_at = coalesce(delivered_at, $1), keep_until = least(keep_until, $2)
    WHERE payment_hash = $3
"""
_PRUNE_HELD = """
    DELETE FROM held_requests WHERE seq IN (
        SELECT seq FROM held_requests WHERE keep_until < $1 AND state = ANY($2::text[])
        ORDER BY keep_until LIMIT $3
    )
"""
# Held to the end of the transaction; the per-client form is the two-int key space, apart
# from the bigint keys.
_LOCK = "SELECT pg_advisory_xact_lock($1)"
_LOCK_HELD_CLIENT = "SELECT pg_advisory_xact_lock($1, hashtext($2))"

# Webhooks.
_ADD_EVENT = """
    INSERT INTO events (type, resource, payload, created_at, webhook_id)
    VALUES ($1, $2, $3, $4, $5)
"""
_GET_EVENT = "SELECT id, type, resource, payload, created_at, webhook_id FROM events WHERE id = $1"
_LIST_EVENTS = """
    SELECT id, type, resource, payload, created_at, webhook_id FROM events
    WHERE id > $1 ORDER BY id LIMIT $2
"""
_NEWEST_EVENT = "SELECT coalesce(max(id), 0) FROM events"
_ENDPOINTS = "SELECT name, cursor FROM webhook_endpoints"
_FORGET_ENDPOINT = "DELETE FROM webhook_endpoints WHERE name = $1"
# A forgotten endpoint's PENDING deliveries would wait for ever: DEAD, with the reason.
_ORPHAN_DELIVERIES = """
    UPDATE webhook_deliveries SET state = 'DEAD', next_attempt_at = $1, last_error = $2
    WHERE endpoint = $3 AND state = 'PENDING'
"""
_PUT_ENDPOINT = """
    INSERT INTO webhook_endpoints (name, cursor) VALUES ($1, $2)
    ON CONFLICT (name) DO UPDATE SET cursor = excluded.cursor
"""
_EVENTS_AFTER = "SELECT id, type FROM events WHERE id > $1 ORDER BY id LIMIT $2"
_ADD_DELIVERY = """
    INSERT INTO webhook_deliveries (
        event_id, endpoint, event_type, state, attempts, next_attempt_at, last_error
    ) VALUES ($1, $2, $3, 'PENDING', 0, $4, '')
    ON CONFLICT (endpoint, event_id) DO NOTHING
"""
_NEXT_DELIVERY = """
    SELECT d.event_id, d.endpoint, d.event_type, d.state, d.attempts, d.next_attempt_at,
           d.last_status, d.last_error, d.delivered_at,
           e.id, e.type, e.resource, e.payload, e.created_at, e.webhook_id
    FROM webhook_deliveries AS d JOIN events AS e ON e.id = d.event_id
    WHERE d.endpoint = $1 AND d.state = 'PENDING' ORDER BY d.event_id LIMIT 1
"""
# As SQLite's: the outcome decided from the attempts stored now (SET sees the row before the
# update); PENDING again after webhook_retry_delay(attempts + 1, ...).
_RECORD_ATTEMPT = """
    UPDATE webhook_deliveries SET
        state = CASE WHEN $1::boolean THEN 'DELIVERED'
                     WHEN attempts + 1 >= $2::integer THEN 'DEAD'
                     ELSE 'PENDING' END,
        next_attempt_at = CASE
            WHEN $1 OR attempts + 1 >= $2 THEN $3::double precision
            ELSE $3 + least($4::double precision,
                            $5::double precision * power(2, least(attempts, 60)))
        END,
        attempts = attempts + 1,
        last_status = $6::integer,
        last_error = $7::text,
        delivered_at = CASE WHEN $1 THEN $3 END
    WHERE event_id = $8 AND endpoint = $9 AND state = 'PENDING'
    RETURNING event_id, endpoint, event_type, state, attempts, next_attempt_at, last_status,
              last_error, delivered_at
"""
# $1 the state, $2 the endpoint, $3 the event id: NULL for any.
_LIST_DELIVERIES = """
    SELECT event_id, endpoint, event_type, state, attempts, next_attempt_at, last_status,
           last_error, delivered_at
    FROM webhook_deliveries
    WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR endpoint = $2)
      AND ($3::bigint IS NULL OR event_id = $3)
    ORDER BY event_id DESC, endpoint COLLATE "C" LIMIT $4
"""
# $2 the event id (NULL: every DEAD delivery), $3 the endpoint (NULL: any), $4 the configured
# endpoints (NULL: any).
_REDELIVER = """
    UPDATE webhook_deliveries
    SET state = 'PENDING', attempts = 0, next_attempt_at = $1, delivered_at = NULL
    WHERE (CASE WHEN $2::bigint IS NULL THEN state = 'DEAD' ELSE event_id = $2 END)
      AND ($3::text IS NULL OR endpoint = $3) AND ($4::text[] IS NULL OR endpoint = ANY($4))
"""
# Nobody still has to send them: no PENDING delivery to a configured endpoint ($2), and every
# configured endpoint's cursor past them. Their deliveries go with them.
_PRUNE_EVENTS = """
    WITH doomed AS (
        SELECT id FROM events
        WHERE created_at < $1
          AND id <= coalesce(
              (SELECT min(cursor) FROM webhook_endpoints WHERE name = ANY($2::text[])), id
          )
          AND NOT EXISTS (
              SELECT 1 FROM webhook_deliveries AS d
              WHERE d.event_id = events.id AND d.state = 'PENDING' AND d.endpoint = ANY($2)
          )
        ORDER BY id LIMIT $3
    ), deliveries AS (
        DELETE FROM webhook_deliveries WHERE event_id IN (SELECT id FROM doomed)
    )
    DELETE FROM events WHERE id IN (SELECT id FROM doomed)
"""

# Global rate limits: one statement takes a token from bucket $1 (a new one is full), refilled
# at $2 a second up to the burst $3 since it was last written; never backwards in time ($4 is
# now: the instances' clocks differ a little).
_TAKE_FROM_BUCKET = """
    INSERT INTO rate_buckets AS b (bucket, tokens, updated_at, granted)
    VALUES ($1, $3::double precision - 1, $4::double precision, true)
    ON CONFLICT (bucket) DO UPDATE SET (tokens, updated_at, granted) = (
        SELECT CASE WHEN refilled >= 1 THEN refilled - 1 ELSE refilled END,
               greatest(b.updated_at, $4), refilled >= 1
        FROM (
            SELECT least($3, b.tokens + greatest($4 - b.updated_at, 0) * $2::double precision)
                AS refilled
        ) AS refill
    )
    RETURNING tokens, granted
"""
_PRUNE_RATE_BUCKETS = """
    DELETE FROM rate_buckets WHERE bucket IN (
        SELECT bucket FROM rate_buckets WHERE updated_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED
    )
"""


def _count(status: str) -> int:
    """The row count of a command status ("UPDATE 3", "INSERT 0 1")."""
    return int(status.rsplit(" ", 1)[-1])


def _states(states: frozenset[HeldState]) -> list[str]:
    return sorted(state.value for state in states)


class _PostgresOperations:
    """The ``StoreOperations`` as statements; ``_run`` says on which connection each runs."""

    _clock: Clock

    async def _run(self, operation: str, work: Work[T], *, atomic: bool = False) -> T:
        """Run ``work`` on a connection; ``atomic``: it runs several statements that must
        commit together (a transaction of their own unless one is open)."""
        raise NotImplementedError

    async def _run_whole(
        self,
        operation: str,
        work: Work[T],
        undo: Callable[[T], Work[object] | None] | None = None,
    ) -> T:
        """Run ``work`` like ``_run(..., atomic=True)``; on the store, a caller cancelled
        while it waits does not stop it (``PostgresStore._run_whole``), and ``undo`` says
        what reverses its result then."""
        return await self._run(operation, work, atomic=True)

    async def _lock_held_count(self, connection: Connection, client: str | None) -> None:
        """Before counting held requests in a transaction: nothing; the store's own count
        has no transaction to hold a lock in."""

    async def put_root_key(self, key_id: bytes, token_id: bytes, root_key: bytes) -> None:
        created_at = self._clock.now()

        async def put(connection: Connection) -> None:
            if _count(
                await connection.execute(_PUT_ROOT_KEY, key_id, token_id, root_key, created_at)
            ):
                return
            row = await connection.fetchrow(_GET_ROOT_KEY_ROW, key_id)
            if row is not None and (bytes(row[0]), bytes(row[1])) != (token_id, root_key):
                raise StoreError(f"a different root key is already stored under {key_id.hex()}")

        await self._run("put_root_key", put)

    async def get_root_key(self, key_id: bytes) -> bytes | None:
        async def get(connection: Connection) -> bytes | None:
            row = await connection.fetchrow(_GET_ROOT_KEY_ROW, key_id)
            return None if row is None else bytes(row[1])

        return await self._run("get_root_key", get)

    async def revoke_token(self, token_id: bytes) -> bool:
        async def revoke(connection: Connection) -> bool:
            return _count(await connection.execute(_REVOKE, token_id)) > 0

        return await self._run("revoke_token", revoke)

    async def add_invoice(self, record: InvoiceRecord) -> None:
        values = convert.invoice_values(record)

        async def add(connection: Connection) -> None:
            await connection.execute(_ADD_INVOICE, *values)

        await self._run("add_invoice", add)

    async def apply_update(self, update: InvoiceUpdate) -> InvoiceRecord | None:
        """Settling an invoice that buys credit credits its account in the same write, one
        with a split the payees' shares, a payment link's the link's totals."""
        now = self._clock.now()

        async def apply(connection: Connection) -> InvoiceRecord | None:
            row = await connection.fetchrow(_LOCK_INVOICE, update.payment_hash)
            if row is None:
                return None
            record = convert.invoice_record(row)
            updated = record.updated(update)
            if updated != record:
                await connection.execute(
                    _SET_STATE,
                    updated.state.value,
                    updated.settle_index,
                    updated.amount_paid_msat,
                    updated.settled_at,
                    updated.payment_hash,
                )
            if credit := credit_bought(record, updated):
                await connection.execute(_CREDIT, record.token_id, record.service, credit, now)
            entries = settlement_entries(record, updated)
            await _credit_split(connection, invoice_source(record.payment_hash), entries, now)
            payment = link_payment(record, updated, now)
            link = None if payment is None else await _pay_link(connection, payment)
            await _add_events(connection, invoice_events(record, updated, now, link), now)
            return updated

        return await self._run("apply_update", apply, atomic=True)

    async def get_invoice(self, payment_hash: PaymentHash) -> InvoiceRecord | None:
        async def get(connection: Connection) -> InvoiceRecord | None:
            row = await connection.fetchrow(_GET_INVOICE, payment_hash)
            return None if row is None else convert.invoice_record(row)

        return await self._run("get_invoice", get)

    async def list_invoices(
        self,
        state: InvoiceState | None = None,
        limit: int | None = None,
        service: str | None = None,
    ) -> list[InvoiceRecord]:
        convert.check_limit(limit)
        value = None if state is None else state.value

        async def list_(connection: Connection) -> list[InvoiceRecord]:
            rows = await connection.fetch(_LIST_INVOICES, value, limit, service)
            return [convert.invoice_record(row) for row in rows]

        return await self._run("list_invoices", list_)

    async def invoice_totals(self) -> list[InvoiceTotal]:
        async def totals(connection: Connection) -> list[InvoiceTotal]:
            return [
                InvoiceTotal(service, InvoiceState(state), count, Msat(amount), Msat(received))
                for service, state, count, amount, received in await connection.fetch(
                    _INVOICE_TOTALS
                )
            ]

        return await self._run("invoice_totals", totals)

    async def list_overdue(self, expired_before: float, limit: int) -> list[InvoiceRecord]:
        async def list_(connection: Connection) -> list[InvoiceRecord]:
            rows = await connection.fetch(_LIST_OVERDUE, expired_before, max(0, limit))
            return [convert.invoice_record(row) for row in rows]

        return await self._run("list_overdue", list_)

    async def revenue(self, since: float, bucket_seconds: int) -> list[RevenueBucket]:
        check_bucket(bucket_seconds)
        oldest_expiry = since - SETTLED_AFTER_EXPIRY

        async def sum_(connection: Connection) -> list[RevenueBucket]:
            rows = await connection.fetch(_REVENUE, bucket_seconds, oldest_expiry, since)
            return [
                RevenueBucket(int(start), service, int(count), Msat(int(total)))
                for start, service, count, total in rows
            ]

        return await self._run("revenue", sum_)

    async def list_open_credit_invoices(self, token_id: bytes, limit: int) -> list[InvoiceRecord]:
        async def list_(connection: Connection) -> list[InvoiceRecord]:
            rows = await connection.fetch(_LIST_OPEN_CREDIT_INVOICES, token_id, max(0, limit))
            return [convert.invoice_record(row) for row in rows]

        return await self._run("list_open_credit_invoices", list_)

    async def prune_unpaid(self, expired_before: float, limit: int) -> int:
        """Each pruned invoice takes its own root key; a token's remaining root keys, and its
        account if it never received anything, go with its last invoice."""

        async def prune(connection: Connection) -> int:
            doomed = await connection.fetch(_PRUNE_INVOICES, expired_before, max(0, limit))
            key_ids = [
                key_id
                for payment_hash, token_id in doomed
                if (key_id := invoice_key_id(bytes(payment_hash), bytes(token_id))) is not None
            ]
            tokens = sorted({bytes(token_id) for _, token_id in doomed})
            await connection.execute(_PRUNE_ROOT_KEYS_BY_ID, key_ids)
            await connection.execute(_PRUNE_ROOT_KEYS, tokens)
            await connection.execute(_PRUNE_ACCOUNTS, tokens)
            return len(doomed)

        return await self._run("prune_unpaid", prune, atomic=True)

    async def get_cursor(self) -> Cursor:
        async def get(connection: Connection) -> Cursor:
            row = await connection.fetchrow(_GET_CURSOR)
            assert row is not None  # the migration inserts it
            return Cursor(add_index=int(row[0]), settle_index=int(row[1]))

        return await self._run("get_cursor", get)

    async def save_cursor(self, cursor: Cursor) -> None:
        async def save(connection: Connection) -> None:
            await connection.execute(_SAVE_CURSOR, cursor.add_index, cursor.settle_index)

        await self._run("save_cursor", save)

    async def open_account(self, token_id: bytes, service: str) -> None:
        created_at = self._clock.now()

        async def open_(connection: Connection) -> None:
            await connection.execute(_OPEN_ACCOUNT, token_id, service, created_at)

        await self._run("open_account", open_)

    async def get_account(self, token_id: bytes) -> Account | None:
        async def get(connection: Connection) -> Account | None:
            row = await connection.fetchrow(_GET_ACCOUNT, token_id)
            return None if row is None else convert.account(row)

        return await self._run("get_account", get)

    async def reserve(self, token_id: bytes, amount_msat: Msat, expires_at: float) -> Reserved:
        check_amount("amount_msat", amount_msat)
        now = self._clock.now()

        async def reserve(connection: Connection) -> Reserved:
            row = await connection.fetchrow(_RESERVE, token_id, amount_msat, now, expires_at)
            assert row is not None  # a SELECT without FROM: one row
            reservation_id, balance = row
            reservation = (
                None
                if reservation_id is None
                else Reservation(int(reservation_id), token_id, amount_msat, expires_at)
            )
            return Reserved(reservation, Msat(int(balance)))

        def release(reserved: Reserved) -> Work[object] | None:
            if reserved.reservation is None:
                return None
            return functools.partial(
                _settle, reservation_id=reserved.reservation.reservation_id, charged_msat=0
            )

        return await self._run_whole("reserve", reserve, release)

    async def settle_reservation(
        self,
        reservation_id: int,
        charged_msat: Msat,
        method: str,
        path: str,
        *,
        split: Split = (),
    ) -> Msat | None:
        check_amount("charged_msat", charged_msat)
        settle = functools.partial(
            _settle,
            reservation_id=reservation_id,
            charged_msat=charged_msat,
            method=method,
            path=path,
            at=self._clock.now(),
            split=split,
        )
        return await self._run_whole("settle_reservation", settle)

    async def release_expired_reservations(self, now: float, limit: int) -> int:
        async def release(connection: Connection) -> int:
            return int(await connection.fetchval(_RELEASE_EXPIRED, now, max(0, limit)))

        return await self._run("release_expired_reservations", release)

    async def list_charges(self, token_id: bytes, limit: int) -> list[Charge]:
        async def list_(connection: Connection) -> list[Charge]:
            rows = await connection.fetch(_LIST_CHARGES, token_id, max(0, limit))
            return [convert.charge(row) for row in rows]

        return await self._run("list_charges", list_)

    async def prune_charges(self, charged_before: float, limit: int) -> int:
        async def prune(connection: Connection) -> int:
            return _count(await connection.execute(_PRUNE_CHARGES, charged_before, max(0, limit)))

        return await self._run("prune_charges", prune)

    async def list_accounts(self, limit: int | None = None) -> list[Account]:
        convert.check_limit(limit)

        async def list_(connection: Connection) -> list[Account]:
            return [convert.account(row) for row in await connection.fetch(_LIST_ACCOUNTS, limit)]

        return await self._run("list_accounts", list_)

    async def credit_totals(self) -> CreditTotals:
        async def totals(connection: Connection) -> CreditTotals:
            row = await connection.fetchrow(_CREDIT_TOTALS)
            assert row is not None  # aggregates: one row
            accounts, received, consumed, reserved, outstanding, withdrawn, pending = row
            return CreditTotals(
                accounts=int(accounts),
                received_msat=Msat(int(received)),
                consumed_msat=Msat(int(consumed)),
                withdrawn_msat=Msat(int(withdrawn)),
                pending_withdrawals_msat=Msat(int(pending)),
                reserved_msat=Msat(int(reserved)),
                outstanding_msat=Msat(int(outstanding)),
            )

        return await self._run("credit_totals", totals)

    async def begin_withdrawal(self, withdrawal: Withdrawal) -> Msat | None:
        """A racing withdrawal of the same hash passes the first check too, and then fails on
        the primary key: a ``StoreError`` all the same, its debit rolled back."""
        check_pending(withdrawal)
        debit = withdrawal.amount_msat + withdrawal.fee_reserve_msat
        values = convert.withdrawal_values(withdrawal)

        async def begin(connection: Connection) -> Msat | None:
            if await connection.fetchrow(_GET_WITHDRAWAL, withdrawal.payment_hash):
                raise duplicate_withdrawal(withdrawal.payment_hash)
            balance = await connection.fetchval(_WITHDRAW, withdrawal.token_id, debit)
            if balance is None:
                return None
            await connection.execute(_ADD_WITHDRAWAL, *values)
            return Msat(int(balance))

        return await self._run("begin_withdrawal", begin, atomic=True)

    async def finish_withdrawal(
        self, payment_hash: PaymentHash, state: WithdrawalState, fee_msat: Msat, now: float
    ) -> Withdrawal | None:
        fee = resolution_fee(state, fee_msat)

        async def finish(connection: Connection) -> Withdrawal | None:
            row = await connection.fetchrow(_LOCK_WITHDRAWAL, payment_hash)
            if row is None:
                return None
            pending = convert.withdrawal(row)
            if pending.state is not WithdrawalState.PENDING:
                return pending
            # The CHECK refuses a fee above the reserve before anything is committed.
            await connection.execute(_RESOLVE_WITHDRAWAL, state.value, fee, now, payment_hash)
            resolved = replace(pending, state=state, fee_msat=fee, resolved_at=now)
            await connection.execute(_REFUND_WITHDRAWAL, refund(resolved), resolved.token_id)
            await _add_events(connection, withdrawal_events(resolved, now), now)
            return resolved

        return await self._run("finish_withdrawal", finish, atomic=True)

    async def list_withdrawals(
        self,
        state: WithdrawalState | None = None,
        token_id: bytes | None = None,
        limit: int | None = None,
    ) -> list[Withdrawal]:
        convert.check_limit(limit)
        value = None if state is None else state.value

        async def list_(connection: Connection) -> list[Withdrawal]:
            rows = await connection.fetch(_LIST_WITHDRAWALS, value, token_id, limit)
            return [convert.withdrawal(row) for row in rows]

        return await self._run("list_withdrawals", list_)

    async def begin_payout(self, payout: Payout) -> bool:
        """A racing payout of the same hash passes the first check too, and then fails on the
        primary key: a ``DuplicatePayout`` all the same, its debit rolled back."""
        check_new_payout(payout)
        values = convert.payout_values(payout)

        async def begin(connection: Connection) -> bool:
            if await connection.fetchrow(_GET_PAYOUT, payout.payment_hash):
                raise duplicate_payout(payout.payment_hash)
            if not _count(await connection.execute(_DEBIT_PAYEE, payout.payee, payout.debit_msat)):
                return False
            try:
                await connection.execute(_ADD_PAYOUT, *values)
            except asyncpg.UniqueViolationError:
                raise duplicate_payout(payout.payment_hash) from None
            return True

        return await self._run("begin_payout", begin, atomic=True)

    async def finish_payout(
        self,
        payment_hash: PaymentHash,
        state: PayoutState,
        fee_msat: Msat,
        now: float,
        failure: str = "",
    ) -> Payout | None:
        """The payout's row is locked first: a racing finish waits, then finds it resolved."""
        check_resolution(state, fee_msat)

        async def finish(connection: Connection) -> Payout | None:
            row = await connection.fetchrow(_LOCK_PAYOUT, payment_hash)
            if row is None:
                return None
            pending = convert.payout(row)
            if pending.state is not PayoutState.PENDING:
                return pending
            done = resolved(pending, state, fee_msat, now, failure)
            await connection.execute(
                _RESOLVE_PAYOUT, done.state.value, done.fee_msat, now, done.failure, payment_hash
            )
            change = payee_change(done)
            await connection.execute(
                _RESOLVE_PAYEE,
                done.payee,
                change.pending,
                change.paid,
                change.fees,
                change.merchant_fees,
                change.last_payout_at,
            )
            await _add_events(connection, payout_events(done, now), now)
            return done

        return await self._run("finish_payout", finish, atomic=True)

    async def get_payee(self, payee: str) -> PayeeBalance | None:
        async def get(connection: Connection) -> PayeeBalance | None:
            row = await connection.fetchrow(_GET_PAYEE, payee)
            return None if row is None else convert.payee_balance(row)

        return await self._run("get_payee", get)

    async def list_payees(self) -> list[PayeeBalance]:
        async def list_(connection: Connection) -> list[PayeeBalance]:
            return [convert.payee_balance(row) for row in await connection.fetch(_LIST_PAYEES)]

        return await self._run("list_payees", list_)

    async def list_payouts(
        self,
        payee: str | None = None,
        state: PayoutState | None = None,
        limit: int | None = None,
    ) -> list[Payout]:
        convert.check_limit(limit)
        value = None if state is None else state.value

        async def list_(connection: Connection) -> list[Payout]:
            rows = await connection.fetch(_LIST_PAYOUTS, payee, value, limit)
            return [convert.payout(row) for row in rows]

        return await self._run("list_payouts", list_)

    async def split_totals(self) -> SplitTotals:
        async def totals(connection: Connection) -> SplitTotals:
            row = await connection.fetchrow(_SPLIT_TOTALS)
            assert row is not None  # aggregates: one row
            return convert.split_totals(row)

        return await self._run("split_totals", totals)

    async def add_link(self, link: PaymentLink) -> None:
        check_new_link(link)
        values = convert.link_values(link)

        async def add(connection: Connection) -> None:
            if not _count(await connection.execute(_ADD_LINK, *values)):
                raise ValueError(f"a payment link {link.link_id!r} exists already")

        await self._run("add_link", add)

    async def get_link(self, link_id: str) -> PaymentLink | None:
        async def get(connection: Connection) -> PaymentLink | None:
            row = await connection.fetchrow(_GET_LINK, link_id)
            return None if row is None else convert.payment_link(row)

        return await self._run("get_link", get)

    async def list_links(
        self, state: LinkState | None = None, now: float = 0.0, limit: int | None = None
    ) -> list[PaymentLink]:
        convert.check_limit(limit)
        value = None if state is None else state.value

        async def list_(connection: Connection) -> list[PaymentLink]:
            rows = await connection.fetch(_LIST_LINKS, value, now, limit)
            return [convert.payment_link(row) for row in rows]

        return await self._run("list_links", list_)

    async def cancel_link(self, link_id: str, now: float) -> PaymentLink | None:
        async def cancel(connection: Connection) -> PaymentLink | None:
            row = await connection.fetchrow(_CANCEL_LINK, link_id, now)
            return None if row is None else convert.payment_link(row)

        return await self._run("cancel_link", cancel)

    async def add_link_invoice(self, record: InvoiceRecord, replaces: PaymentHash | None) -> bool:
        """The claim of the link, then the insert, in one transaction."""
        check_link_invoice(record)
        values = convert.invoice_values(record)
        claim = (record.link_id, record.payment_hash, replaces, record.created_at)

        async def add(connection: Connection) -> bool:
            if not _count(await connection.execute(_CLAIM_LINK_INVOICE, *claim)):
                return False
            await connection.execute(_ADD_INVOICE, *values)
            return True

        return await self._run("add_link_invoice", add, atomic=True)

    async def add_held_request(self, held: HeldRequest) -> None:
        check_new(held)
        values = convert.held_values(held)

        async def add(connection: Connection) -> None:
            await connection.execute(_ADD_HELD, *values)

        await self._run("add_held_request", add)

    async def get_held_request(self, payment_hash: PaymentHash) -> HeldRequest | None:
        async def get(connection: Connection) -> HeldRequest | None:
            row = await connection.fetchrow(_GET_HELD, payment_hash)
            return None if row is None else convert.held_request(row)

        return await self._run("get_held_request", get)

    async def list_held_requests(
        self, states: frozenset[HeldState], limit: int
    ) -> list[HeldRequest]:
        async def list_(connection: Connection) -> list[HeldRequest]:
            rows = await connection.fetch(_LIST_HELD, _states(states), max(0, limit))
            return [convert.held_request(row) for row in rows]

        return await self._run("list_held_requests", list_)

    async def list_held_hashes(self, states: frozenset[HeldState], limit: int) -> list[PaymentHash]:
        async def list_(connection: Connection) -> list[PaymentHash]:
            rows = await connection.fetch(_LIST_HELD_HASHES, _states(states), max(0, limit))
            return [PaymentHash(bytes(row[0])) for row in rows]

        return await self._run("list_held_hashes", list_)

    async def count_held_requests(
        self, states: frozenset[HeldState], client: str | None = None
    ) -> int:
        async def count(connection: Connection) -> int:
            await self._lock_held_count(connection, client)
            return int(await connection.fetchval(_COUNT_HELD, _states(states), client))

        return await self._run("count_held_requests", count)

    async def move_held_request(
        self,
        payment_hash: PaymentHash,
        state: HeldState,
        now: float,
        *,
        response: StoredResponse | None = None,
        failure: str = "",
        keep_until: float | None = None,
    ) -> HeldRequest | None:
        check_move(state, response, keep_until)
        created_at = self._clock.now()
        changes = "" if keeps_request(state) else _DROP_REQUEST
        parameters: tuple[object, ...] = (
            state.value,
            now,
            failure,
            keep_until,
            payment_hash,
            _states(held_predecessors(state)),
        )
        if state in ANSWERED:
            changes += _SET_RESPONSE
            parameters += convert.response_values(response)
        statement = _MOVE_HELD.format(changes=changes)

        async def move(connection: Connection) -> HeldRequest | None:
            row = await connection.fetchrow(statement, *parameters)
            if row is None:
                return None  # unknown, or in a state that may not become this one
            after = convert.held_request(row)
            await _add_events(connection, held_events(after), created_at)
            return after

        return await self._run("move_held_request", move, atomic=True)

    async def mark_held_delivered(
        self, payment_hash: PaymentHash, now: float, keep_until: float
    ) -> None:
        async def deliver(connection: Connection) -> None:
            await connection.execute(_DELIVER_HELD, now, keep_until, payment_hash)

        await self._run("mark_held_delivered", deliver)

    async def prune_held_requests(self, now: float, limit: int) -> int:
        async def prune(connection: Connection) -> int:
            deleted = await connection.execute(_PRUNE_HELD, now, _states(HELD_FINAL), max(0, limit))
            return _count(deleted)

        return await self._run("prune_held_requests", prune)

    async def fan_out_webhook_events(
        self, subscriptions: Mapping[str, frozenset[str]], now: float, limit: int
    ) -> int:
        """One fan-out at a time (``FAN_OUT_LOCK``): a second instance's waits, then starts
        from the cursors the first moved."""

        async def fan_out(connection: Connection) -> int:
            await connection.execute(_LOCK, FAN_OUT_LOCK)
            cursors = {
                str(name): int(cursor) for name, cursor in await connection.fetch(_ENDPOINTS)
            }
            for name in cursors:
                if name not in subscriptions:
                    await connection.execute(_FORGET_ENDPOINT, name)
                    await connection.execute(_ORPHAN_DELIVERIES, now, ENDPOINT_REMOVED, name)
            newest = int(await connection.fetchval(_NEWEST_EVENT))
            added = 0
            for name, types in subscriptions.items():
                cursor = cursors.get(name)
                if cursor is None:
                    await connection.execute(_PUT_ENDPOINT, name, newest)
                    continue
                batch = await connection.fetch(_EVENTS_AFTER, cursor, max(0, limit))
                for event_id, kind in batch:
                    if kind in types:
                        added += _count(
                            await connection.execute(_ADD_DELIVERY, event_id, name, kind, now)
                        )
                if batch:
                    await connection.execute(_PUT_ENDPOINT, name, int(batch[-1][0]))
            return added

        return await self._run("fan_out_webhook_events", fan_out, atomic=True)

    async def next_webhook_delivery(
        self, endpoint: str
    ) -> tuple[WebhookDelivery, WebhookEvent] | None:
        async def next_(connection: Connection) -> tuple[WebhookDelivery, WebhookEvent] | None:
            row = await connection.fetchrow(_NEXT_DELIVERY, endpoint)
            if row is None:
                return None
            return convert.delivery(row[:9]), convert.webhook_event(row[9:])

        return await self._run("next_webhook_delivery", next_)

    async def record_webhook_attempt(
        self,
        event_id: int,
        endpoint: str,
        *,
        delivered: bool,
        now: float,
        status: int | None,
        error: str,
        max_attempts: int,
        initial_backoff: float,
        max_backoff: float,
    ) -> WebhookDelivery | None:
        parameters = (
            delivered,
            max_attempts,
            now,
            max_backoff,
            initial_backoff,
            status,
            error,
            event_id,
            endpoint,
        )

        async def record(connection: Connection) -> WebhookDelivery | None:
            row = await connection.fetchrow(_RECORD_ATTEMPT, *parameters)
            return None if row is None else convert.delivery(row)

        return await self._run("record_webhook_attempt", record)

    async def get_webhook_event(self, event_id: int) -> WebhookEvent | None:
        async def get(connection: Connection) -> WebhookEvent | None:
            row = await connection.fetchrow(_GET_EVENT, event_id)
            return None if row is None else convert.webhook_event(row)

        return await self._run("get_webhook_event", get)

    async def list_webhook_events(self, after: int = 0, limit: int = 100) -> list[WebhookEvent]:
        async def list_(connection: Connection) -> list[WebhookEvent]:
            rows = await connection.fetch(_LIST_EVENTS, after, max(0, limit))
            return [convert.webhook_event(row) for row in rows]

        return await self._run("list_webhook_events", list_)

    async def list_webhook_deliveries(
        self,
        state: DeliveryState | None = None,
        endpoint: str | None = None,
        limit: int = 100,
        *,
        event_id: int | None = None,
    ) -> list[WebhookDelivery]:
        value = None if state is None else state.value

        async def list_(connection: Connection) -> list[WebhookDelivery]:
            rows = await connection.fetch(
                _LIST_DELIVERIES, value, endpoint, event_id, max(0, limit)
            )
            return [convert.delivery(row) for row in rows]

        return await self._run("list_webhook_deliveries", list_)

    async def redeliver_webhooks(
        self,
        now: float,
        *,
        event_id: int | None = None,
        endpoint: str | None = None,
        endpoints: Collection[str] | None = None,
    ) -> int:
        names = None if endpoints is None else sorted(set(endpoints))

        async def redeliver(connection: Connection) -> int:
            if event_id is None:
                return _count(await connection.execute(_REDELIVER, now, None, endpoint, names))
            row = await connection.fetchrow(_GET_EVENT, event_id)
            if row is None:
                return 0
            changed = _count(await connection.execute(_REDELIVER, now, event_id, endpoint, names))
            if changed or endpoint is None or (names is not None and endpoint not in names):
                return changed
            # That endpoint never had it: a delivery of its own.
            added = await connection.execute(_ADD_DELIVERY, event_id, endpoint, str(row[1]), now)
            return _count(added)

        return await self._run("redeliver_webhooks", redeliver, atomic=True)

    async def prune_webhook_events(
        self, before: float, limit: int, endpoints: Collection[str]
    ) -> int:
        names = sorted(set(endpoints))

        async def prune(connection: Connection) -> int:
            return _count(await connection.execute(_PRUNE_EVENTS, before, names, max(0, limit)))

        return await self._run("prune_webhook_events", prune)


class _PostgresTransaction(_PostgresOperations):
    """The operations of one open transaction, on its connection."""

    def __init__(self, connection: Connection, clock: Clock, where: str) -> None:
        self._connection: Connection | None = connection
        self._clock = clock
        self._where = where

    async def _run(self, operation: str, work: Work[T], *, atomic: bool = False) -> T:
        if self._connection is None:
            raise RuntimeError("the transaction has ended; start another one")
        with _database_errors(operation, self._where):
            return await work(self._connection)

    async def _lock_held_count(self, connection: Connection, client: str | None) -> None:
        """Held to the commit, so the count and the insert of a challenge that passed it are
        one step for every instance: a cap (all clients', or one client's) holds across
        them. All first, then the client's, as ``challenge`` counts: one order, no deadlock."""
        if client is None:
            await connection.execute(_LOCK, HELD_LOCK)
        else:
            await connection.execute(_LOCK_HELD_CLIENT, HELD_CLIENT_LOCKS, client)

    def end(self) -> None:
        self._connection = None


class PostgresStore(_PostgresOperations):
    """A ``Store`` in a PostgreSQL database. Create it with ``await PostgresStore.open(url)``."""

    def __init__(self, url: str, pool: asyncpg.Pool, clock: Clock) -> None:
        """Internal: use ``open()``, which makes the pool and migrates."""
        self._url = url
        self.url_for_display = display_url(url)
        self._pool = pool
        self._clock = clock
        self._closed = False
        # Calls under way (and open transactions): close() lets them finish first.
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # The tasks inside one of this store's transactions (a store call from one would wait
        # for itself).
        self._transaction_tasks: set[asyncio.Task[Any]] = set()
        # Undoing the writes of cancelled callers (kept referenced until done).
        self._undoing: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"PostgresStore({self.url_for_display!r})"

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        clock: Clock | None = None,
        read_only: bool = False,
        min_connections: int = 1,
        max_connections: int = 10,
    ) -> PostgresStore:
        """Connect to the database ``url`` names and bring its schema up to date (or, with
        ``read_only``, check it is current: nothing is written)."""
        if not 0 <= min_connections <= max_connections or max_connections < 1:
            raise ValueError(
                f"connections: need 0 <= min ({min_connections}) <= max ({max_connections}), "
                "max >= 1"
            )
        where = display_url(url)
        problem = postgres_url_problem(url)
        if problem is not None:
            raise StoreError(f"connect failed on {where}: {problem}; {POSTGRES_URL_HINT}")
        settings = {
            **SESSION_SETTINGS,
            "idle_in_transaction_session_timeout": f"{round(IDLE_IN_TRANSACTION_TIMEOUT * 1000)}",
        }
        if read_only:
            settings["default_transaction_read_only"] = "on"
        with _database_errors("connect", where):
            pool = await _reading_url(
                asyncpg.create_pool(
                    url,
                    min_size=min_connections,
                    max_size=max_connections,
                    init=functools.partial(_set_session, settings=settings),
                    reset=_keep_session,
                ),
                where,
            )
        try:
            with _database_errors("migrate", where):
                # The first connection, with min_connections 0: where the driver reads the URL.
                connection = await _reading_url(pool.acquire(), where)
                try:
                    if read_only:
                        await check_readable(connection, where)
                    else:
                        await migrate(connection, where)
                finally:
                    await pool.release(connection)
        except BaseException:
            pool.terminate()
            raise
        return cls(url, pool, clock or SystemClock())

    async def connect_dedicated(self) -> asyncpg.Connection:
        """A new connection outside the pool (a session lock lives as long as it); its user
        closes it."""
        self._check_open("connect_dedicated")
        with _database_errors("connect_dedicated", self.url_for_display):
            return await asyncpg.connect(self._url)

    def _check_open(self, operation: str) -> None:
        if self._closed:
            raise StoreClosed(f"{operation}: the store at {self.url_for_display} is closed")

    @contextlib.contextmanager
    def _call(self, operation: str, refusal: str = _REENTERED) -> Iterator[None]:
        """Around one store call or transaction: refused once closed or from inside this
        store's transaction, and counted until it ends (``close`` waits for it)."""
        self._check_open(operation)
        if asyncio.current_task() in self._transaction_tasks:
            raise RuntimeError(refusal)
        self._enter()
        try:
            yield
        finally:
            self._leave()

    def _enter(self) -> None:
        self._busy += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._busy -= 1
        if not self._busy:
            self._idle.set()

    async def _run(self, operation: str, work: Work[T], *, atomic: bool = False) -> T:
        with self._call(operation):
            return await self._on_connection(operation, work, atomic)

    async def _on_connection(self, operation: str, work: Work[T], atomic: bool) -> T:
        with _database_errors(operation, self.url_for_display):
            async with self._pool.acquire() as connection:
                if not atomic:
                    return await work(connection)
                async with connection.transaction():
                    return await work(connection)

    async def _run_whole(
        self,
        operation: str,
        work: Work[T],
        undo: Callable[[T], Work[object] | None] | None = None,
    ) -> T:
        """Shielded: a caller cancelled while it waits leaves the write to finish, and
        ``undo`` (when given) reverses it once it has."""
        with self._call(operation):
            written = asyncio.ensure_future(self._on_connection(operation, work, True))
            try:
                return await asyncio.shield(written)
            except asyncio.CancelledError:
                self._enter()  # close() waits for the write and its undo too
                written.add_done_callback(functools.partial(self._abandoned, operation, undo))
                raise

    def _abandoned(
        self,
        operation: str,
        undo: Callable[[Any], Work[object] | None] | None,
        written: asyncio.Future[Any],
    ) -> None:
        """The write of a cancelled caller is done: reverse it, or log its failure."""
        reverse = None
        if not written.cancelled():
            if (error := written.exception()) is not None:
                log.warning("the write of a cancelled caller failed: %s", error)
            elif undo is not None:
                reverse = undo(written.result())
        if reverse is None:
            self._leave()
            return
        task = asyncio.ensure_future(self._undo(operation, reverse))
        self._undoing.add(task)
        task.add_done_callback(self._undoing.discard)

    async def _undo(self, operation: str, reverse: Work[object]) -> None:
        try:
            await self._on_connection(f"undo {operation}", reverse, True)
        except StoreError as error:
            log.error("could not reverse the write of a cancelled caller: %s", error)
        finally:
            self._leave()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[StoreOperations]:
        """Only the acquire, BEGIN and COMMIT are the store's to report as ``StoreError``:
        what the block raises goes through as it is, after the rollback."""
        task = asyncio.current_task()
        assert task is not None
        where = self.url_for_display
        with self._call("transaction", _NESTED):
            with _database_errors("transaction", where):
                connection = await self._pool.acquire()
            try:
                transaction = connection.transaction()
                with _database_errors("transaction", where):
                    await transaction.start()
                operations = _PostgresTransaction(connection, self._clock, where)
                self._transaction_tasks.add(task)
                try:
                    yield operations
                except BaseException:
                    # A failed rollback (a broken connection) leaves nothing committed; the
                    # release resets (or drops) the connection.
                    with contextlib.suppress(*_DATABASE_ERRORS):
                        await transaction.rollback()
                    raise
                finally:
                    operations.end()
                    self._transaction_tasks.discard(task)
                with _database_errors("commit", where):
                    await transaction.commit()
            finally:
                await self._pool.release(connection)

    async def take_rate_token(
        self, bucket: str, rate: float, burst: float, now: float
    ) -> tuple[float, float]:
        """One token from the bucket shared by every instance, in one statement:
        ``(wait, tokens)`` (``gateway.ports.RateBuckets``)."""
        if not (rate > 0 and burst >= 1):
            raise ValueError(f"a bucket needs rate > 0 and burst >= 1, got {rate}, {burst}")

        async def take(connection: Connection) -> tuple[float, float]:
            row = await connection.fetchrow(_TAKE_FROM_BUCKET, bucket, rate, burst, now)
            assert row is not None  # an upsert returns its row
            tokens, granted = float(row[0]), bool(row[1])
            return (0.0 if granted else (1.0 - tokens) / rate), tokens

        return await self._run("take_rate_token", take)

    async def prune_rate_buckets(self, idle_before: float, limit: int) -> int:
        async def prune(connection: Connection) -> int:
            return _count(await connection.execute(_PRUNE_RATE_BUCKETS, idle_before, max(0, limit)))

        return await self._run("prune_rate_buckets", prune)

    async def close(self) -> None:
        """Let the calls under way and open transactions finish, then close the pool. Later
        calls raise ``StoreClosed``; closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._idle.wait()
        finally:
            await self._pool.close()


async def _set_session(connection: asyncpg.Connection, settings: Mapping[str, str]) -> None:
    """The session settings of a new pooled connection, set once it is open rather than sent
    as startup parameters, which PgBouncer refuses (but for a few of its own)."""
    await connection.execute(
        "SELECT set_config(name, value, false)"
        " FROM unnest($1::text[], $2::text[]) AS s(name, value)",
        list(settings),
        list(settings.values()),
    )


async def _keep_session(connection: asyncpg.Connection) -> None:
    """The pool's reset of a connection it takes back: nothing beyond the driver's own, which
    rolls back an open transaction. Its default also runs ``RESET ALL``, ``CLOSE ALL``,
    ``UNLISTEN *`` and unlocks session advisory locks, a round trip per call that costs the
    server a third of its CPU per challenge, and would undo ``_set_session``. The store sets
    nothing else in a session, opens no cursor, listens to nothing and takes only
    transaction-scoped locks (leadership's session lock is on a connection outside the pool)."""


def display_url(url: str) -> str:
    """``url`` without its user part: what messages and logs may show. One the driver would
    misread (``postgres_url_problem``: a password may have spilled into any part of it), or
    with a password parameter (an unencoded "&" in it would leave part of it as a parameter
    name), is shown as ``postgresql://...``."""
    if postgres_url_problem(url) is not None or "password" in url.lower():
        return "postgresql://..."
    parts = urllib.parse.urlsplit(url)
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}{query}"


async def _reading_url(step: Awaitable[T], where: str) -> T:
    """``step``; the driver's ValueError reading the URL (``ClientConfigurationError`` is one)
    as a ``StoreError`` that neither quotes it nor chains it: its text may hold the password."""
    try:
        return await step
    except ValueError:
        pass  # raised below, outside this handler, so that the error is not its context
    raise StoreError(
        f"connect failed on {where}: the driver cannot read the URL; {POSTGRES_URL_HINT}"
    )


@contextlib.contextmanager
def _database_errors(operation: str, where: str) -> Iterator[None]:
    """Database and connection failures as ``StoreError``."""
    try:
        yield
    except _DATABASE_ERRORS as error:
        raise StoreError(
            f"{operation} failed on {where}: {type(error).__name__}: {error}"
        ) from None


async def _settle(
    connection: Connection,
    *,
    reservation_id: int,
    charged_msat: int,
    method: str = "",
    path: str = "",
    at: float = 0.0,
    split: Split = (),
) -> Msat | None:
    """``settle_reservation``'s statement (``charged_msat`` 0: a release), then the ledger's
    entries of a charge with a split, in the same transaction (the reservation went once)."""
    row = await connection.fetchrow(_SETTLE, reservation_id, charged_msat, at, method, path)
    assert row is not None  # a SELECT without FROM: one row
    held, balance, uncovering = row
    if held is not None:
        entries = charge_entries(split, charged_msat)
        await _credit_split(connection, charge_source(reservation_id), entries, at)
        return Msat(int(balance))
    if uncovering is not None:
        raise ValueError(f"charged_msat {charged_msat} is above the {uncovering} reserved")
    return None


async def _credit_split(connection: Connection, source: str, entries: Entries, at: float) -> None:
    """Write the ledger entries of one payment and add the payees' shares to what they
    earned, in the caller's transaction; the payees' rows are locked in name order (as
    ``earned`` sorts them), so settlements splitting to the same payees never deadlock."""
    if not entries:
        return
    await connection.executemany(
        _ADD_SPLIT_ENTRY, [(source, payee, share, at) for payee, share in entries]
    )
    await connection.executemany(_EARN, earned(entries))


async def _pay_link(connection: Connection, payment: LinkPayment) -> PaymentLink | None:
    """Add ``payment`` to its link, in the caller's transaction (its row locked to the
    commit); the link after it, None when it is unknown."""
    row = await connection.fetchrow(_PAY_LINK, payment.link_id, payment.amount_msat, payment.at)
    return None if row is None else convert.payment_link(row)


async def _add_events(connection: Connection, events: Iterable[NewEvent], now: float) -> None:
    """Insert ``events`` into the outbox, in the caller's transaction.

    First ``EVENTS_LOCK``, held to the commit: an event id is drawn from a sequence when the
    row is inserted, not when it commits, so two writers could otherwise commit ids 8 then 7,
    and a fan-out reading between the two commits would move its cursor past 8 and never see
    7. Under the lock the next writer draws its id only after the previous one committed, so
    ids commit in order and a cursor never skips one. Taken last in every write (after its
    row locks), so it joins no lock cycle; writes without events never take it.
    """
    values = [
        (event.type, event.resource, event.payload, now, secrets.token_hex(16)) for event in events
    ]
    if not values:
        return
    await connection.execute(_LOCK, EVENTS_LOCK)
    await connection.executemany(_ADD_EVENT, values)
