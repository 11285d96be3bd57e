"""The core: decide what to do with a request, and issue challenges.

``L402Service.authorize()`` returns one of three decisions:

- ``Allow``: free route, or a valid paid token (the handler gets the token's facts);
- ``PaymentChallenge``: 402 with a fresh invoice and macaroon (no credential, or one that is
  valid but insufficient: expired, or for another service or capability);
- ``Deny``: 401 for an invalid credential, 429 when a client asks for too many challenges,
  503 when the Lightning node or the store cannot serve the challenge, 400 for a request
  the rules cannot price unambiguously (``Pricing.resolve``: a backend may read such a path
  or method override as a priced route the literal request did not match), 500 when a
  price function fails.

Browsers send their credential in a cookie instead (``RequestInfo.cookies``); an
``Authorization`` credential wins over it. A cookie that does not verify is ignored, not
refused: a browser cannot drop a stale cookie by itself, so it gets a fresh challenge.
``redeem()`` serves the paywall page: given the macaroon of a challenge it answers whether
the invoice is paid and, once it is, the credential for the browser to keep.

Credit routes (``Rule.credit``): the challenge's invoice buys credit for the account of the
token (its id); each allowed request holds its price from that balance (``Allow.charge``),
which the adapter ends with ``finish_charge()`` once the response status is known; a token
whose balance falls short gets a top-up challenge for the same account (``balance_msat``).
``allowed_again()`` never answers for a credit route. ``token_info()`` reads an account and
``withdraw()`` pays a balance out (``account_of()`` checks the credential for both).

Pay-on-success routes (``Rule.settle_on_success``): the challenge stores the request with a
hold invoice (``RequestInfo.stored_request`` loads it; without a loader or ``HoldTerms``:
501), within caps of pending ones (503 over all clients, 429 per client); the
``HoldExecutor`` runs it once the payment is held and settles the invoice only if the
backend succeeded, else cancels it (the payer is refunded). The paid token then gets the
stored response (``Allow.replay``), never a second run: 409 for another request, 410 once
the response is no longer kept; a refunded token's macaroon gets a challenge saying so.

Modules: ``decisions`` (the values asked and answered), ``core`` (``L402Service``),
``challenge`` (issuing one), ``verify`` (checking a credential), ``credit`` (spending and
reading a balance), ``withdraw`` (paying a balance out), ``caches``, ``rate_limiter``,
``redeem``, ``on_success`` (the executor of held requests), ``tips`` (tip jars and payment
links: LNURL-pay and Lightning Address, with ``gateway.lnurl``). Depends only on
``gateway.l402``, ``gateway.pricing``, ``gateway.ports`` (and ``gateway.errors``,
``gateway.text``); HTTP itself (headers, cookies) is the adapters' business, in
``gateway.web``.
"""

from __future__ import annotations

from gateway.service.caches import ALLOWED_CACHE_SIZE, AllowedCache, RootKeyCache
from gateway.service.challenge import MEMO_LIMIT
from gateway.service.core import MAX_COOKIE_CREDENTIALS, L402Service
from gateway.service.credit import (
    CREDIT_AMOUNT_HEADER,
    RECENT_CHARGES,
    TokenInfo,
    WithdrawalTerms,
)
from gateway.service.decisions import (
    Allow,
    CreditCharge,
    Decision,
    Deny,
    PaidToken,
    PaymentChallenge,
    Refusal,
    RequestInfo,
)
from gateway.service.on_success import BackendRunner, HoldExecutor, HoldTerms, RunFailed
from gateway.service.rate_limiter import RateLimiter, client_key
from gateway.service.redeem import (
    MAX_REDEEM_MACAROON_CHARS,
    REDEEM_LOOKUP_INTERVAL,
    REDEEM_LOOKUPS_PER_SECOND,
    RedeemResult,
    RedeemState,
)
from gateway.service.tips import LinkStatus, TipJar, Tips
from gateway.service.withdraw import WithdrawalOutcome, Withdrawer

__all__ = [
    "ALLOWED_CACHE_SIZE",
    "CREDIT_AMOUNT_HEADER",
    "MAX_COOKIE_CREDENTIALS",
    "MAX_REDEEM_MACAROON_CHARS",
    "MEMO_LIMIT",
    "RECENT_CHARGES",
    "REDEEM_LOOKUPS_PER_SECOND",
    "REDEEM_LOOKUP_INTERVAL",
    "Allow",
    "AllowedCache",
    "BackendRunner",
    "CreditCharge",
    "Decision",
    "Deny",
    "HoldExecutor",
    "HoldTerms",
    "L402Service",
    "LinkStatus",
    "PaidToken",
    "PaymentChallenge",
    "RateLimiter",
    "RedeemResult",
    "RedeemState",
    "Refusal",
    "RequestInfo",
    "RootKeyCache",
    "RunFailed",
    "TipJar",
    "Tips",
    "TokenInfo",
    "WithdrawalOutcome",
    "WithdrawalTerms",
    "Withdrawer",
    "client_key",
]
