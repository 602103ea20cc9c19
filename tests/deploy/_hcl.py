"""A small, strict reader for the HCL subset our Consul files use (no hcl2 dependency).

Supports ``# // /* */`` comments, ``key = value`` with strings, numbers, booleans and lists,
and blocks ``name ["label"] { ... }``. Blocks become dicts (labelled ones nest by label;
repeated blocks become lists). Anything else raises `HclError` with the line number.
"""

from __future__ import annotations

import re
from typing import Any

_TOKEN = re.compile(
    r"""
    (?P<ws>[ \t\r]+)
  | (?P<nl>\n)
  | (?P<comment>\#[^\n]*|//[^\n]*|/\*.*?\*/)
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<number>-?\d+(?:\.\d+)?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_\-]*)
  | (?P<punct>[{}\[\]=,])
    """,
    re.VERBOSE | re.DOTALL,
)


class HclError(ValueError):
    """The text is not in the supported HCL subset."""


def _tokens(text: str) -> list[tuple[str, str, int]]:
    out, pos, line = [], 0, 1
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise HclError(f"line {line}: unexpected {text[pos : pos + 20]!r}")
        kind, value = match.lastgroup or "", match.group()
        if kind == "nl":
            out.append(("nl", value, line))
        elif kind not in ("ws", "comment"):
            out.append((kind, value, line))
        line += value.count("\n")
        pos = match.end()
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.i = 0

    def peek(self, skip_nl: bool = True) -> tuple[str, str, int]:
        while skip_nl and self.i < len(self.toks) and self.toks[self.i][0] == "nl":
            self.i += 1
        return self.toks[self.i] if self.i < len(self.toks) else ("eof", "", -1)

    def take(self, kind: str, value: str | None = None) -> str:
        tok = self.peek()
        if tok[0] != kind or (value is not None and tok[1] != value):
            raise HclError(f"line {tok[2]}: expected {value or kind}, got {tok[1]!r}")
        self.i += 1
        return tok[1]

    def body(self, closing: str | None) -> dict[str, Any]:
        result: dict[str, Any] = {}
        while True:
            tok = self.peek()
            if tok[0] == "eof" and closing is None:
                return result
            if tok[0] == "punct" and tok[1] == closing:
                self.i += 1
                return result
            name = self.take("ident")
            nxt = self.peek()
            if nxt[1] == "=":
                self.i += 1
                if name in result:
                    raise HclError(f"line {nxt[2]}: {name} set twice")
                result[name] = self.value()
                end = self.peek(skip_nl=False)
                if end[0] not in ("nl", "eof") and end[1] != closing:
                    raise HclError(f"line {end[2]}: one attribute per line")
                continue
            label = None
            if nxt[0] == "string":
                label = _unquote(self.take("string"))
            self.take("punct", "{")
            block = self.body("}")
            slot = result.setdefault(name, {} if label is not None else [])
            if label is not None:
                slot[label] = block
            else:
                slot.append(block)

    def value(self) -> Any:
        kind, text, line = self.peek()
        self.i += 1
        if kind == "string":
            return _unquote(text)
        if kind == "number":
            return float(text) if "." in text else int(text)
        if kind == "ident" and text in ("true", "false"):
            return text == "true"
        if text == "[":
            items = []
            while self.peek()[1] != "]":
                items.append(self.value())
                if self.peek()[1] == ",":
                    self.i += 1
            self.i += 1
            return items
        raise HclError(f"line {line}: unexpected value {text!r}")


def _unquote(text: str) -> str:
    return text[1:-1].replace('\\"', '"').replace("\\\\", "\\")


def loads(text: str) -> dict[str, Any]:
    """Parse `text`; unlabelled blocks are lists of dicts (one per occurrence)."""
    return _Parser(text).body(None)
