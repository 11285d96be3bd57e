"""Method overrides: how a request can ask a backend to route it as another method.

Rails, Laravel, Symfony and Express's method-override read ``X-HTTP-Method-Override`` (or
``X-HTTP-Method``, ``X-Method-Override``) or a ``_method`` query parameter and route a POST
as, say, a GET. The core prices such a request by every method it could be read as.

A value counts as the method it names once upper-cased by Unicode's rules and NFKC folded,
as Ruby and JavaScript may read it (``l\u0131nk``, with a dotless i, names ``LINK``).

PHP (Laravel, Symfony) names a query parameter's variable after its key cut at a NUL, with
leading spaces dropped and a space, ``.`` or ``[`` made ``_``: ``?.method=GET`` and
``?_method%00x=GET`` are its ``_method``.

qs (Express's parser) reads ``[_method]=GET`` as ``_method`` (an empty parent key takes its
first bracket); some parsers (Perl's URI, older Rack and Go) split parameters on ``;`` as well
as ``&``: both splits are read.

The same frameworks read ``_method`` from a POST's body too: Rack from a form (also one
without a ``Content-Type``), PHP from a form or multipart form, Laravel also from JSON,
Express's method-override from whatever its body parsers read.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable
from urllib.parse import parse_qsl, unquote_to_bytes

from gateway.pricing import OVERRIDE_METHODS

OVERRIDE_HEADERS = ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override")
# A cheap test before parsing the query: the name spelled out, or maybe percent-encoded.
_QUERY_KEY = re.compile(r"method|%", re.IGNORECASE)
_PHP_NAME = str.maketrans(" .[", "___")
_METHOD = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def method_overrides(header_values: Iterable[str], query: str) -> tuple[str, ...]:
    """The methods named by override header values and ``_method`` query parameters."""
    values = [part for value in header_values for part in value.split(",")]
    if _QUERY_KEY.search(query):
        pairs = parse_qsl(query, keep_blank_values=True)
        if ";" in query:
            pairs += parse_qsl(query.replace(";", "&"), keep_blank_values=True)
        values += [value for key, value in pairs if _names_method(key)]
    return tuple(dict.fromkeys(name for m in values if (name := _method_named(m)) is not None))


def _method_named(value: str) -> str | None:
    """The method ``value`` names, as a backend may read it: Ruby and JavaScript upper-case
    by Unicode's rules (a dotless i is ``I``), and compatibility forms fold (the Kelvin sign
    is ``K``)."""
    name = unicodedata.normalize("NFKC", value.strip()).upper()
    return name if _METHOD.fullmatch(name) else None


def _names_method(key: str) -> bool:
    """Whether a parameter named ``key`` is ``_method`` to some framework: PHP's names (see
    the module), an array of it (``_method[]``, ``_method[0]``: qs, which Express uses,
    and method-override takes the first value), or qs's bracket after an empty parent
    (``[_method]``)."""
    name = key.partition("\0")[0].lstrip(" ")
    parent, _, children = name.partition("[")
    return "_method" in (
        name.translate(_PHP_NAME).lower(),
        parent.translate(_PHP_NAME).lower(),
        children.partition("]")[0].lower() if not parent else "",
    )


def _readings(content_type: str) -> tuple[bool, bool, bool]:
    """Whether a body of this ``Content-Type`` (all its values, joined) may be read as a form,
    as JSON, as a multipart form. Generous: Laravel takes any type holding "/json" or
    "+json" for JSON, and Rack a POST without a media type for a form. A type with a letter
    outside ASCII may be any of them: parsers fold such letters differently (Go's reads
    "multİpart", with a dotted capital I, as "multipart"; Python's does not)."""
    if not content_type.isascii():
        return True, True, True
    lowered = content_type.lower()
    form = "x-www-form-urlencoded" in lowered or not content_type.partition(";")[0].strip()
    return form, "json" in lowered, "multipart" in lowered


def body_may_name_method(content_type: str) -> bool:
    """Whether a framework may read parameters, ``_method`` among them, from a POST body of
    this ``Content-Type`` (empty: none was sent)."""
    return any(_readings(content_type))


def body_method_overrides(
    content_type: str, body: bytes, every: tuple[str, ...] = OVERRIDE_METHODS
) -> tuple[str, ...]:
    """The methods a POST body of this ``Content-Type`` names as ``_method``, in every way a
    framework may read it.

    A form is read as a query string; JSON as an object's ``_method`` (a string, or a list
    of them; every one of a repeated key, as parsers differ on which they keep). JSON that
    does not parse here names ``every`` method: a backend's parser may be laxer (invalid
    UTF-8 replaced, deeper nesting), and its keys may be spelled with escapes. A multipart
    form names ``every`` method when "method" appears in it at all (percent-encoded, or
    split by backslash escapes, or not), or when a part's header has an RFC 2231 parameter
    (``name*``, ``name*0``: split or encoded names) or an encoded word (``=?``): its field
    names have too many spellings across parsers to read one by one.
    """
    form, json_, multipart = _readings(content_type)
    named: list[str] = []
    if form:
        # As bytes (PHP) and as UTF-8 text (Rack, Express).
        for text in dict.fromkeys((body.decode("latin-1"), body.decode("utf-8", "replace"))):
            named += method_overrides((), text)
    if json_:
        try:
            document = json.loads(body, object_pairs_hook=_Members)
        except (ValueError, RecursionError):
            return tuple(dict.fromkeys(named + list(every)))
        if isinstance(document, _Members):
            for value in document.values_of("_method"):
                values = value if isinstance(value, list) else [value]
                named += method_overrides([v for v in values if isinstance(v, str)], "")
    if multipart and _multipart_may_name_method(body):
        named += every
    return tuple(dict.fromkeys(named))


class _Members(list[tuple[str, object]]):
    """A JSON object's members in order, repeated keys kept."""

    def values_of(self, key: str) -> list[object]:
        return [value for name, value in self if name == key]


# A part header of a multipart body (with its folded lines), and what in one makes a name
# read differently by different parsers.
_PART_HEADER = re.compile(rb"content-disposition[ \t]*:[^\r\n]*(?:\r?\n[ \t][^\r\n]*)*", re.I)
_LOOSE_PARAMETER = re.compile(rb"(?<![a-z])name[ \t]*\*|=\?", re.I)


def _multipart_may_name_method(body: bytes) -> bool:
    if b"method" in unquote_to_bytes(body.replace(b"\\", b"")).lower():
        return True
    return any(_LOOSE_PARAMETER.search(header) for header in _PART_HEADER.findall(body))
