"""The documentation: the site builds under `mkdocs build --strict` (no broken link, anchor, picture
or page), the README stays short and opens with the Quick start commands CI runs, and every code
block of the README and the site is run by a test or says why not (the shell blocks marked
`run: tests/test_docs.py` are run here)."""
import os
import re
import stat
import subprocess
import sys

import pytest
import yaml

from doc_blocks import MARK, ROOT, code_blocks, documented_pages, resolved

PAGES = documented_pages()
BLOCKS = [block for page in PAGES for block in code_blocks(page)]
README_LIMIT = 150
PICTURES = ("report", "serve", "samples", "projection")


def test_the_site_builds_strict(tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(site)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in PICTURES:  # the project's own pictures reach the site, where the pages show them
        assert (site / "img" / f"{name}.png").stat().st_size > 0, name
        assert any(f"img/{name}.png" in page.read_text() for page in site.rglob("index.html")), name


def quick_start_commands() -> list[str]:
    """The README's first code block, which must sit under its first heading, `## Quick start`."""
    readme = (ROOT / "README.md").read_text()
    first_heading = next(line for line in readme.splitlines() if line.startswith("## "))
    assert first_heading == "## Quick start", first_heading
    first = code_blocks("README.md")[0]
    before = readme.splitlines()[:first.line - 1]
    assert "## Quick start" in before and not any(line.startswith("## ") for line in before[before.index("## Quick start") + 1:])
    return first.code.splitlines()


def test_the_readme_is_short_and_opens_with_the_commands_ci_runs():
    assert len((ROOT / "README.md").read_text().splitlines()) <= README_LIMIT
    commands = quick_start_commands()
    assert commands == ["pip install torch==2.13.0 -e . && dgm-scale train",
                        'pip install torch==2.13.0 -e ".[test]" && python -m pytest']
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert commands[1] in ci_lines  # CI runs the README's test command, as written


def test_the_readme_links_reach_files():
    """The README is outside the site, so the strict build does not check its links into docs/."""
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    assert targets
    missing = [target for target in targets if "://" not in target and not (ROOT / target).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_every_code_block_is_marked_run_or_not_run():
    unmarked = [block.where for block in BLOCKS if not MARK.fullmatch(block.mark)]
    assert not unmarked, f"code blocks without <!-- run: tests/FILE.py --> or <!-- not run: REASON -->: {unmarked}"
    for block in BLOCKS:
        if block.runner and block.runner != "tests/test_docs.py":
            # another test file runs it: that file must exist and read the page the block is on
            assert (ROOT / block.runner).is_file(), f"{block.where}: no test file {block.runner}"
            assert block.page in (ROOT / block.runner).read_text(), f"{block.where}: {block.runner} never reads {block.page}"


def test_yaml_blocks_parse():
    for block in BLOCKS:
        if block.language == "yaml":
            assert isinstance(yaml.safe_load(resolved(block)), dict), block.where


def shim_bin(folder):
    """A `dgm-scale` on PATH that runs this checkout's CLI (the installed script may be another's)."""
    folder.mkdir()
    script = folder / "dgm-scale"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m dgm_scale.cli "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return folder


RUN_HERE = [block for block in BLOCKS if block.runner == "tests/test_docs.py"]


@pytest.mark.parametrize("block", RUN_HERE, ids=[block.where for block in RUN_HERE])
def test_shell_blocks_marked_run_here_run(block, tmp_path):
    assert block.language in ("bash", "sh"), f"{block.where}: only shell blocks run here; name the test that runs it"
    for shared in ("configs", "examples"):
        (tmp_path / shared).symlink_to(ROOT / shared)
    env = {"PATH": f"{shim_bin(tmp_path / 'bin')}:/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path),
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip(), f"{block.where}:\n{proc.stderr[-3000:]}"


def test_some_blocks_are_run():
    """The marking check above would pass on a site that runs nothing: the Python API page's block
    and at least one shell block here are run."""
    assert RUN_HERE
    assert any(block.page == "docs/python-api.md" and block.runner for block in BLOCKS)
