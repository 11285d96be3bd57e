"""``SqliteStore``: the embedded default ``Store``, one SQLite file in WAL mode.

Threading: ``sqlite3`` blocks, so each store owns one dedicated worker thread
(a ``ThreadPoolExecutor`` with ``max_workers=1``) that opens the connection, runs every
statement and closes it. The event loop only ever awaits that thread, which runs what it is
given in order: each operation is atomic with respect to the others (the few of several
statements in a transaction of their own), and each write is committed before its coroutine
returns.

Group commit: a request on a credit route reserves its price and later settles the charge,
two writes on the hot path. Those (``reserve``, ``settle_reservation``) queued while one group
is being committed are committed together next, in one transaction: under load one commit
serves many requests. Each still returns only once it is
committed.

Transactions: ``transaction()`` holds the store's ``TransactionGate`` from ``BEGIN IMMEDIATE``
(the write lock, against other processes too) to ``COMMIT`` or ``ROLLBACK``, and the store's
own calls made meanwhile wait for it. Like a group, a transaction runs on the loop's own
thread when the database is free at its ``BEGIN`` (a challenge's few inserts: no hand-over
to the worker per statement), on the worker otherwise. A failed or cancelled transaction
always rolls back (on the worker: queued), so it never leaves a connection inside one.

Opening the file, its safety checks and the schema migrations are in ``sqlite_file``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

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
from gateway.store.gate import TransactionGate
from gateway.store.held import (
    ANSWERED,
    HELD_FINAL,
    check_move,
    check_new,
    keeps_request,
    predecessors,
)
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
from gateway.store.sqlite_file import (
    BUSY_TIMEOUT,
    Synchronous,
    connect,
    connect_nonblocking,
    describe,
)

T = TypeVar("T")
log = logging.getLogger(__name__)

# ON CONFLICT (pk) DO NOTHING rather than INSERT OR IGNORE: OR IGNORE would also silently drop
# a row that breaks a NOT NULL constraint, where we want the error.
_PUT_ROOT_KEY = """
    INSERT INTO root_keys (key_id, token_id, root_key, created_at) VALUES (?, ?, ?, ?)
    ON CONFLICT (key_id) DO NOTHING
"""
_GET_ROOT_KEY_ROW = "SELECT token_id, root_key FROM root_keys WHERE key_id = ?"
_REVOKE = "DELETE FROM root_keys WHERE token_id = ?"
_ADD_INVOICE = """
    INSERT INTO invoices (
        payment_hash, payment_request, amount_msat, token_id, service, method, path,
        state, created_at, expires_at, add_index, settle_index, amount_paid_msat, settled_at,
        buys_credit, split, comment
    ) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (payment_hash) DO NOTHING
"""
# Writes what ``InvoiceRecord.updated`` decided (the state rules are not repeated in SQL).
_SET_STATE = """
    UPDATE invoices SET state = ?, settle_index = ?, amount_paid_msat = ?, settled_at = ?
    WHERE payment_hash = ?
"""
_GET_INVOICE = """
    SELECT payment_hash, payment_request, amount_msat, token_id, service, method, path,
           state, created_at, expires_at, add_index, settle_index, amount_paid_msat, settled_at,
           buys_credit, split, comment
    FROM invoices WHERE payment_hash = ?
"""
# LIMIT -1 is SQLite for "no limit".
_LIST_INVOICES = """
    SELECT payment_hash, payment_request, amount_msat, token_id, service, method, path,
           state, created_at, expires_at, add_index, settle_index, amount_paid_msat, settled_at,
           buys_credit, split, comment
    FROM invoices WHERE :service IS NULL OR service = :service
    ORDER BY created_at DESC, rowid DESC LIMIT :limit
"""
# Sums as integers (sum() of no rows is NULL: coalesced).
_INVOICE_TOTALS = """
    SELECT service, state, count(*), coalesce(sum(amount_msat), 0),
           coalesce(sum(CASE WHEN state != 'SETTLED' THEN 0
                             WHEN amount_paid_msat > 0 THEN amount_paid_msat
                             ELSE amount_msat END), 0)
    FROM invoices GROUP BY service, state ORDER BY service, state
"""
_LIST_INVOICES_IN_STATE = """
    SELECT payment_hash, payment_request, amount_msat, token_id, service, method, path,
           state, created_at, expires_at, add_index, settle_index, amount_paid_msat, settled_at,
           buys_credit, split, comment
    FROM invoices WHERE state = :state AND (:service IS NULL OR service = :service)
    ORDER BY created_at DESC, rowid DESC LIMIT :limit
"""
_LIST_OVERDUE = """
    SELECT payment_hash, payment_request, amount_msat, token_id, service, method, path,
           state, created_at, expires_at, add_index, settle_index, amount_paid_msat, settled_at,
           buys_credit, split, comment
    FROM invoices WHERE state = 'OPEN' AND expires_at < ? ORDER BY expires_at, rowid LIMIT ?
"""
# Settled at (created at, when the node gave no time) bucketed from the epoch; the amount
# paid, or the invoice's when none was reported (as a credit purchase counts it).
_REVENUE = """
    SELECT CAST(at / ? AS INTEGER) * ? AS start, service, COUNT(*), SUM(amount)
    FROM (
        SELECT COALESCE(settled_at, created_at) AS at, service,
               CASE WHEN amount_paid_msat > 0 THEN amount_paid_msat ELSE amount_msat END AS amount
        FROM invoices WHERE state = 'SETTLED' AND expires_at >= ?
    )
    WHERE at >= ? GROUP BY start, service ORDER BY start, service
"""
# By the invoices_token_id index: ``+state`` keeps the planner off invoices_state_created_at,
# which would walk every OPEN invoice of every token (a token has few invoices to sort).
_LIST_OPEN_CREDIT_INVOICES = """
    SELECT payment_hash, payment_request, amount_msat, token_id, service, method, path,
           state, created_at, expires_at, add_index, settle_index, amount_paid_msat, settled_at,
           buys_credit, split, comment
    FROM invoices WHERE token_id = ? AND +state = 'OPEN' AND buys_credit
    ORDER BY created_at DESC, rowid DESC LIMIT ?
"""
_PRUNABLE = """
    SELECT payment_hash, token_id FROM invoices
    WHERE state IN ('CANCELED', 'EXPIRED') AND expires_at < ? LIMIT ?
"""
# The state is tested again, though the transaction already holds the write lock.
_PRUNE_INVOICE = "DELETE FROM invoices WHERE payment_hash = ? AND state IN ('CANCELED', 'EXPIRED')"
# A pruned invoice's own root key, found by ``invoice_key_id``.
_PRUNE_ROOT_KEY = "DELETE FROM root_keys WHERE key_id = ?"
# A token's remaining root keys (and its account, if it never received anything) go with its
# last invoice: top-ups share the token id, and an unpaid one must not take the paid token
# along.
_PRUNE_ROOT_KEYS = """
    DELETE FROM root_keys
    WHERE token_id = ? AND NOT EXISTS (SELECT 1 FROM invoices WHERE token_id = ?)
"""
_PRUNE_ACCOUNT = """
    DELETE FROM accounts
    WHERE token_id = ? AND credited_msat = 0
      AND NOT EXISTS (SELECT 1 FROM invoices WHERE token_id = ?)
"""
_GET_CURSOR = "SELECT add_index, settle_index FROM cursor WHERE id = 0"
_SAVE_CURSOR = """
    UPDATE cursor SET add_index = max(add_index, ?), settle_index = max(settle_index, ?)
    WHERE id = 0
"""

# Credit. The balance is credited_msat - spent_msat - reserved_msat - withdrawn_msat. No
# RETURNING (SQLite 3.35): the balance after a write is read back in its transaction, so the
# older system SQLite of some distributions (RHEL 9 has 3.34) keeps working.
_OPEN_ACCOUNT = """
    INSERT INTO accounts (
        token_id, service, credited_msat, spent_msat, reserved_msat, withdrawn_msat, created_at
    ) VALUES (?, ?, 0, 0, 0, 0, ?)
    ON CONFLICT (token_id) DO NOTHING
"""
# Opens the account too if the challenge did not: a settled payment is never lost.
_CREDIT = """
    INSERT INTO accounts (
        token_id, service, credited_msat, spent_msat, reserved_msat, withdrawn_msat, created_at
    ) VALUES (?, ?, ?, 0, 0, 0, ?)
    ON CONFLICT (token_id) DO UPDATE SET credited_msat = credited_msat + excluded.credited_msat
"""
_GET_ACCOUNT = """
    SELECT token_id, service, credited_msat, spent_msat, reserved_msat, withdrawn_msat, created_at,
           last_used_at
    FROM accounts WHERE token_id = ?
"""
_GET_BALANCE = """
    SELECT credited_msat - spent_msat - reserved_msat - withdrawn_msat
    FROM accounts WHERE token_id = ?
"""
_LIST_ACCOUNTS = """
    SELECT token_id, service, credited_msat, spent_msat, reserved_msat, withdrawn_msat, created_at,
           last_used_at
    FROM accounts ORDER BY coalesce(last_used_at, created_at) DESC, token_id DESC LIMIT ?
"""
# The balance test and the debit are one statement: atomic across processes.
_RESERVE = """
    UPDATE accounts SET reserved_msat = reserved_msat + ?, last_used_at = ?
    WHERE token_id = ? AND credited_msat - spent_msat - reserved_msat - withdrawn_msat >= ?
"""
_ADD_RESERVATION = "INSERT INTO reservations (token_id, amount_msat, expires_at) VALUES (?, ?, ?)"
_GET_RESERVATION = "SELECT token_id, amount_msat FROM reservations WHERE id = ?"
_DELETE_RESERVATION = "DELETE FROM reservations WHERE id = ?"
_SETTLE = """
    UPDATE accounts SET reserved_msat = reserved_msat - ?, spent_msat = spent_msat + ?
    WHERE token_id = ?
"""
_ADD_CHARGE = "INSERT INTO charges (token_id, at, method, path, amount_msat) VALUES (?, ?, ?, ?, ?)"
_EXPIRED_RESERVATIONS = """
    SELECT id, token_id, amount_msat FROM reservations
    WHERE expires_at < ? ORDER BY expires_at LIMIT ?
"""
_RELEASE = "UPDATE accounts SET reserved_msat = reserved_msat - ? WHERE token_id = ?"
_LIST_CHARGES = """
    SELECT token_id, at, method, path, amount_msat FROM charges
    WHERE token_id = ? ORDER BY at DESC, rowid DESC LIMIT ?
"""
# The oldest first, found by the charges_at index; one statement, so atomic on its own.
_PRUNE_CHARGES = """
    DELETE FROM charges WHERE rowid IN (
        SELECT rowid FROM charges WHERE at < ? ORDER BY at, rowid LIMIT ?
    )
"""
# One statement, so one snapshot: the totals reconcile even while others write.
_CREDIT_TOTALS = """
    SELECT * FROM (
        SELECT count(*), coalesce(sum(credited_msat), 0), coalesce(sum(spent_msat), 0),
               coalesce(sum(reserved_msat), 0),
               coalesce(sum(credited_msat - spent_msat - reserved_msat - withdrawn_msat), 0)
        FROM accounts
    ), (
        SELECT coalesce(sum(CASE state WHEN 'SUCCEEDED' THEN amount_msat + fee_msat END), 0),
               coalesce(sum(CASE state WHEN 'PENDING' THEN amount_msat + fee_reserve_msat END), 0)
        FROM withdrawals
    )
"""
_ADD_WITHDRAWAL = """
    INSERT INTO withdrawals (
        payment_hash, token_id, payment_request, amount_msat, fee_reserve_msat, state,
        created_at, fee_msat, resolved_at
    ) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_GET_WITHDRAWAL = """
    SELECT payment_hash, token_id, payment_request, amount_msat, fee_reserve_msat, state,
           created_at, fee_msat, resolved_at
    FROM withdrawals WHERE payment_hash = ?
"""
# The token id (twice) or NULL for every token; LIMIT -1: no limit. Plain placeholders:
# numbered ones with a sequence of values are deprecated from Python 3.12.
_LIST_WITHDRAWALS = """
    SELECT payment_hash, token_id, payment_request, amount_msat, fee_reserve_msat, state,
           created_at, fee_msat, resolved_at
    FROM withdrawals WHERE ? IS NULL OR token_id = ?
    ORDER BY created_at DESC, rowid DESC LIMIT ?
"""
_LIST_WITHDRAWALS_IN_STATE = """
    SELECT payment_hash, token_id, payment_request, amount_msat, fee_reserve_msat, state,
           created_at, fee_msat, resolved_at
    FROM withdrawals WHERE state = ? AND (? IS NULL OR token_id = ?)
    ORDER BY created_at DESC, rowid DESC LIMIT ?
"""
_WITHDRAW = """
    UPDATE accounts SET withdrawn_msat = withdrawn_msat + ?
    WHERE token_id = ? AND credited_msat - spent_msat - reserved_msat - withdrawn_msat >= ?
"""
_RESOLVE_WITHDRAWAL = """
    UPDATE withdrawals SET state = ?, fee_msat = ?, resolved_at = ?
    WHERE payment_hash = ? AND state = 'PENDING'
"""
_REFUND_WITHDRAWAL = "UPDATE accounts SET withdrawn_msat = withdrawn_msat - ? WHERE token_id = ?"

# The split ledger. A payee's accrued is earned_msat - paid_msat - fees_msat - pending_msat.
# The primary key (source, payee) refuses a payment split twice.
_ADD_SPLIT_ENTRY = "INSERT INTO split_entries (source, payee, share_msat, at) VALUES (?, ?, ?, ?)"
# A payee's row is made by its first share.
_EARN = """
    INSERT INTO payees (
        payee, earned_msat, paid_msat, fees_msat, pending_msat, merchant_fees_msat
    ) VALUES (?, ?, 0, 0, 0, 0)
    ON CONFLICT (payee) DO UPDATE SET earned_msat = earned_msat + excluded.earned_msat
"""
_GET_PAYEE = """
    SELECT payee, earned_msat, paid_msat, fees_msat, pending_msat, merchant_fees_msat,
           last_payout_at
    FROM payees WHERE payee = ?
"""
_LIST_PAYEES = """
    SELECT payee, earned_msat, paid_msat, fees_msat, pending_msat, merchant_fees_msat,
           last_payout_at
    FROM payees ORDER BY payee
"""
# The accrued test and the debit are one statement: atomic across processes.
_DEBIT_PAYEE = """
    UPDATE payees SET pending_msat = pending_msat + ?
    WHERE payee = ? AND earned_msat - paid_msat - fees_msat - pending_msat >= ?
"""
# A resolved payout's debit leaves pending (``gateway.store.ledger.payee_change``); the
# latest successful payout's time only grows.
_RESOLVE_PAYEE = """
    UPDATE payees SET
        pending_msat = pending_msat - :pending,
        paid_msat = paid_msat + :paid,
        fees_msat = fees_msat + :fees,
        merchant_fees_msat = merchant_fees_msat + :merchant_fees,
        last_payout_at = CASE WHEN :last IS NULL THEN last_payout_at
                              ELSE max(coalesce(last_payout_at, :last), :last) END
    WHERE payee = :payee
"""
_ADD_PAYOUT = """
    INSERT INTO payouts (
        payment_hash, payee, destination, payment_request, amount_msat, fee_reserve_msat,
        payee_pays_fee, state, created_at, fee_msat, resolved_at, failure
    ) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_GET_PAYOUT = """
    SELECT payment_hash, payee, destination, payment_request, amount_msat, fee_reserve_msat,
           payee_pays_fee, state, created_at, fee_msat, resolved_at, failure
    FROM payouts WHERE payment_hash = ?
"""
_RESOLVE_PAYOUT = """
    UPDATE payouts SET state = ?, fee_msat = ?, resolved_at = ?, failure = ?
    WHERE payment_hash = ? AND state = 'PENDING'
"""
# Each filter is "? IS NULL OR column = ?" (the value twice); LIMIT -1: no limit.
_LIST_PAYOUTS = """
    SELECT payment_hash, payee, destination, payment_request, amount_msat, fee_reserve_msat,
           payee_pays_fee, state, created_at, fee_msat, resolved_at, failure
    FROM payouts WHERE (? IS NULL OR payee = ?) AND (? IS NULL OR state = ?)
    ORDER BY created_at DESC, rowid DESC LIMIT ?
"""
# One statement, so one snapshot: the totals reconcile even while others write.
_SPLIT_TOTALS = """
    SELECT * FROM (
        SELECT coalesce(sum(share_msat), 0),
               coalesce(sum(CASE WHEN payee = '' THEN share_msat END), 0)
        FROM split_entries
    ), (
        SELECT coalesce(sum(earned_msat), 0), coalesce(sum(paid_msat), 0),
               coalesce(sum(pending_msat), 0),
               coalesce(sum(earned_msat - paid_msat - fees_msat - pending_msat), 0),
               coalesce(sum(fees_msat), 0), coalesce(sum(merchant_fees_msat), 0)
        FROM payees
    )
"""

# Payment links.
_ADD_LINK = """
    INSERT INTO payment_links (
        link_id, memo, min_msat, max_msat, single_use, created_at, expires_at, canceled_at,
        paid_count, paid_msat, last_paid_at, open_hash
    ) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (link_id) DO NOTHING
"""
_GET_LINK = """
    SELECT link_id, memo, min_msat, max_msat, single_use, created_at, expires_at, canceled_at,
           paid_count, paid_msat, last_paid_at, open_hash
    FROM payment_links WHERE link_id = ?
"""
# The state (NULL: any), twice, then the time it is judged at (the CASE is
# ``PaymentLink.state``); LIMIT -1: no limit.
_LIST_LINKS = """
    SELECT link_id, memo, min_msat, max_msat, single_use, created_at, expires_at, canceled_at,
           paid_count, paid_msat, last_paid_at, open_hash
    FROM payment_links
    WHERE ? IS NULL OR ? = CASE WHEN single_use AND paid_count > 0 THEN 'PAID'
                                WHEN canceled_at IS NOT NULL THEN 'CANCELED'
                                WHEN expires_at <= ? THEN 'EXPIRED'
                                ELSE 'OPEN' END
    ORDER BY created_at DESC, rowid DESC LIMIT ?
"""
_CANCEL_LINK = "UPDATE payment_links SET canceled_at = coalesce(canceled_at, ?) WHERE link_id = ?"
# The one statement that lets an invoice of a link be recorded: the link must be neither
# cancelled nor expired (at the invoice's creation), and a single-use link's open invoice
# must still be the one replaced, and the link unpaid; then that open invoice is the new one
# (a compare-and-set: of two processes replacing the same invoice only the first finds it
# still there, the other's rowcount is 0). A reusable link's row is left as it was.
_CLAIM_LINK_INVOICE = """
    UPDATE payment_links
    SET open_hash = CASE WHEN single_use THEN :hash ELSE open_hash END
    WHERE link_id = :link AND canceled_at IS NULL
      AND (expires_at IS NULL OR expires_at > :now)
      AND (NOT single_use OR (open_hash IS :replaces AND paid_count = 0))
"""
# The latest payment's time only grows.
_PAY_LINK = """
    UPDATE payment_links SET
        paid_count = paid_count + 1,
        paid_msat = paid_msat + ?,
        last_paid_at = max(coalesce(last_paid_at, ?), ?)
    WHERE link_id = ?
"""

# Pay-on-success requests. ``{states}``: one ``?`` per state of a list (``_states``).
_ADD_HELD = """
    INSERT INTO held_requests (
        payment_hash, preimage, token_id, client, token_grant, state, method, target,
        request_headers, request_body, created_at, expires_at, updated_at, status,
        response_headers, response_body, failure, keep_until, delivered_at
    ) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (payment_hash) DO NOTHING
"""
_GET_HELD = """
    SELECT payment_hash, preimage, token_id, client, token_grant, state, method, target,
           request_headers, request_body, created_at, expires_at, updated_at, status,
           response_headers, response_body, failure, keep_until, delivered_at
    FROM held_requests WHERE payment_hash = ?
"""
_LIST_HELD = """
    SELECT payment_hash, preimage, token_id, client, token_grant, state, method, target,
           request_headers, request_body, created_at, expires_at, updated_at, status,
           response_headers, response_body, failure, keep_until, delivered_at
    FROM held_requests WHERE state IN ({states}) ORDER BY created_at, rowid LIMIT ?
"""
_LIST_HELD_HASHES = """
    SELECT payment_hash FROM held_requests WHERE state IN ({states})
    ORDER BY created_at, rowid LIMIT ?
"""
_COUNT_HELD = "SELECT count(*) FROM held_requests WHERE state IN ({states})"
_COUNT_HELD_OF_CLIENT = (
    "SELECT count(*) FROM held_requests WHERE client = ? AND state IN ({states})"
)
# The state test and the write are one statement: of two processes moving the same row, only
# the first finds it in a state that may become the new one (the other's rowcount is 0). An
# empty failure keeps the earlier text; keep_until never grows past a delivery's.
_MOVE_HELD = """
    UPDATE held_requests SET
        state = ?, updated_at = ?, failure = coalesce(nullif(?, ''), failure),
        keep_until = min(coalesce(?, keep_until), coalesce(keep_until, ?)){changes}
    WHERE payment_hash = ? AND state IN ({states})
"""
# The method and target stay (a replay is checked against them); the CASE keeps a row stored
# without a request as it is (the table's CHECKs tie the four columns together).
_DROP_REQUEST = """,
    request_headers = CASE WHEN method IS NULL THEN NULL ELSE '[]' END,
    request_body = CASE WHEN method IS NULL THEN NULL ELSE X'' END"""
_SET_RESPONSE = ", status = ?, response_headers = ?, response_body = ?"
_DELIVER_HELD = """
    UPDATE held_requests
    SET delivered_at = coalesce(delivered_at, ?), keep_until = min(coalesce(keep_until, ?), ?)
    WHERE payment_hash = ?
"""
# The soonest due first, found by the held_requests_keep_until index (``+state`` keeps the
# planner off the state index, which would sort every final row); one statement.
_PRUNE_HELD = """
    DELETE FROM held_requests WHERE rowid IN (
        SELECT rowid FROM held_requests WHERE keep_until < ? AND +state IN ({states})
        ORDER BY keep_until LIMIT ?
    )
"""

# Webhooks: the outbox and its deliveries. An event's webhook_id is random, given here.
_ADD_EVENT = """
    INSERT INTO events (type, resource, payload, created_at, webhook_id)
    VALUES (?, ?, ?, ?, lower(hex(randomblob(16))))
"""
_GET_EVENT = """
    SELECT id, type, resource, payload, created_at, webhook_id FROM events WHERE id = ?
"""
_LIST_EVENTS = """
    SELECT id, type, resource, payload, created_at, webhook_id FROM events
    WHERE id > ? ORDER BY id LIMIT ?
"""
_NEWEST_EVENT = "SELECT coalesce(max(id), 0) FROM events"
_ENDPOINTS = "SELECT name, cursor FROM webhook_endpoints"
_FORGET_ENDPOINT = "DELETE FROM webhook_endpoints WHERE name = ?"
# A forgotten endpoint's PENDING deliveries would wait for ever: DEAD, with the reason.
_ORPHAN_DELIVERIES = """
    UPDATE webhook_deliveries SET state = 'DEAD', next_attempt_at = ?, last_error = ?
    WHERE endpoint = ? AND state = 'PENDING'
"""
_PUT_ENDPOINT = """
    INSERT INTO webhook_endpoints (name, cursor) VALUES (?, ?)
    ON CONFLICT (name) DO UPDATE SET cursor = excluded.cursor
"""
_EVENTS_AFTER = "SELECT id, type FROM events WHERE id > ? ORDER BY id LIMIT ?"
_ADD_DELIVERY = """
    INSERT INTO webhook_deliveries (
        event_id, endpoint, event_type, state, attempts, next_attempt_at, last_error
    ) VALUES (?, ?, ?, 'PENDING', 0, ?, '')
    ON CONFLICT (endpoint, event_id) DO NOTHING
"""
_GET_DELIVERY = """
    SELECT event_id, endpoint, event_type, state, attempts, next_attempt_at, last_status,
           last_error, delivered_at
    FROM webhook_deliveries WHERE event_id = ? AND endpoint = ?
"""
# One statement: a read of one snapshot, with no write lock.
_NEXT_DELIVERY = """
    SELECT d.event_id, d.endpoint, d.event_type, d.state, d.attempts, d.next_attempt_at,
           d.last_status, d.last_error, d.delivered_at,
           e.id, e.type, e.resource, e.payload, e.created_at, e.webhook_id
    FROM webhook_deliveries AS d JOIN events AS e ON e.id = d.event_id
    WHERE d.endpoint = ? AND d.state = 'PENDING' ORDER BY d.event_id LIMIT 1
"""
# The outcome decided from the attempts stored now (SET sees the row before the update):
# DELIVERED; DEAD at max_attempts; else PENDING after webhook_retry_delay(attempts + 1, ...),
# min(most, initial * 2 ** min(attempts, 60)), 2 ** n as 1 << n.
_RECORD_ATTEMPT = """
    UPDATE webhook_deliveries SET
        state = CASE WHEN :delivered THEN 'DELIVERED'
                     WHEN attempts + 1 >= :max_attempts THEN 'DEAD'
                     ELSE 'PENDING' END,
        next_attempt_at = CASE WHEN :delivered OR attempts + 1 >= :max_attempts THEN :now
                               ELSE :now + min(:most, :initial * (1 << min(attempts, 60))) END,
        attempts = attempts + 1,
        last_status = :status,
        last_error = :error,
        delivered_at = CASE WHEN :delivered THEN :now END
    WHERE event_id = :event_id AND endpoint = :endpoint AND state = 'PENDING'
"""
# Each filter is "? IS NULL OR column = ?" (the value twice); LIMIT -1: no limit.
_LIST_DELIVERIES = """
    SELECT event_id, endpoint, event_type, state, attempts, next_attempt_at, last_status,
           last_error, delivered_at
    FROM webhook_deliveries
    WHERE (? IS NULL OR state = ?) AND (? IS NULL OR endpoint = ?) AND (? IS NULL OR event_id = ?)
    ORDER BY event_id DESC, endpoint LIMIT ?
"""
# {among}: "" (any endpoint) or "AND endpoint IN (?, ...)" (``_among``).
_REDELIVER_EVENT = """
    UPDATE webhook_deliveries
    SET state = 'PENDING', attempts = 0, next_attempt_at = ?, delivered_at = NULL
    WHERE event_id = ? AND (? IS NULL OR endpoint = ?) {among}
"""
_REDELIVER_DEAD = """
    UPDATE webhook_deliveries
    SET state = 'PENDING', attempts = 0, next_attempt_at = ?, delivered_at = NULL
    WHERE state = 'DEAD' AND (? IS NULL OR endpoint = ?) {among}
"""
# Nobody still has to send them: no PENDING delivery to a configured endpoint, and every
# configured endpoint's cursor past them; {names}: the configured endpoints' placeholders.
_PRUNABLE_EVENTS = """
    SELECT id FROM events
    WHERE created_at < ?
      AND id <= coalesce(
          (SELECT min(cursor) FROM webhook_endpoints WHERE name IN ({names})), id
      )
      AND NOT EXISTS (
          SELECT 1 FROM webhook_deliveries
          WHERE event_id = events.id AND state = 'PENDING' AND endpoint IN ({names})
      )
    ORDER BY id LIMIT ?
"""
_PRUNE_DELIVERIES = "DELETE FROM webhook_deliveries WHERE event_id = ?"
_PRUNE_EVENT = "DELETE FROM events WHERE id = ?"


class _SqliteOperations:
    """The ``StoreOperations`` as statements; ``_run`` says where and how each one runs."""

    _clock: Clock

    async def _run(
        self, operation: str, function: Callable[[sqlite3.Connection], T], *, atomic: bool = False
    ) -> T:
        """Run ``function`` on the worker; ``atomic``: it runs several statements that must
        commit together (a transaction of their own unless one is open)."""
        raise NotImplementedError

    async def _run_grouped(
        self,
        operation: str,
        function: Callable[[sqlite3.Connection], T],
        undo: Callable[[T], Callable[[sqlite3.Connection], object] | None] | None = None,
    ) -> T:
        """Run ``function`` atomically, like ``_run(..., atomic=True)``; outside a transaction
        the store commits it together with others queued at the same time
        (``SqliteStore._run_grouped``). ``undo``: what reverses its result, run when its
        caller was cancelled while it was being written."""
        return await self._run(operation, function, atomic=True)

    async def put_root_key(self, key_id: bytes, token_id: bytes, root_key: bytes) -> None:
        created_at = self._clock.now()

        def put(connection: sqlite3.Connection) -> None:
            inserted = connection.execute(
                _PUT_ROOT_KEY, (key_id, token_id, root_key, created_at)
            ).rowcount
            if inserted:
                return
            row = connection.execute(_GET_ROOT_KEY_ROW, (key_id,)).fetchone()
            if row is not None and (bytes(row[0]), bytes(row[1])) != (token_id, root_key):
                raise StoreError(f"a different root key is already stored under {key_id.hex()}")

        await self._run("put_root_key", put)

    async def get_root_key(self, key_id: bytes) -> bytes | None:
        def get(connection: sqlite3.Connection) -> bytes | None:
            row = connection.execute(_GET_ROOT_KEY_ROW, (key_id,)).fetchone()
            return None if row is None else bytes(row[1])

        return await self._run("get_root_key", get)

    async def revoke_token(self, token_id: bytes) -> bool:
        def revoke(connection: sqlite3.Connection) -> bool:
            return connection.execute(_REVOKE, (token_id,)).rowcount > 0

        return await self._run("revoke_token", revoke)

    async def add_invoice(self, record: InvoiceRecord) -> None:
        values = convert.invoice_values(record)

        def add(connection: sqlite3.Connection) -> None:
            connection.execute(_ADD_INVOICE, values)

        await self._run("add_invoice", add)

    async def apply_update(self, update: InvoiceUpdate) -> InvoiceRecord | None:
        """Settling an invoice that buys credit credits its account in the same write, one
        with a split the payees' shares, a payment link's the link's totals; the read and the
        write hold the write lock, so a racing report finds it SETTLED already."""
        now = self._clock.now()

        def apply(connection: sqlite3.Connection) -> InvoiceRecord | None:
            row = connection.execute(_GET_INVOICE, (update.payment_hash,)).fetchone()
            if row is None:
                return None
            record = convert.invoice_record(row)
            updated = record.updated(update)
            if updated != record:
                connection.execute(
                    _SET_STATE,
                    (
                        updated.state.value,
                        updated.settle_index,
                        updated.amount_paid_msat,
                        updated.settled_at,
                        updated.payment_hash,
                    ),
                )
            if credit := credit_bought(record, updated):
                connection.execute(_CREDIT, (record.token_id, record.service, credit, now))
            entries = settlement_entries(record, updated)
            _credit_split(connection, invoice_source(record.payment_hash), entries, now)
            payment = link_payment(record, updated, now)
            link = None if payment is None else _pay_link(connection, payment)
            _add_events(connection, invoice_events(record, updated, now, link), now)
            return updated

        # Grouped: the watcher's write for every invoice event (a challenge's too), nothing
        # to undo (it writes what the node said).
        return await self._run_grouped("apply_update", apply)

    async def get_invoice(self, payment_hash: PaymentHash) -> InvoiceRecord | None:
        def get(connection: sqlite3.Connection) -> InvoiceRecord | None:
            row = connection.execute(_GET_INVOICE, (payment_hash,)).fetchone()
            return None if row is None else convert.invoice_record(row)

        return await self._run("get_invoice", get)

    async def list_invoices(
        self,
        state: InvoiceState | None = None,
        limit: int | None = None,
        service: str | None = None,
    ) -> list[InvoiceRecord]:
        sql_limit = _sql_limit(limit)

        def list_(connection: sqlite3.Connection) -> list[InvoiceRecord]:
            named = {"service": service, "limit": sql_limit}
            if state is None:
                rows = connection.execute(_LIST_INVOICES, named)
            else:
                rows = connection.execute(_LIST_INVOICES_IN_STATE, {**named, "state": state.value})
            return [convert.invoice_record(row) for row in rows]

        return await self._run("list_invoices", list_)

    async def invoice_totals(self) -> list[InvoiceTotal]:
        def totals(connection: sqlite3.Connection) -> list[InvoiceTotal]:
            rows = connection.execute(_INVOICE_TOTALS)
            return [
                InvoiceTotal(service, InvoiceState(state), count, Msat(amount), Msat(received))
                for service, state, count, amount, received in rows
            ]

        return await self._run("invoice_totals", totals)

    async def list_overdue(self, expired_before: float, limit: int) -> list[InvoiceRecord]:
        def list_(connection: sqlite3.Connection) -> list[InvoiceRecord]:
            rows = connection.execute(_LIST_OVERDUE, (expired_before, max(0, limit)))
            return [convert.invoice_record(row) for row in rows]

        return await self._run("list_overdue", list_)

    async def revenue(self, since: float, bucket_seconds: int) -> list[RevenueBucket]:
        """By the invoices_state_expires_at index: no index holds ``settled_at``, and the
        SETTLED invoices that expired long before ``since`` are never read."""
        check_bucket(bucket_seconds)

        def sum_(connection: sqlite3.Connection) -> list[RevenueBucket]:
            oldest_expiry = since - SETTLED_AFTER_EXPIRY
            rows = connection.execute(
                _REVENUE, (bucket_seconds, bucket_seconds, oldest_expiry, since)
            )
            return [
                RevenueBucket(int(start), service, int(count), Msat(int(total)))
                for start, service, count, total in rows
            ]

        return await self._run("revenue", sum_)

    async def list_open_credit_invoices(self, token_id: bytes, limit: int) -> list[InvoiceRecord]:
        def list_(connection: sqlite3.Connection) -> list[InvoiceRecord]:
            rows = connection.execute(_LIST_OPEN_CREDIT_INVOICES, (token_id, max(0, limit)))
            return [convert.invoice_record(row) for row in rows]

        return await self._run("list_open_credit_invoices", list_)

    async def prune_unpaid(self, expired_before: float, limit: int) -> int:
        """Each pruned invoice takes its own root key; a token's remaining root keys, and its
        account if it never received anything, go with its last invoice."""

        def prune(connection: sqlite3.Connection) -> int:
            doomed = connection.execute(_PRUNABLE, (expired_before, max(0, limit))).fetchall()
            deleted = 0
            tokens: set[bytes] = set()
            for payment_hash, token_id in doomed:
                if not connection.execute(_PRUNE_INVOICE, (payment_hash,)).rowcount:
                    continue
                deleted += 1
                tokens.add(bytes(token_id))
                key_id = invoice_key_id(bytes(payment_hash), bytes(token_id))
                if key_id is not None:
                    connection.execute(_PRUNE_ROOT_KEY, (key_id,))
            connection.executemany(_PRUNE_ROOT_KEYS, ((token_id, token_id) for token_id in tokens))
            connection.executemany(_PRUNE_ACCOUNT, ((token_id, token_id) for token_id in tokens))
            return deleted

        return await self._run("prune_unpaid", prune, atomic=True)

    async def get_cursor(self) -> Cursor:
        def get(connection: sqlite3.Connection) -> Cursor:
            add_index, settle_index = connection.execute(_GET_CURSOR).fetchone()
            return Cursor(add_index=int(add_index), settle_index=int(settle_index))

        return await self._run("get_cursor", get)

    async def save_cursor(self, cursor: Cursor) -> None:
        def save(connection: sqlite3.Connection) -> None:
            connection.execute(_SAVE_CURSOR, (cursor.add_index, cursor.settle_index))

        await self._run_grouped("save_cursor", save)

    async def open_account(self, token_id: bytes, service: str) -> None:
        created_at = self._clock.now()

        def open_(connection: sqlite3.Connection) -> None:
            connection.execute(_OPEN_ACCOUNT, (token_id, service, created_at))

        await self._run("open_account", open_)

    async def get_account(self, token_id: bytes) -> Account | None:
        def get(connection: sqlite3.Connection) -> Account | None:
            row = connection.execute(_GET_ACCOUNT, (token_id,)).fetchone()
            return None if row is None else convert.account(row)

        return await self._run("get_account", get)

    async def reserve(self, token_id: bytes, amount_msat: Msat, expires_at: float) -> Reserved:
        check_amount("amount_msat", amount_msat)
        now = self._clock.now()

        def reserve(connection: sqlite3.Connection) -> Reserved:
            reservation = None
            if connection.execute(_RESERVE, (amount_msat, now, token_id, amount_msat)).rowcount:
                reservation_id = connection.execute(
                    _ADD_RESERVATION, (token_id, amount_msat, expires_at)
                ).lastrowid
                assert reservation_id is not None  # an INSERT into a rowid table
                reservation = Reservation(reservation_id, token_id, amount_msat, expires_at)
            return Reserved(reservation, _balance(connection, token_id))

        def release(reserved: Reserved) -> Callable[[sqlite3.Connection], object] | None:
            if reserved.reservation is None:
                return None
            return functools.partial(
                _settle, reservation_id=reserved.reservation.reservation_id, charged_msat=0
            )

        return await self._run_grouped("reserve", reserve, release)

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
        return await self._run_grouped("settle_reservation", settle)

    async def release_expired_reservations(self, now: float, limit: int) -> int:
        def release(connection: sqlite3.Connection) -> int:
            expired = connection.execute(_EXPIRED_RESERVATIONS, (now, max(0, limit))).fetchall()
            connection.executemany(_DELETE_RESERVATION, ((id_,) for id_, _, _ in expired))
            connection.executemany(_RELEASE, ((amount, token) for _, token, amount in expired))
            return len(expired)

        return await self._run("release_expired_reservations", release, atomic=True)

    async def list_charges(self, token_id: bytes, limit: int) -> list[Charge]:
        def list_(connection: sqlite3.Connection) -> list[Charge]:
            rows = connection.execute(_LIST_CHARGES, (token_id, max(0, limit)))
            return [convert.charge(row) for row in rows]

        return await self._run("list_charges", list_)

    async def prune_charges(self, charged_before: float, limit: int) -> int:
        def prune(connection: sqlite3.Connection) -> int:
            deleted = connection.execute(_PRUNE_CHARGES, (charged_before, max(0, limit)))
            return max(0, deleted.rowcount)

        return await self._run("prune_charges", prune)

    async def list_accounts(self, limit: int | None = None) -> list[Account]:
        sql_limit = _sql_limit(limit)

        def list_(connection: sqlite3.Connection) -> list[Account]:
            return [
                convert.account(row) for row in connection.execute(_LIST_ACCOUNTS, (sql_limit,))
            ]

        return await self._run("list_accounts", list_)

    async def credit_totals(self) -> CreditTotals:
        def totals(connection: sqlite3.Connection) -> CreditTotals:
            accounts, received, consumed, reserved, outstanding, withdrawn, pending = (
                connection.execute(_CREDIT_TOTALS).fetchone()
            )
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
        check_pending(withdrawal)
        debit = withdrawal.amount_msat + withdrawal.fee_reserve_msat
        values = convert.withdrawal_values(withdrawal)

        def begin(connection: sqlite3.Connection) -> Msat | None:
            if connection.execute(_GET_WITHDRAWAL, (withdrawal.payment_hash,)).fetchone():
                raise duplicate_withdrawal(withdrawal.payment_hash)
            if not connection.execute(_WITHDRAW, (debit, withdrawal.token_id, debit)).rowcount:
                return None
            connection.execute(_ADD_WITHDRAWAL, values)
            return _balance(connection, withdrawal.token_id)

        return await self._run("begin_withdrawal", begin, atomic=True)

    async def finish_withdrawal(
        self, payment_hash: PaymentHash, state: WithdrawalState, fee_msat: Msat, now: float
    ) -> Withdrawal | None:
        fee = resolution_fee(state, fee_msat)

        def finish(connection: sqlite3.Connection) -> Withdrawal | None:
            row = connection.execute(_GET_WITHDRAWAL, (payment_hash,)).fetchone()
            if row is None:
                return None
            pending = convert.withdrawal(row)
            if pending.state is not WithdrawalState.PENDING:
                return pending
            # The CHECK refuses a fee above the reserve before anything is written.
            connection.execute(_RESOLVE_WITHDRAWAL, (state.value, fee, now, payment_hash))
            resolved = replace(pending, state=state, fee_msat=fee, resolved_at=now)
            connection.execute(_REFUND_WITHDRAWAL, (refund(resolved), resolved.token_id))
            _add_events(connection, withdrawal_events(resolved, now), now)
            return resolved

        return await self._run("finish_withdrawal", finish, atomic=True)

    async def list_withdrawals(
        self,
        state: WithdrawalState | None = None,
        token_id: bytes | None = None,
        limit: int | None = None,
    ) -> list[Withdrawal]:
        sql_limit = _sql_limit(limit)

        def list_(connection: sqlite3.Connection) -> list[Withdrawal]:
            if state is None:
                rows = connection.execute(_LIST_WITHDRAWALS, (token_id, token_id, sql_limit))
            else:
                rows = connection.execute(
                    _LIST_WITHDRAWALS_IN_STATE, (state.value, token_id, token_id, sql_limit)
                )
            return [convert.withdrawal(row) for row in rows]

        return await self._run("list_withdrawals", list_)

    async def begin_payout(self, payout: Payout) -> bool:
        check_new_payout(payout)
        debit = payout.debit_msat
        values = convert.payout_values(payout)

        def begin(connection: sqlite3.Connection) -> bool:
            if connection.execute(_GET_PAYOUT, (payout.payment_hash,)).fetchone():
                raise duplicate_payout(payout.payment_hash)
            if not connection.execute(_DEBIT_PAYEE, (debit, payout.payee, debit)).rowcount:
                return False
            connection.execute(_ADD_PAYOUT, values)
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
        check_resolution(state, fee_msat)

        def finish(connection: sqlite3.Connection) -> Payout | None:
            row = connection.execute(_GET_PAYOUT, (payment_hash,)).fetchone()
            if row is None:
                return None
            pending = convert.payout(row)
            if pending.state is not PayoutState.PENDING:
                return pending
            done = resolved(pending, state, fee_msat, now, failure)
            connection.execute(
                _RESOLVE_PAYOUT, (done.state.value, done.fee_msat, now, done.failure, payment_hash)
            )
            change = payee_change(done)
            connection.execute(
                _RESOLVE_PAYEE,
                {
                    "pending": change.pending,
                    "paid": change.paid,
                    "fees": change.fees,
                    "merchant_fees": change.merchant_fees,
                    "last": change.last_payout_at,
                    "payee": done.payee,
                },
            )
            _add_events(connection, payout_events(done, now), now)
            return done

        return await self._run("finish_payout", finish, atomic=True)

    async def get_payee(self, payee: str) -> PayeeBalance | None:
        def get(connection: sqlite3.Connection) -> PayeeBalance | None:
            row = connection.execute(_GET_PAYEE, (payee,)).fetchone()
            return None if row is None else convert.payee_balance(row)

        return await self._run("get_payee", get)

    async def list_payees(self) -> list[PayeeBalance]:
        def list_(connection: sqlite3.Connection) -> list[PayeeBalance]:
            return [convert.payee_balance(row) for row in connection.execute(_LIST_PAYEES)]

        return await self._run("list_payees", list_)

    async def list_payouts(
        self,
        payee: str | None = None,
        state: PayoutState | None = None,
        limit: int | None = None,
    ) -> list[Payout]:
        value = None if state is None else state.value
        parameters = (payee, payee, value, value, _sql_limit(limit))

        def list_(connection: sqlite3.Connection) -> list[Payout]:
            return [convert.payout(row) for row in connection.execute(_LIST_PAYOUTS, parameters)]

        return await self._run("list_payouts", list_)

    async def split_totals(self) -> SplitTotals:
        def totals(connection: sqlite3.Connection) -> SplitTotals:
            return convert.split_totals(connection.execute(_SPLIT_TOTALS).fetchone())

        return await self._run("split_totals", totals)

    async def add_link(self, link: PaymentLink) -> None:
        check_new_link(link)
        values = convert.link_values(link)

        def add(connection: sqlite3.Connection) -> None:
            if not connection.execute(_ADD_LINK, values).rowcount:
                raise ValueError(f"a payment link {link.link_id!r} exists already")

        await self._run("add_link", add)

    async def get_link(self, link_id: str) -> PaymentLink | None:
        def get(connection: sqlite3.Connection) -> PaymentLink | None:
            return _get_link(connection, link_id)

        return await self._run("get_link", get)

    async def list_links(
        self, state: LinkState | None = None, now: float = 0.0, limit: int | None = None
    ) -> list[PaymentLink]:
        value = None if state is None else state.value
        parameters = (value, value, now, _sql_limit(limit))

        def list_(connection: sqlite3.Connection) -> list[PaymentLink]:
            rows = connection.execute(_LIST_LINKS, parameters)
            return [convert.payment_link(row) for row in rows]

        return await self._run("list_links", list_)

    async def cancel_link(self, link_id: str, now: float) -> PaymentLink | None:
        def cancel(connection: sqlite3.Connection) -> PaymentLink | None:
            connection.execute(_CANCEL_LINK, (now, link_id))
            return _get_link(connection, link_id)

        return await self._run("cancel_link", cancel, atomic=True)

    async def add_link_invoice(self, record: InvoiceRecord, replaces: PaymentHash | None) -> bool:
        check_link_invoice(record)
        values = convert.invoice_values(record)
        claim = {
            "hash": record.payment_hash,
            "link": record.link_id,
            "now": record.created_at,
            "replaces": replaces,
        }

        def add(connection: sqlite3.Connection) -> bool:
            if not connection.execute(_CLAIM_LINK_INVOICE, claim).rowcount:
                return False
            connection.execute(_ADD_INVOICE, values)
            return True

        return await self._run("add_link_invoice", add, atomic=True)

    async def add_held_request(self, held: HeldRequest) -> None:
        check_new(held)
        values = convert.held_values(held)

        def add(connection: sqlite3.Connection) -> None:
            connection.execute(_ADD_HELD, values)

        await self._run("add_held_request", add)

    async def get_held_request(self, payment_hash: PaymentHash) -> HeldRequest | None:
        def get(connection: sqlite3.Connection) -> HeldRequest | None:
            row = connection.execute(_GET_HELD, (payment_hash,)).fetchone()
            return None if row is None else convert.held_request(row)

        return await self._run("get_held_request", get)

    async def list_held_requests(
        self, states: frozenset[HeldState], limit: int
    ) -> list[HeldRequest]:
        placeholders, values = _states(states)
        statement = _LIST_HELD.format(states=placeholders)

        def list_(connection: sqlite3.Connection) -> list[HeldRequest]:
            rows = connection.execute(statement, (*values, max(0, limit)))
            return [convert.held_request(row) for row in rows]

        return await self._run("list_held_requests", list_)

    async def list_held_hashes(self, states: frozenset[HeldState], limit: int) -> list[PaymentHash]:
        placeholders, values = _states(states)
        statement = _LIST_HELD_HASHES.format(states=placeholders)

        def list_(connection: sqlite3.Connection) -> list[PaymentHash]:
            rows = connection.execute(statement, (*values, max(0, limit)))
            return [PaymentHash(bytes(row[0])) for row in rows]

        return await self._run("list_held_hashes", list_)

    async def count_held_requests(
        self, states: frozenset[HeldState], client: str | None = None
    ) -> int:
        placeholders, values = _states(states)
        if client is None:
            statement, parameters = _COUNT_HELD.format(states=placeholders), values
        else:
            statement = _COUNT_HELD_OF_CLIENT.format(states=placeholders)
            parameters = (client, *values)

        def count(connection: sqlite3.Connection) -> int:
            (counted,) = connection.execute(statement, parameters).fetchone()
            return int(counted)

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
        placeholders, values = _states(predecessors(state))
        changes = "" if keeps_request(state) else _DROP_REQUEST
        parameters: tuple[object, ...] = (state.value, now, failure, keep_until, keep_until)
        if state in ANSWERED:
            changes += _SET_RESPONSE
            parameters += convert.response_values(response)
        statement = _MOVE_HELD.format(changes=changes, states=placeholders)
        parameters += (payment_hash, *values)

        def move(connection: sqlite3.Connection) -> HeldRequest | None:
            if not connection.execute(statement, parameters).rowcount:
                return None  # unknown, or in a state that may not become this one
            after = convert.held_request(connection.execute(_GET_HELD, (payment_hash,)).fetchone())
            _add_events(connection, held_events(after), created_at)
            return after

        return await self._run("move_held_request", move, atomic=True)

    async def mark_held_delivered(
        self, payment_hash: PaymentHash, now: float, keep_until: float
    ) -> None:
        def deliver(connection: sqlite3.Connection) -> None:
            connection.execute(_DELIVER_HELD, (now, keep_until, keep_until, payment_hash))

        await self._run("mark_held_delivered", deliver)

    async def prune_held_requests(self, now: float, limit: int) -> int:
        placeholders, values = _states(HELD_FINAL)
        statement = _PRUNE_HELD.format(states=placeholders)

        def prune(connection: sqlite3.Connection) -> int:
            deleted = connection.execute(statement, (now, *values, max(0, limit)))
            return max(0, deleted.rowcount)

        return await self._run("prune_held_requests", prune)

    async def fan_out_webhook_events(
        self, subscriptions: Mapping[str, frozenset[str]], now: float, limit: int
    ) -> int:
        def fan_out(connection: sqlite3.Connection) -> int:
            cursors = {str(name): int(cursor) for name, cursor in connection.execute(_ENDPOINTS)}
            for name in cursors:
                if name not in subscriptions:
                    connection.execute(_FORGET_ENDPOINT, (name,))
                    connection.execute(_ORPHAN_DELIVERIES, (now, ENDPOINT_REMOVED, name))
            (newest,) = connection.execute(_NEWEST_EVENT).fetchone()
            added = 0
            for name, types in subscriptions.items():
                cursor = cursors.get(name)
                if cursor is None:
                    connection.execute(_PUT_ENDPOINT, (name, int(newest)))
                    continue
                batch = connection.execute(_EVENTS_AFTER, (cursor, max(0, limit))).fetchall()
                for event_id, kind in batch:
                    if kind in types:
                        added += connection.execute(
                            _ADD_DELIVERY, (event_id, name, kind, now)
                        ).rowcount
                if batch:
                    connection.execute(_PUT_ENDPOINT, (name, int(batch[-1][0])))
            return added

        return await self._run("fan_out_webhook_events", fan_out, atomic=True)

    async def next_webhook_delivery(
        self, endpoint: str
    ) -> tuple[WebhookDelivery, WebhookEvent] | None:
        def next_(connection: sqlite3.Connection) -> tuple[WebhookDelivery, WebhookEvent] | None:
            row = connection.execute(_NEXT_DELIVERY, (endpoint,)).fetchone()
            return (
                None if row is None else (convert.delivery(row[:9]), convert.webhook_event(row[9:]))
            )

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
        parameters = {
            "delivered": delivered,
            "max_attempts": max_attempts,
            "now": now,
            "most": max_backoff,
            "initial": initial_backoff,
            "status": status,
            "error": error,
            "event_id": event_id,
            "endpoint": endpoint,
        }

        def record(connection: sqlite3.Connection) -> WebhookDelivery | None:
            if connection.execute(_RECORD_ATTEMPT, parameters).rowcount == 0:
                return None
            return convert.delivery(
                connection.execute(_GET_DELIVERY, (event_id, endpoint)).fetchone()
            )

        return await self._run("record_webhook_attempt", record, atomic=True)

    async def get_webhook_event(self, event_id: int) -> WebhookEvent | None:
        def get(connection: sqlite3.Connection) -> WebhookEvent | None:
            row = connection.execute(_GET_EVENT, (event_id,)).fetchone()
            return None if row is None else convert.webhook_event(row)

        return await self._run("get_webhook_event", get)

    async def list_webhook_events(self, after: int = 0, limit: int = 100) -> list[WebhookEvent]:
        def list_(connection: sqlite3.Connection) -> list[WebhookEvent]:
            rows = connection.execute(_LIST_EVENTS, (after, max(0, limit)))
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
        parameters = (value, value, endpoint, endpoint, event_id, event_id, max(0, limit))

        def list_(connection: sqlite3.Connection) -> list[WebhookDelivery]:
            return [
                convert.delivery(row) for row in connection.execute(_LIST_DELIVERIES, parameters)
            ]

        return await self._run("list_webhook_deliveries", list_)

    async def redeliver_webhooks(
        self,
        now: float,
        *,
        event_id: int | None = None,
        endpoint: str | None = None,
        endpoints: Collection[str] | None = None,
    ) -> int:
        among, names = ("", ()) if endpoints is None else _among(endpoints)

        def redeliver(connection: sqlite3.Connection) -> int:
            if event_id is None:
                statement = _REDELIVER_DEAD.format(among=among)
                return connection.execute(statement, (now, endpoint, endpoint, *names)).rowcount
            row = connection.execute(_GET_EVENT, (event_id,)).fetchone()
            if row is None:
                return 0
            statement = _REDELIVER_EVENT.format(among=among)
            changed = connection.execute(
                statement, (now, event_id, endpoint, endpoint, *names)
            ).rowcount
            if changed or endpoint is None or (endpoints is not None and endpoint not in names):
                return int(changed)
            # That endpoint never had it: a delivery of its own.
            added = connection.execute(_ADD_DELIVERY, (event_id, endpoint, str(row[1]), now))
            return int(added.rowcount)

        return await self._run("redeliver_webhooks", redeliver, atomic=True)

    async def prune_webhook_events(
        self, before: float, limit: int, endpoints: Collection[str]
    ) -> int:
        _, names = _among(endpoints)
        placeholders = ", ".join("?" * len(names))  # none: IN () matches nothing
        statement = _PRUNABLE_EVENTS.format(names=placeholders)

        def prune(connection: sqlite3.Connection) -> int:
            parameters = (before, *names, *names, max(0, limit))
            doomed = connection.execute(statement, parameters).fetchall()
            connection.executemany(_PRUNE_DELIVERIES, doomed)
            connection.executemany(_PRUNE_EVENT, doomed)
            return len(doomed)

        return await self._run("prune_webhook_events", prune, atomic=True)


class _SqliteTransaction(_SqliteOperations):
    """The operations of one open transaction: run on ``here`` (the loop's connection, which
    began it), or queued straight to the worker, inside it."""

    def __init__(self, store: SqliteStore, clock: Clock, here: sqlite3.Connection | None) -> None:
        self._store: SqliteStore | None = store
        self._clock = clock
        self._here = here

    async def _run(
        self, operation: str, function: Callable[[sqlite3.Connection], T], *, atomic: bool = False
    ) -> T:
        if self._store is None:
            raise RuntimeError("the transaction has ended; start another one")
        if self._here is not None:
            return self._store._call_on(self._here, operation, function)
        return await self._store._queue(operation, function, atomic=False)

    def end(self) -> None:
        self._store = None


class SqliteStore(_SqliteOperations):
    """A ``Store`` in one SQLite file. Create it with ``await SqliteStore.open(path)``."""

    def __init__(
        self,
        path: Path,
        connection: sqlite3.Connection,
        executor: concurrent.futures.ThreadPoolExecutor,
        clock: Clock,
        loop_connection: sqlite3.Connection | None = None,
    ) -> None:
        """Internal: use ``open()``, which makes the connection in the executor's thread."""
        self._path = path
        self._connection = connection
        self._executor = executor
        self._clock = clock
        self._gate = TransactionGate()
        self._closed = False
        # Grouped operations waiting for the next group commit, and the task committing them.
        self._grouped: list[_Grouped] = []
        self._committer: asyncio.Task[None] | None = None
        # Groups and transactions run on the loop's own thread when the database is free
        # within a few milliseconds (``_on_loop``; no hand-over to the worker, no wait for
        # the GIL between statements), on the worker otherwise; None for a read-only store.
        self._loop_connection = loop_connection
        self._commits_since_checkpoint = 0
        self._checkpointer: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        clock: Clock | None = None,
        synchronous: Synchronous = "NORMAL",
        read_only: bool = False,
    ) -> SqliteStore:
        """Open (or create) the database at ``path`` and bring its schema up to date.

        A new file gets mode 0600, since it holds token root keys (SQLite gives its WAL and
        shared-memory files the same mode); an existing one readable by others is tightened
        to 0600 with a warning. The directory must exist. ``path`` must be the database
        itself: a directory, a symbolic link, a device or a file that is not an SQLite
        database is refused with ``ConfigError`` before anything is changed.

        ``read_only`` opens an existing database as it is, for reading: nothing is created,
        migrated or chmodded, and a missing file is a ``ConfigError``.

        ``synchronous`` is SQLite's durability setting. With WAL, ``NORMAL`` (the default)
        makes every returned write survive a crash or kill of this process: the commit is in
        the WAL file before the call returns, only not yet fsynced. A power cut or OS crash
        can roll back the commits made since the last checkpoint (the file stays consistent).
        For invoices and the cursor that is harmless: the watcher replays from the older
        cursor and every write is idempotent. For a root key it means a token minted just
        before the power cut stops verifying, and its holder must pay for a new one; an
        unpaid challenge is simply reissued. That narrow case does not justify an fsync per
        challenge by default; ``"FULL"`` buys it for operators who want it.
        """
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', got {synchronous!r}")
        file = Path(path)
        executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="gateway-sqlite"
        )
        future = executor.submit(connect, file, synchronous, read_only)
        try:
            connection = await asyncio.wrap_future(future)
        except BaseException:
            # Failed or cancelled: a connection the thread still finishes opening is closed
            # there, then the thread exits.
            executor.submit(_close_if_opened, future)
            executor.shutdown(wait=False)
            raise
        loop_connection = None if read_only else connect_nonblocking(file, synchronous)
        return cls(file, connection, executor, clock or SystemClock(), loop_connection)

    @property
    def path(self) -> Path:
        return self._path

    def _check_open(self, operation: str) -> None:
        if self._closed:
            raise StoreClosed(f"{operation}: the store at {self._path} is closed")

    async def _run(
        self, operation: str, function: Callable[[sqlite3.Connection], T], *, atomic: bool = False
    ) -> T:
        self._check_open(operation)
        async with self._gate.turn():  # one made before close() still runs, before it
            return await self._queue(operation, function, atomic=atomic)

    def _queue(
        self, operation: str, function: Callable[[sqlite3.Connection], T], *, atomic: bool
    ) -> asyncio.Future[T]:
        """Queue ``function`` on the worker thread now, bypassing the gate (for the store's
        own calls once through it, and for its open transaction); it runs in order."""
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._executor, self._call, operation, function, atomic)

    def _call_on(
        self,
        connection: sqlite3.Connection,
        operation: str,
        function: Callable[[sqlite3.Connection], T],
    ) -> T:
        """``function`` on ``connection`` (the loop's, inside its transaction)."""
        try:
            return function(connection)
        except sqlite3.Error as error:
            raise StoreError(f"{operation} failed on {self._path}: {describe(error)}") from error

    async def _on_loop(self, attempt: Callable[[sqlite3.Connection], T]) -> T | None:
        """``attempt`` (a write on the loop's connection that leaves nothing behind when it
        raises), tried again after short sleeps while another process holds the write lock.
        None for a read-only store, after another error, or when the lock is still held after
        the last try: the worker then runs it, waiting for the lock. A hand-over to the worker
        costs more than the wait."""
        connection = self._loop_connection
        if connection is None:
            return None
        delays = iter(LOOP_BUSY_DELAYS)
        while True:
            try:
                return attempt(connection)
            except sqlite3.Error as error:
                delay = next(delays, None)
                if delay is None or not _busy(error):
                    return None
            await asyncio.sleep(delay)

    def _call(self, operation: str, function: Callable[[sqlite3.Connection], T], atomic: bool) -> T:
        """Runs in the worker thread: the one place sqlite3 errors become ``StoreError``."""
        try:
            if not atomic:
                return function(self._connection)
            # IMMEDIATE: the write lock first, so a read-then-write never meets another
            # process's write in between (SQLITE_BUSY_SNAPSHOT).
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                result = function(self._connection)
                self._connection.execute("COMMIT")
            except BaseException:
                _rollback(self._connection)
                raise
            return result
        except sqlite3.Error as error:
            raise StoreError(f"{operation} failed on {self._path}: {describe(error)}") from error

    async def _run_grouped(
        self,
        operation: str,
        function: Callable[[sqlite3.Connection], T],
        undo: Callable[[T], Callable[[sqlite3.Connection], object] | None] | None = None,
    ) -> T:
        """Group commit: the operations queued while a group is being committed are committed
        together next, in one transaction (one that refuses its arguments leaves the others
        be; an SQLite error fails the group). Under load a commit then serves many requests
        instead of one; alone, an operation waits for no one.

        Queued before the first await: a caller cancelled while it waits has its operation
        written all the same, then reversed by ``undo`` (when given) in a later group; so is
        one cancelled in the loop turn its result came in, before it could take it."""
        self._check_open(operation)
        self._gate.refuse_reentry()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        grouped = _Grouped(operation, function, future, undo)
        self._group(grouped)
        try:
            return await future
        except asyncio.CancelledError:
            if (
                undo is not None
                and future.done()
                and not future.cancelled()
                and future.exception() is None
            ):
                self._undo(grouped, future.result())
            raise

    def _group(self, grouped: _Grouped) -> None:
        self._grouped.append(grouped)
        if self._committer is None:
            self._committer = asyncio.get_running_loop().create_task(self._commit_groups())

    async def _commit_groups(self) -> None:
        try:
            while self._grouped:
                group, self._grouped = self._grouped[:GROUP_LIMIT], self._grouped[GROUP_LIMIT:]
                try:
                    # A group is one transaction: none other begins while its tries wait.
                    async with self._gate.transaction():
                        outcomes = await self._on_loop(
                            functools.partial(self._run_group_here, group)
                        )
                        if outcomes is None:
                            outcomes = await self._queue(
                                "group commit", functools.partial(_run_group, group), atomic=False
                            )
                # The BEGIN or COMMIT failed (none of them happened), or this task was cancelled
                # (the worker still runs what it was given).
                except BaseException as error:
                    for grouped in group:
                        _settle_future(grouped.future, None, error)
                    if not isinstance(error, Exception):
                        raise
                    continue
                for grouped, (result, failure) in zip(group, outcomes, strict=True):
                    if not grouped.future.done():
                        _settle_future(grouped.future, result, failure)
                    elif failure is None and grouped.undo is not None:
                        self._undo(grouped, result)
        finally:
            self._committer = None

    def _run_group_here(
        self, group: list[_Grouped], connection: sqlite3.Connection
    ) -> list[tuple[Any, Exception | None]]:
        """``group`` committed on the loop's connection (rolled back when it raises)."""
        outcomes = _run_group(group, connection)
        self._committed_on_loop()
        return outcomes

    def _committed_on_loop(self) -> None:
        """Count a commit on the loop's connection, which never checkpoints: every
        ``CHECKPOINT_EVERY`` of them the worker checkpoints, off the loop. Without it the WAL
        grows by every challenge's pages (about 43 KB each, without bound under unpaid
        traffic); in a loop of challenge writes alone, appending to the ever longer file
        took 2.2 times the CPU per commit."""
        self._commits_since_checkpoint += 1
        if self._commits_since_checkpoint >= CHECKPOINT_EVERY and self._checkpointer is None:
            self._commits_since_checkpoint = 0
            self._checkpointer = asyncio.get_running_loop().create_task(self._checkpoint())

    async def _checkpoint(self) -> None:
        """Checkpoint the whole WAL, so that the next write starts it over. Our own writes
        wait meanwhile (the gate), another process's for the lock (RESTART): under steady
        writes a checkpoint they outpace could never catch up."""
        try:
            async with self._gate.transaction():
                await self._queue("checkpoint", _restart_wal, atomic=False)
        except StoreError as error:
            log.warning("WAL checkpoint failed: %s", error)
        finally:
            self._checkpointer = None

    def _undo(self, grouped: _Grouped, result: object) -> None:
        """Reverse what a cancelled caller's operation did, in the next group."""
        assert grouped.undo is not None
        reverse = grouped.undo(result)
        if reverse is None:
            return
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(_log_failed_undo)
        self._group(_Grouped(f"undo {grouped.operation}", reverse, future, None))

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[StoreOperations]:
        self._check_open("transaction")
        async with self._gate.transaction():
            here = await self._on_loop(_begun)
            transaction = _SqliteTransaction(self, self._clock, here)
            if here is not None:
                try:
                    yield transaction
                    transaction.end()
                    self._call_on(here, "commit", _commit)
                    self._committed_on_loop()
                except BaseException:
                    transaction.end()
                    _rollback(here)
                    raise
                return
            try:
                await self._queue("begin", _begin, atomic=False)
                yield transaction
                transaction.end()
                await self._queue("commit", _commit, atomic=False)
            except BaseException:
                # Queued after whatever of this transaction still runs (a BEGIN or COMMIT the
                # worker had started when the wait was cancelled); shielded, so a second
                # cancellation cannot unqueue it and leave the connection inside a transaction.
                transaction.end()
                await asyncio.shield(self._queue("rollback", _rollback, atomic=False))
                raise

    async def close(self) -> None:
        """Let an open transaction end, finish the queued operations, close the connection and
        stop the thread.

        Later calls raise ``StoreClosed``; closing twice is harmless.
        """
        if self._closed:
            return
        self._closed = True
        try:
            async with self._gate.turn():
                pass  # an open transaction ends first; nothing new can begin (closed)
            if self._committer is not None:
                await asyncio.shield(self._committer)  # the grouped operations already queued
            if self._checkpointer is not None:
                await asyncio.shield(self._checkpointer)  # it still queues on the worker
        finally:
            if self._loop_connection is not None:
                self._loop_connection.close()
            future = self._executor.submit(self._call, "close", _close, False)
            # The worker runs what is queued, the close last, then exits.
            self._executor.shutdown(wait=False)
            # Shielded: a cancelled close() must not cancel the queued close of the connection.
            await asyncio.shield(asyncio.wrap_future(future))
            self._executor.shutdown(wait=True)  # joins the thread, which is exiting already


GROUP_LIMIT = 256  # operations committed in one group at most
# Seconds between tries of the loop's connection while another process writes (a write holds
# the lock for well under a millisecond); 15 ms in all, then the worker waits.
LOOP_BUSY_DELAYS = (0.001, 0.001, 0.001, 0.002, 0.002, 0.004, 0.004)
CHECKPOINT_EVERY = 256  # commits on the loop's connection between WAL checkpoints
CHECKPOINT_WAIT = 0.1  # seconds a checkpoint waits for another process's lock


def _restart_wal(connection: sqlite3.Connection) -> None:
    # Waits for other processes' writes and reads only briefly, as ours wait for it: with
    # a long reader (a backup) it does what it can, and the next one finishes.
    connection.execute(f"PRAGMA busy_timeout = {int(CHECKPOINT_WAIT * 1000)}")
    try:
        connection.execute("PRAGMA wal_checkpoint(RESTART)")
    finally:
        connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")


@dataclass(frozen=True, slots=True)
class _Grouped:
    operation: str
    function: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    undo: Callable[[Any], Callable[[sqlite3.Connection], object] | None] | None


def _log_failed_undo(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("could not reverse the write of a cancelled caller: %s", future.exception())


def _run_group(
    group: list[_Grouped], connection: sqlite3.Connection
) -> list[tuple[Any, Exception | None]]:
    """``group`` in one transaction (on the worker, or the loop's connection); returns each
    one's result or error. An operation that raises another error than ``sqlite3.Error``
    is rolled back to before it (a savepoint), the others stand; an ``sqlite3.Error`` rolls
    the whole group back (the caller fails them all)."""
    outcomes: list[tuple[Any, Exception | None]] = []
    connection.execute("BEGIN IMMEDIATE")
    try:
        for grouped in group:
            # A savepoint each: one that fails after some of its writes leaves none of them.
            connection.execute("SAVEPOINT grouped")
            try:
                outcomes.append((grouped.function(connection), None))
            except sqlite3.Error:
                raise
            except Exception as error:
                connection.execute("ROLLBACK TO grouped")
                outcomes.append((None, error))
            connection.execute("RELEASE grouped")
        connection.execute("COMMIT")
    except BaseException:
        _rollback(connection)
        raise
    return outcomes


def _settle_future(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # its caller was cancelled; what it asked for ran (or not) all the same
        return
    if isinstance(error, asyncio.CancelledError):
        future.cancel()
    elif error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


def _begin(connection: sqlite3.Connection) -> None:
    connection.execute("BEGIN IMMEDIATE")


def _begun(connection: sqlite3.Connection) -> sqlite3.Connection:
    _begin(connection)
    return connection


def _busy(error: sqlite3.Error) -> bool:
    """Whether ``error`` says another connection holds a lock (primary or extended code)."""
    return error.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _commit(connection: sqlite3.Connection) -> None:
    try:
        connection.execute("COMMIT")
    except BaseException:
        _rollback(connection)  # a failed COMMIT (say SQLITE_BUSY) leaves it open
        raise


def _rollback(connection: sqlite3.Connection) -> None:
    """Roll back the open transaction, if any (a BEGIN that failed opened none)."""
    if connection.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            connection.execute("ROLLBACK")


def _close(connection: sqlite3.Connection) -> None:
    connection.close()


def _close_if_opened(future: concurrent.futures.Future[sqlite3.Connection]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()


def _sql_limit(limit: int | None) -> int:
    convert.check_limit(limit)
    return -1 if limit is None else limit


def _settle(
    connection: sqlite3.Connection,
    *,
    reservation_id: int,
    charged_msat: int,
    method: str = "",
    path: str = "",
    at: float = 0.0,
    split: Split = (),
) -> Msat | None:
    """``settle_reservation``'s statements (``charged_msat`` 0: a release)."""
    row = connection.execute(_GET_RESERVATION, (reservation_id,)).fetchone()
    if row is None:
        return None
    token_id, reserved = bytes(row[0]), int(row[1])
    if charged_msat > reserved:
        raise ValueError(f"charged_msat {charged_msat} is above the {reserved} reserved")
    connection.execute(_DELETE_RESERVATION, (reservation_id,))
    connection.execute(_SETTLE, (reserved, charged_msat, token_id))
    if charged_msat:
        connection.execute(_ADD_CHARGE, (token_id, at, method, path, charged_msat))
    entries = charge_entries(split, charged_msat)
    _credit_split(connection, charge_source(reservation_id), entries, at)
    return _balance(connection, token_id)


def _credit_split(connection: sqlite3.Connection, source: str, entries: Entries, at: float) -> None:
    """Write the ledger entries of one payment and add the payees' shares to what they
    earned, in the caller's transaction."""
    connection.executemany(
        _ADD_SPLIT_ENTRY, ((source, payee, share, at) for payee, share in entries)
    )
    connection.executemany(_EARN, earned(entries))


def _get_link(connection: sqlite3.Connection, link_id: str) -> PaymentLink | None:
    row = connection.execute(_GET_LINK, (link_id,)).fetchone()
    return None if row is None else convert.payment_link(row)


def _pay_link(connection: sqlite3.Connection, payment: LinkPayment) -> PaymentLink | None:
    """Add ``payment`` to its link, in the caller's transaction; the link after it, None when
    it is unknown."""
    at = payment.at
    connection.execute(_PAY_LINK, (payment.amount_msat, at, at, payment.link_id))
    return _get_link(connection, payment.link_id)


def _balance(connection: sqlite3.Connection, token_id: bytes) -> Msat:
    """The account's balance; 0 when there is none."""
    row = connection.execute(_GET_BALANCE, (token_id,)).fetchone()
    return Msat(0 if row is None else int(row[0]))


def _states(states: frozenset[HeldState]) -> tuple[str, tuple[str, ...]]:
    """A list of states as ``?`` placeholders (none: ``IN ()`` matches nothing) and their
    values, in a fixed order so the statement's text is always the same."""
    values = tuple(sorted(state.value for state in states))
    return ", ".join("?" * len(values)), values


def _add_events(connection: sqlite3.Connection, events: Iterable[NewEvent], now: float) -> None:
    """Insert ``events`` into the outbox, in the caller's transaction."""
    connection.executemany(
        _ADD_EVENT, ((event.type, event.resource, event.payload, now) for event in events)
    )


def _among(endpoints: Collection[str]) -> tuple[str, tuple[str, ...]]:
    """``AND endpoint IN (?, ...)`` for these endpoint names (none: it matches nothing), and
    the names, sorted so that the statement's text is the same for the same names."""
    names = tuple(sorted(set(endpoints)))
    return f"AND endpoint IN ({', '.join('?' * len(names))})", names
