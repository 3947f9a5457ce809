"""The generated references (docs/hooks/reference.py): every config key and every command and
option is on its page, described, with the default the code has; the hook builds under --strict."""
from __future__ import annotations

import contextlib
import importlib
import io
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import pytest
from omegaconf import DictConfig, OmegaConf

from dgm_scale.cli import build_parser
from dgm_scale.config import load_config
from dgm_scale.config.loader import _schema
from dgm_scale.config.schema import SHARED_SECTIONS
from dgm_scale.families.registry import BUILTIN, get_family

ROOT = Path(__file__).resolve().parents[1]
HOOKS = ROOT / "docs" / "hooks"


@pytest.fixture(scope="module")
def ref():
    """The generator modules, imported as MkDocs imports them (their folder on sys.path)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(HOOKS))
        yield importlib.import_module("ref_config"), importlib.import_module("ref_cli")


def _cells(row: str) -> List[str]:
    """A markdown table row's cells (a `\\|`, or a pipe in a code span, is not a separator)."""
    return [cell.strip() for cell in re.split(r"(?<!\\)\|(?=(?:[^`]*`[^`]*`)*[^`]*$)", row.strip())[1:-1]]


def _unquote(cell: str) -> str:
    return cell[1:-1] if cell.startswith("`") and cell.endswith("`") else cell


def config_rows(page: str) -> Dict[str, Dict[str, List[str]]]:
    """Family ('' = the shared sections) -> key -> [type, default, description], read from the page."""
    rows: Dict[str, Dict[str, List[str]]] = {}
    family = None
    for line in page.splitlines():
        heading = re.match(r"## (Shared sections|Family `(\w+)`)$", line)
        if heading:
            family = heading.group(2) or ""
            rows.setdefault(family, {})
        elif line.startswith("| `") and family is not None:
            key, *rest = _cells(line)
            assert _unquote(key) not in rows[family], f"key {key} twice on the page"
            rows[family][_unquote(key)] = rest
    return rows


SECTION = object()  # schema_keys' value of a nested section


def schema_keys(node: DictConfig, prefix: str) -> Dict[str, object]:
    """Every key the loader's schema accepts below `prefix` -> its default (or SECTION):
    nested structured sections recursed into, free-form mappings (`kwargs`) are one key."""
    keys: Dict[str, object] = {}
    for name in node.keys():
        child, dotted = node._get_node(name), f"{prefix}{name}"
        if isinstance(child, DictConfig) and child._metadata.object_type not in (None, dict):
            keys[dotted] = SECTION
            keys.update(schema_keys(child, dotted + "."))
        else:
            keys[dotted] = OmegaConf.to_container(child) if isinstance(child, DictConfig) else child._value()
    return keys


def accepted_keys(family: str) -> Dict[str, object]:
    """The keys below the sections (`trainer.ddp`, `trainer.ddp.overlap`) of `family`'s config."""
    return {key: value for key, value in schema_keys(_schema(get_family(family)), "").items() if "." in key}


@pytest.fixture(scope="module")
def config_page(ref):
    return ref[0].config_reference()


def test_config_reference_lists_every_key_the_loader_accepts(config_page):
    page = config_rows(config_page)
    assert set(page) == {"", *BUILTIN}
    for name in BUILTIN:
        accepted = accepted_keys(name)
        shared = {key for key in accepted if key.split(".")[0] in SHARED_SECTIONS}
        assert set(page[""]) == shared, name
        assert set(page[name]) == set(accepted) - shared, name


def test_every_config_key_has_a_description(config_page):
    undescribed = [key for rows in config_rows(config_page).values() for key, cells in rows.items() if not cells[2]]
    assert not undescribed, f"config keys without a description (a # comment beside the field): {undescribed}"


def test_config_defaults_are_the_dataclass_defaults(config_page, tmp_path):
    """Each default, read as an override value, is the schema's default; a config file setting
    every key of a family to its documented default loads as the default config."""
    page = config_rows(config_page)
    for name in BUILTIN:
        accepted = accepted_keys(name)
        overrides = []
        for key, (_, default, _) in {**page[""], **page[name]}.items():
            if accepted[key] is SECTION:
                assert default == "(section)", key
                continue
            value = _unquote(default)
            assert OmegaConf.from_dotlist([f"v={value}"]).v == accepted[key], (name, key, default)
            overrides.append(f"{key}={value}")
        path = tmp_path / f"{name}.yaml"
        OmegaConf.save(OmegaConf.from_dotlist(overrides), path)
        assert load_config(path, ["run.name=default"]) == load_config(None, [f"model.kind={name}"]), name


@dataclass
class _Commented:
    plain: int = 0
    trailing: int = 1  # the trailing one
    # a block above,
    # two lines long
    above: int = 2
    # a block above
    both: List[int] = field(default_factory=lambda: [  # and a trailing one
        1, 2])
    # a block kept apart by a blank line

    apart: str = "x"


@dataclass
class _Subclass(_Commented):
    trailing: int = 5
    plain: int = 3  # now described


def test_field_comments_follow_the_rules(ref):
    ref_config = ref[0]
    assert ref_config.field_comments(_Commented) == {
        "plain": "", "trailing": "the trailing one", "above": "a block above, two lines long",
        "both": "a block above and a trailing one", "apart": ""}
    assert ref_config.description(_Subclass, "trailing") == "the trailing one"  # the base's
    assert ref_config.description(_Subclass, "plain") == "now described"
    assert [key.default for key in ref_config.keys_of(_Subclass, "s")] == [3, 5, 2, [1, 2], "x"]


def _help_output(argv: List[str]) -> str:
    """What `dgm-scale ARGV -h` prints."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "-h"])
    return out.getvalue()


def _subcommands(help_text: str) -> List[str]:
    """The choices of the positional argument `-h` lists as `{a,b,...}` (a command's subcommands)."""
    choices = re.search(r"^  \{([\w,-]+)\}", help_text, flags=re.M)
    return choices.group(1).split(",") if choices else []


def cli_sections(page: str) -> Dict[str, str]:
    """Command path -> its section of the page."""
    parts = re.split(r"^#+ `(dgm-scale[\w -]*)`$", page, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_cli_reference_lists_every_command_and_option(ref):
    """Checked against what `-h` prints for each command, found by following the subcommand
    choices each help lists."""
    sections, todo, seen, arguments = cli_sections(ref[1].cli_reference()), [[]], 0, 0
    while todo:
        argv = todo.pop()
        help_text, path = _help_output(argv), " ".join(["dgm-scale", *argv])
        assert path in sections, f"command '{path}' is not on the page"
        table = sections[path].split("```", 2)[2]  # below the usage line
        listed = [line.strip().split("  ")[0] for line in help_text.splitlines()
                  if re.match(r"  [^ {]", line) and not line.startswith("  -h")]
        options = set(re.findall(r"--[a-z][\w-]*", " ".join(item for item in listed if item.startswith("-"))))
        assert options <= set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", table)), path
        positionals = [item for item in listed if not item.startswith("-")]
        assert all(f"| `{item}` |" in table for item in positionals), (path, positionals)
        todo += [[*argv, name] for name in _subcommands(help_text)]
        seen, arguments = seen + 1, arguments + len(options) + len(positionals)
    assert seen == len(sections) >= 16 and arguments >= 100  # (and the help's parse found them)


def test_every_command_and_argument_has_help(ref):
    _, ref_cli = ref
    commands = list(ref_cli.commands())
    missing = [item for command in commands for item in ref_cli.described(command)]
    assert not missing, f"commands / arguments without help: {missing}"
    for path, section in cli_sections(ref_cli.cli_reference()).items():
        assert section.split("```")[0].strip(), f"'{path}' has no description on the page"
        rows = [_cells(line) for line in section.splitlines() if line.startswith("| `")]
        assert all(cells[-1] for cells in rows), (path, [cells[0] for cells in rows if not cells[-1]])


def test_cli_defaults_are_the_parsers(ref):
    """The Default column of `dgm-scale sample` against its parser's own defaults."""
    section = cli_sections(ref[1].cli_reference())["dgm-scale sample"]
    shown = {_cells(line)[0].split(",")[0].strip("` ").split(" ")[0]: _unquote(_cells(line)[1])
             for line in section.splitlines() if line.startswith("| `")}
    defaults = vars(build_parser().parse_args(["sample", "x.ckpt"]))
    assert shown["--num"] == str(defaults["num"]) == "64"
    assert shown["--format"] == defaults["format"] and shown["--variant"] == '""' and shown["--trust-code"] == "false"
    assert shown["--out"] == "" and defaults["out"] is None


def _site(tmp_path: Path, hook: Path, pages: Dict[str, str]) -> Path:
    docs = tmp_path / "docs"
    for name, text in {"index.md": "# Home\n", **pages}.items():
        (docs / name).parent.mkdir(parents=True, exist_ok=True)
        (docs / name).write_text(text)
    (tmp_path / "mkdocs.yml").write_text(
        f"site_name: test\nhooks: [{hook}]\nnav:\n  - index.md\n"
        "  - Reference: [reference/config.md, reference/cli.md]\n")
    return tmp_path


def _build(site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site / "site")],
                          cwd=site, capture_output=True, text=True, timeout=120)


def test_mkdocs_builds_the_references_under_strict(tmp_path):
    pytest.importorskip("mkdocs")
    site = _site(tmp_path, HOOKS / "reference.py", {})
    result = _build(site)
    assert result.returncode == 0, result.stderr[-2000:]
    config_html = (site / "site" / "reference" / "config" / "index.html").read_text()
    cli_html = (site / "site" / "reference" / "cli" / "index.html").read_text()
    assert "<code>trainer.ddp.bucket_mb</code>" in config_html and "<code>sampler.churn_noise</code>" in config_html
    assert 'id="dgm-scale-checkpoint-to-plain"' in cli_html and "--sigma-rel" in cli_html
    for link in set(re.findall(r'href="#([^"]+)"', cli_html)):  # the command table's links land
        assert f'id="{link}"' in cli_html, link


def test_a_committed_reference_page_is_refused(tmp_path):
    """docs/reference/config.md in the sources would hide the generated page: the build stops."""
    pytest.importorskip("mkdocs")
    result = _build(_site(tmp_path, HOOKS / "reference.py", {"reference/config.md": "# stale\n"}))
    assert result.returncode != 0 and "docs/reference/config.md is generated" in result.stderr
