import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

from dgm_scale.training import quiet_lightning
from fidelity_reference import load_torch_fidelity
from helpers import under_ci

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="session", autouse=True)
def _wandb_stays_local(tmp_path_factory):
    """Runs that use W&B (tracking.wandb.mode=auto in tests without TINY) write only under a
    temporary folder, and `auto` never resolves to online: no key, no netrc."""
    home = tmp_path_factory.mktemp("wandb_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("WANDB_API_KEY", raising=False)
        patch.setenv("NETRC", str(home / "no-netrc"))
        for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            patch.setenv(name, str(home / name.lower()))
        patch.setenv("WANDB_SILENT", "true")
        yield


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        quiet_lightning()
        yield


@pytest.fixture(scope="session")
def tfid():
    """torch-fidelity 0.4.0's modules by short name (tests/fidelity_reference.py), the reference
    of the metric parity tests. Where they cannot be had (no PyPI) the tests skip, saying why;
    under CI (env CI set) they fail instead, so the parity tests never vanish from CI silently.
    torch-fidelity is not in the `test` extra: it requires torchvision, and installing it from
    PyPI replaces the pinned torch (and torchvision's wheels do not import beside torch 2.13)."""
    modules, reason = load_torch_fidelity()
    if modules is None:
        if under_ci():
            pytest.fail(f"{reason}; CI must run the torch-fidelity parity tests: let "
                        "`pip download torch-fidelity==0.4.0` reach PyPI, or pre-fill $DGM_SCALE_TEST_DEPS",
                        pytrace=False)
        pytest.skip(reason)
    return modules


@pytest.fixture
def configs_dir() -> Path:
    return CONFIGS


def find_chromium():
    return next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Chromium's path (the page tests screenshot with it); installed from Debian (as root, like
    the local SLURM cluster) if missing."""
    if find_chromium() is None and os.geteuid() == 0 and shutil.which("apt-get"):
        install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
        if subprocess.run(install, capture_output=True, timeout=900).returncode != 0:
            subprocess.run(["apt-get", "update"], capture_output=True, timeout=300)
            subprocess.run(install, capture_output=True, timeout=900)
    if find_chromium() is None:
        pytest.skip("no chromium on PATH and none installable here (Debian: apt-get install chromium)")
    return find_chromium()
