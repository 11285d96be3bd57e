"""Method overrides: how a request can ask a backend to route it as another method.

Rails, Laravel, Symfony and Express's method-override read ``X-HTTP-Method-Override`` (or
``X-HTTP-Method``, ``X-Method-Override``) or a ``_method`` query parameter and route a POST
as, say, a GET. The core prices such a request by every method it could be read as.

PHP (Laravel, Symfony) names a query parameter's variable after its key with leading spaces
dropped and a space, ``.`` or ``[`` made ``_``: ``?.method=GET`` is its ``_method``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import parse_qsl

OVERRIDE_HEADERS = ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override")
_QUERY_KEY = re.compile(r"method", re.IGNORECASE)  # a cheap test before parsing the query
_PHP_NAME = str.maketrans(" .[", "___")
_METHOD = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def method_overrides(header_values: Iterable[str], query: str) -> tuple[str, ...]:
    """The methods named by override header values and ``_method`` query parameters."""
    values = [part for value in header_values for part in value.split(",")]
    if _QUERY_KEY.search(query):
        values += [
            value
            for key, value in parse_qsl(query, keep_blank_values=True)
            if key.lstrip(" ").translate(_PHP_NAME).lower() == "_method"
        ]
    return tuple(dict.fromkeys(m.strip().upper() for m in values if _METHOD.fullmatch(m.strip())))
