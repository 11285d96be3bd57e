"""The paying side of L402: pay a ``402 Payment Required`` once, reuse the token, spend safely.

::

    from gateway.client import Budget, L402Client, TokenCache
    from gateway.client.aiohttp import L402PayingMiddleware  # aiohttp >= 3.12
    from gateway.client.httpx import L402Auth              # pip install 'l402-gateway[httpx]'
    from gateway.lnd.client import LndClient

    async with LndClient(settings) as lnd:                 # any gateway.ports.Payer
        client = L402Client(
            lnd,
            network="regtest",                             # invoices for other networks: refused
            budget=Budget(max_price_msat=50_000, max_fee_msat=5_000, max_total_msat=1_000_000),
            cache=TokenCache("~/.cache/l402-gateway/tokens.json"),  # or TokenCache(): memory
        )
        async with aiohttp.ClientSession(middlewares=[L402PayingMiddleware(client)]) as session:
            ...
        async with httpx.AsyncClient(auth=L402Auth(client)) as http:
            ...
        client.spending_log                                # SpendEntry per payment
        client.last_balance                                # credit routes: Balance left

On a 402 with an L402 (or LSAT) challenge the client parses it, decodes the BOLT11 invoice
and checks it (:mod:`~gateway.client.offer`), checks the budget
(:mod:`~gateway.client.budget`), records a pending payment durably, pays through the
payer, stores the token (:mod:`~gateway.client.cache`; :mod:`~gateway.client.tokens` says
which later requests reuse it) and retries the request once. Every refusal before paying
raises an error of :mod:`~gateway.client.errors` and pays nothing.

On a credit route (the gateway bills requests from a prepaid balance) the payment buys credit,
within the budget; the balance each response reports is kept (:class:`Balance`), and when it
runs out the top-up the gateway offers is paid like any 402, its token replacing the old one.

On a pay-on-success route (``L402-Settle: on-success``) the gateway runs the request while the
payment is held and takes it only if the request succeeded: the offer says so
(:attr:`Offer.settles_on_success`), the payment may stay in flight for the backend's time, and
a payment the gateway cancelled raises :class:`PaymentRefunded` (``refunded: <why>``; the
aiohttp and httpx integrations ask the gateway, :mod:`~gateway.client.on_success`).

This package imports only :mod:`gateway.l402`, :mod:`gateway.ports`, :mod:`gateway.errors`
and :mod:`gateway.text` (plus ``coincurve``, which :mod:`~gateway.client.bolt11` verifies
invoice signatures with); the aiohttp and httpx integrations are separate modules, so neither
library is needed unless its integration is imported.
"""

from __future__ import annotations

from gateway.client.budget import DEFAULT_MAX_SETTLE_SECONDS, DEFAULT_MIN_FEE_MSAT, Budget
from gateway.client.cache import TokenCache
from gateway.client.core import (
    Balance,
    Confirm,
    Exchange,
    L402Client,
    Retry,
    SpendEntry,
    SystemClock,
)
from gateway.client.errors import (
    BudgetExceeded,
    ChallengeError,
    ClientError,
    InvoiceRejected,
    PaymentDeclined,
    PaymentInFlight,
    PaymentRefunded,
    PaymentUnverified,
    TokenCacheError,
)
from gateway.client.offer import (
    NETWORKS,
    DecodedInvoice,
    Offer,
    balance_from_headers,
    decode_invoice,
    has_l402_challenge,
    read_offer,
)
from gateway.client.tokens import CachedToken, PendingPayment, body_digest

__all__ = [
    "DEFAULT_MAX_SETTLE_SECONDS",
    "DEFAULT_MIN_FEE_MSAT",
    "NETWORKS",
    "Balance",
    "Budget",
    "BudgetExceeded",
    "CachedToken",
    "ChallengeError",
    "ClientError",
    "Confirm",
    "DecodedInvoice",
    "Exchange",
    "InvoiceRejected",
    "L402Client",
    "Offer",
    "PaymentDeclined",
    "PaymentInFlight",
    "PaymentRefunded",
    "PaymentUnverified",
    "PendingPayment",
    "Retry",
    "SpendEntry",
    "SystemClock",
    "TokenCache",
    "TokenCacheError",
    "balance_from_headers",
    "body_digest",
    "decode_invoice",
    "has_l402_challenge",
    "read_offer",
]
