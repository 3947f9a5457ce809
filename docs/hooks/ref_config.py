"""The config reference (docs/reference/config.md), generated from the schema dataclasses.

Every key of the shared sections (dgm_scale.config.schema.SHARED_SECTIONS) and of each built-in
family's own sections (`config_class(family)`), nested dataclasses flattened into dotted keys,
with its type, its default and its description: the `#` comment kept beside the field in the
source (the comment lines right above it and / or the one ending its line), so the description
is edited where the key is defined and the page cannot drift from the code.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import textwrap
import tokenize
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Dict, Iterator, List, Tuple

from dgm_scale.config.schema import SHARED_SECTIONS, config_class
from dgm_scale.families.registry import BUILTIN, Family, get_family

from ref_markdown import code, table, text


@dataclass(frozen=True)
class Key:
    """One leaf of a config: `dotted` as typed in an override (`trainer.ddp.bucket_mb=10`)."""

    dotted: str
    type: str
    default: Any
    description: str
    section: bool = False  # a nested dataclass (`trainer.ddp`): its keys follow it


@lru_cache(maxsize=None)
def field_comments(cls: type) -> Dict[str, str]:
    """The description comment of each field `cls` itself defines: the block of comment lines
    right above the field (no blank line between) and the comment ending its line, joined."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: Dict[int, Tuple[str, bool]] = {}  # line -> (text, alone on its line)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            alone = token.line[:token.start[1]].strip() == ""
            comments[token.start[0]] = (token.string.lstrip("#").strip(), alone)
    found = {}
    for line, name, last in _fields_in_source(source):
        above, row = [], line - 1
        while row in comments and comments[row][1]:
            above.insert(0, comments[row][0])
            row -= 1
        after = [comments[row][0] for row in range(line, last + 1) if row in comments and not comments[row][1]]
        found[name] = " ".join(part for part in [*above, *after] if part)
    return found


def _fields_in_source(source: str) -> Iterator[Tuple[int, str, int]]:
    """(first line, name, last line) of each annotated field in the class body of `source`."""
    body = ast.parse(source).body[0].body
    for node in body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            yield node.lineno, node.target.id, node.end_lineno


def description(cls: type, name: str) -> str:
    """The field's comment in the nearest class of `cls`'s MRO that describes it (a subclass
    that only changes a default, like a family's optimizer learning rate, keeps its base's)."""
    for klass in cls.__mro__:
        if dataclasses.is_dataclass(klass) and name in vars(klass).get("__annotations__", {}):
            comment = field_comments(klass).get(name, "")
            if comment:
                return comment
    return ""


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def keys_of(cls: type, prefix: str) -> Iterator[Key]:
    """Every leaf key of dataclass `cls` below `prefix`, nested dataclasses flattened."""
    for field in dataclasses.fields(cls):
        default, dotted = _default(field), f"{prefix}.{field.name}"
        if dataclasses.is_dataclass(default):
            nested = type(default)
            about = description(cls, field.name) or (_docstring(nested) or "").split("\n\n")[0]
            yield Key(dotted, nested.__name__, None, " ".join(about.split()), section=True)
            yield from keys_of(nested, dotted)
        else:
            yield Key(dotted, str(field.type), default, description(cls, field.name))


def format_default(value: Any) -> str:
    """The default as it is written in YAML or an override (`null`, `true`, `[0.5, 0.999]`)."""
    if isinstance(value, str):
        return json.dumps(value) if value == "" or value.strip() != value else value
    return json.dumps(value)


def _section_table(cls: type, prefix: str) -> List[str]:
    doc = _docstring(cls)
    intro = [text(" ".join(doc.split())), ""] if doc else []
    rows = [(code(key.dotted), code(key.type), "(section)" if key.section else code(format_default(key.default)),
             text(key.description)) for key in keys_of(cls, prefix)]
    if not rows:
        return [*intro, "This section has no keys.", ""]
    return [*intro, *table(("Key", "Type", "Default", "Description"), rows), ""]


def _docstring(cls: type) -> str:
    """The docstring written for `cls` ("" for none: not the signature dataclasses makes up)."""
    doc = vars(cls).get("__doc__") or ""
    return "" if doc.startswith(f"{cls.__name__}(") else inspect.cleandoc(doc)


def builtin_families() -> List[Family]:
    return [get_family(name) for name in BUILTIN]


def family_sections(family: Family) -> List[Tuple[str, type]]:
    """The sections `config_class(family)` adds to the shared ones: model, loss, optim, its own."""
    return [(field.name, field.type) for field in dataclasses.fields(config_class(family))
            if field.name not in SHARED_SECTIONS]


def all_keys() -> Dict[str, List[Key]]:
    """Family name ('' for the shared sections) -> its keys, in page order."""
    keys = {"": [key for name, cls in SHARED_SECTIONS.items() for key in keys_of(cls, name)]}
    for family in builtin_families():
        keys[family.name] = [key for name, cls in family_sections(family) for key in keys_of(cls, name)]
    return keys


def config_reference() -> str:
    """The page's markdown."""
    lines = ["# Config reference", "",
             "Generated from the schema dataclasses (`dgm_scale/config/schema.py` and each family's "
             "`dgm_scale/families/*/__init__.py`) at every docs build: each description is the comment "
             "beside the key's definition. A config is the shared sections below plus the sections of "
             "the family `model.kind` names. Set a key in a YAML file (`trainer: {max_steps: 500}`) or "
             "as an override (`dgm-scale train trainer.max_steps=500`); `dgm-scale show-config` prints "
             "the resolved config.", "",
             "## Shared sections", ""]
    for name, cls in SHARED_SECTIONS.items():
        lines += [f"### `{name}`", "", *_section_table(cls, name)]
    for family in builtin_families():
        lines += [f"## Family `{family.name}`", "",
                  text(f"`model.kind: {family.name}`: {family.description}."), ""]
        for name, cls in family_sections(family):
            lines += [f"### `{name}` ({family.name})", "", *_section_table(cls, name)]
    return "\n".join(lines)
