"""The fenced code blocks of the documentation and their run marks, for tests/test_docs.py and the
tests that run a page's blocks (tests/test_examples.py). The convention is written down in
docs/architecture.md ("Contributing to these pages"): the line right before a fenced block is
`<!-- run: tests/FILE.py -->` or `<!-- not run: REASON -->`. Kept apart from the helpers package: these
tests need neither torch nor Lightning."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(r"<!-- (?:run: (?P<runner>tests/[\w/]+\.py)|not run: (?P<reason>\S.*?)) -->")
FENCE = re.compile(r"^ *(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
# pymdownx.snippets: `--8<-- "FILE"` or `--8<-- "FILE:START:END"` on a line of its own
INCLUDE = re.compile(r'^--8<-- "(?P<path>[^":]+)(?::-?\d*){0,2}"$')


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int  # of the opening fence, from 1
    language: str
    code: str
    mark: str  # the line right before the fence, stripped

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def runner(self) -> str | None:
        """The test file the mark says runs this block; None when marked not run or unmarked."""
        found = MARK.fullmatch(self.mark)
        return found["runner"] if found else None


def closing_line(lines: list[str], start: int, fence: str) -> int:
    """Index of the line closing the fence opened at `start` (same character, at least as long)."""
    for index in range(start + 1, len(lines)):
        text = lines[index].strip()
        if text and set(text) == {fence[0]} and len(text) >= len(fence):
            return index
    raise AssertionError(f"unclosed code fence at line {start + 1}")


def code_blocks(page: str) -> list[Block]:
    """Every fenced block of `page` (a path relative to the repository root)."""
    lines = (ROOT / page).read_text().splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        end = closing_line(lines, index, opening["fence"])
        mark = lines[index - 1].strip() if index else ""
        blocks.append(Block(page, index + 1, opening["info"].strip(), "\n".join(lines[index + 1:end]) + "\n", mark))
        index = end + 1
    return blocks


def included_files(page: str) -> list[str]:
    """The files `page` includes with pymdownx.snippets (outside code blocks: markdown pages)."""
    text = (ROOT / page).read_text()
    return [found["path"] for found in (INCLUDE.match(line.strip()) for line in text.splitlines()) if found]


def documented_pages() -> list[str]:
    """README.md, every page under docs/, and the markdown files those pages include."""
    pages = ["README.md", *(str(path.relative_to(ROOT)) for path in sorted((ROOT / "docs").rglob("*.md")))]
    included = {path for page in pages for path in included_files(page) if path.endswith(".md")}
    return pages + sorted(included - set(pages))


def resolved(block: Block) -> str:
    """The block's text as the site shows it: a block that is one include is the included file."""
    found = INCLUDE.match(block.code.strip())
    return (ROOT / found["path"]).read_text() if found else block.code
