import warnings
from pathlib import Path

import pytest

from dgm_scale.train import quiet_lightning

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        quiet_lightning()
        yield


@pytest.fixture
def configs_dir() -> Path:
    return CONFIGS
