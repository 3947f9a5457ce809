"""Markdown pieces of the generated reference pages: table cells that cannot break the table."""
from __future__ import annotations

import re
from typing import Iterable, List, Sequence

# Python-Markdown's backslash escapes (its ESCAPED_CHARS, `|` from the tables extension): text
# such as `a | b`, `lambda * x` or `[N, C]` in a description must not become a column, emphasis
# or a link; `<` is not escapable and becomes an entity.
_SPECIAL = re.compile(r"([\\*_\[\]|])")
_CODE_SPAN = re.compile(r"(`[^`]*`)")


def text(words: str) -> str:
    """`words` as markdown text: special characters escaped except inside `code spans`, which
    are kept as they are."""
    parts = _CODE_SPAN.split(words)
    return "".join(part if index % 2 else _SPECIAL.sub(r"\\\1", part).replace("<", "&lt;")
                   for index, part in enumerate(parts))


def code(value: str) -> str:
    """`value` as a code span (a double fence when it holds a backtick, as markdown allows; the
    tables extension does not split a cell at a pipe inside one)."""
    fence, pad = ("``", " ") if "`" in value else ("`", "")
    return f"{fence}{pad}{value}{pad}{fence}"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> List[str]:
    """A markdown table (one line per row; cells must not hold newlines)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("\n", " ") for cell in row) + " |" for row in rows]
    return lines
