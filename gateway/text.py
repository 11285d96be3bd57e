"""Reading numbers from text a peer chose, and showing such text where a person reads it.

A terminal obeys escape sequences and a wallet renders what an invoice memo says, so text
from a request must not reach either raw: ESC can rewrite the operator's screen, CR/LF and
backspace can forge lines, U+202E can reverse what follows. Pure: no I/O.
"""

from __future__ import annotations

__all__ = ["printable", "whole_number"]


def whole_number(text: str, max_digits: int = 19) -> int | None:
    """``text`` as a whole number if it is 1 to ``max_digits`` ASCII digits (19: any int64),
    else None: ``isdigit`` alone takes '²', which ``int`` refuses, and ``int`` refuses
    thousands of digits."""
    if not (text.isascii() and text.isdigit()) or len(text) > max_digits:
        return None
    return int(text)


def _escape(char: str) -> str:
    if char == "\\":
        return "\\\\"  # so that an escape in the output always stands for one character
    if char.isprintable():  # False for controls (C0, DEL, C1), format characters (bidi,
        return char  # zero-width), line/paragraph separators, surrogates, unassigned
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str, limit: int | None = None) -> str:
    """``text`` with every non-printable character shown as a visible escape (``\\x1b``,
    ``\\u202e``) and a backslash doubled.

    With ``limit``, the result is cut to at most that many characters, never inside an
    escape.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if text.isprintable() and "\\" not in text:  # the common case: each character stands
        return text[:limit]
    pieces: list[str] = []
    length = 0
    for char in text:
        piece = _escape(char)
        if limit is not None and length + len(piece) > limit:
            break
        pieces.append(piece)
        length += len(piece)
    return "".join(pieces)
