"""A small reader for protobuf text format, enough for Triton's ``config.pbtxt``.

Only the syntax is parsed (no schema): scalars, strings, enums, nested messages ``name { ... }`` and lists
``name: [ ... ]``. Every field maps to a *list* of values because protobuf fields may repeat::

    parse_pbtxt('max_batch_size: 8 dynamic_batching { max_queue_delay_microseconds: 100 }')
    -> {"max_batch_size": [8], "dynamic_batching": [{"max_queue_delay_microseconds": [100]}]}
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["PbtxtError", "first", "parse_pbtxt"]

Message = dict[str, list[Any]]
Value = int | float | str | bool | Message | list[Any]

_TOKEN = re.compile(
    r"""\s+|\#[^\n]*                         # whitespace, comments
    |(?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    |(?P<num>[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?)
    |(?P<ident>[A-Za-z_][A-Za-z0-9_.]*)
    |(?P<punct>[{}\[\]:,;<>])""",
    re.VERBOSE,
)


class PbtxtError(ValueError):
    """The text is not valid protobuf text format; the message says where."""


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    tokens, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise PbtxtError(f"unexpected character {text[pos]!r} at offset {pos}")
        if match.lastgroup is not None:
            tokens.append((match.lastgroup, match.group(match.lastgroup), pos))
        pos = match.end()
    return tokens


def _scalar(kind: str, text: str) -> Value:
    if kind == "str":
        return bytes(text[1:-1], "utf-8").decode("unicode_escape")
    if kind == "num":
        return float(text) if any(c in text for c in ".eE") else int(text)
    return {"true": True, "false": False}.get(text, text)  # enum names stay strings


class _Parser:
    def __init__(self, text: str):
        self.tokens = _tokenize(text)
        self.i = 0

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, expected: str | None = None) -> tuple[str, str, int]:
        token = self.peek()
        if token is None:
            raise PbtxtError(f"unexpected end of text, expected {expected or 'a value'}")
        if expected is not None and token[1] != expected:
            raise PbtxtError(f"expected {expected!r} at offset {token[2]}, found {token[1]!r}")
        self.i += 1
        return token

    def message(self, closing: str | None) -> Message:
        fields: Message = {}
        while True:
            token = self.peek()
            if token is None or token[1] == closing:
                if closing is not None:
                    self.take(closing)
                return fields
            kind, name, pos = self.take()
            if kind != "ident":
                raise PbtxtError(f"expected a field name at offset {pos}, found {name!r}")
            has_colon = self.peek() is not None and self.peek()[1] == ":"
            if has_colon:
                self.take(":")
            value = self.value(allow_scalar=has_colon)
            fields.setdefault(name, []).extend(value if isinstance(value, list) else [value])
            if self.peek() is not None and self.peek()[1] in ",;":
                self.take()

    def value(self, allow_scalar: bool) -> Value:
        kind, text, pos = self.take()
        if text in ("{", "<"):
            return self.message("}" if text == "{" else ">")
        if text == "[":
            items: list[Any] = []
            while self.peek() is not None and self.peek()[1] != "]":
                items.append(self.value(allow_scalar=True))
                if self.peek() is not None and self.peek()[1] == ",":
                    self.take(",")
            self.take("]")
            return items
        if not allow_scalar or kind == "punct":
            raise PbtxtError(f"unexpected {text!r} at offset {pos}")
        return _scalar(kind, text)


def parse_pbtxt(text: str) -> Message:
    """Parse protobuf text format into nested dicts of lists (see the module docstring)."""
    try:
        return _Parser(text).message(closing=None)
    except RecursionError:  # the parser recurses once per level of nesting
        raise PbtxtError("messages or lists nested too deeply") from None


def first(message: Message, field: str, default: Any = None) -> Any:
    """The first value of ``field`` in ``message``, or ``default`` when the field is absent."""
    values = message.get(field)
    return values[0] if values else default
