"""Method overrides: how a request can ask a backend to route it as another method.

Rails, Laravel, Symfony and Express's method-override read ``X-HTTP-Method-Override`` (or
``X-HTTP-Method``, ``X-Method-Override``) or a ``_method`` query parameter and route a POST
as, say, a GET. The core prices such a request by every method it could be read as.

PHP (Laravel, Symfony) names a query parameter's variable after its key cut at a NUL, with
leading spaces dropped and a space, ``.`` or ``[`` made ``_``: ``?.method=GET`` and
``?_method%00x=GET`` are its ``_method``.

The same frameworks read ``_method`` from a POST's body too: Rack from a form (also one
without a ``Content-Type``), PHP from a form or multipart form, Laravel also from JSON,
Express's method-override from whatever its body parsers read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, unquote_to_bytes

from gateway.pricing import OVERRIDE_METHODS

OVERRIDE_HEADERS = ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override")
# A cheap test before parsing the query: the name spelled out, or maybe percent-encoded.
_QUERY_KEY = re.compile(r"method|%", re.IGNORECASE)
_PHP_NAME = str.maketrans(" .[", "___")
_METHOD = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FORM = ("", "application/x-www-form-urlencoded")
_MULTIPART = "multipart/form-data"


def method_overrides(header_values: Iterable[str], query: str) -> tuple[str, ...]:
    """The methods named by override header values and ``_method`` query parameters."""
    values = [part for value in header_values for part in value.split(",")]
    if _QUERY_KEY.search(query):
        values += [
            value
            for key, value in parse_qsl(query, keep_blank_values=True)
            if key.partition("\0")[0].lstrip(" ").translate(_PHP_NAME).lower() == "_method"
        ]
    return tuple(dict.fromkeys(m.strip().upper() for m in values if _METHOD.fullmatch(m.strip())))


def _media_type(content_type: str) -> str:
    return content_type.partition(";")[0].strip().lower()


def _is_json(media_type: str) -> bool:
    return media_type == "application/json" or media_type.endswith("+json")


def body_may_name_method(content_type: str) -> bool:
    """Whether a framework reads parameters, ``_method`` among them, from a POST body of this
    ``Content-Type`` (empty: none was sent)."""
    media_type = _media_type(content_type)
    return media_type in _FORM or media_type == _MULTIPART or _is_json(media_type)


def body_method_overrides(content_type: str, body: bytes) -> tuple[str, ...]:
    """The methods a POST body of this ``Content-Type`` names as ``_method``.

    A form is read as a query string; JSON as an object's ``_method``. A multipart form, or
    JSON that does not parse here (a backend's parser may be laxer), names any method when
    "method" appears in it at all, percent-encoded or not: its field names have too many
    spellings across parsers to read one by one.
    """
    media_type = _media_type(content_type)
    if media_type in _FORM:
        return method_overrides((), body.decode("latin-1"))
    if _is_json(media_type):
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            pass
        else:
            named = document.get("_method") if isinstance(document, dict) else None
            return method_overrides((named,) if isinstance(named, str) else (), "")
    elif media_type != _MULTIPART:
        return ()
    return OVERRIDE_METHODS if b"method" in unquote_to_bytes(body).lower() else ()
