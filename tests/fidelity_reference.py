"""torch-fidelity 0.4.0's own modules, for parity tests and benchmarks, without torchvision.

torch-fidelity's package `__init__` (and its `utils`) import torchvision, which is not usable
here, but the files we compare against (metric formulas, the InceptionV3 feature extractor, the
TF1 resize) do not. So they are loaded file by file under a stub `torch_fidelity` package with a
stub `torch_fidelity.utils`. Source, in order of preference:

1. an installed torch-fidelity 0.4.0 (its files only; its `__init__` never runs);
2. the 0.4.0 wheel, fetched once with `pip download --no-deps` into `$DGM_SCALE_TEST_DEPS`
   (default `~/.cache/dgm_scale/test-deps`) and extracted there.

`load_torch_fidelity()` returns (modules by short name, None) or (None, why not), so callers skip
with the reason where neither source is available (no PyPI access); the `tfid` fixture in
tests/conftest.py fails instead under CI.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import types
import zipfile
from pathlib import Path

VERSION = "0.4.0"
MODULES = ("defaults", "helpers", "interpolate_compat_tensorflow", "feature_extractor_base",
           "feature_extractor_inceptionv3", "metric_fid", "metric_kid", "metric_isc", "metric_prc")


def deps_dir() -> Path:
    return Path(os.environ.get("DGM_SCALE_TEST_DEPS", "~/.cache/dgm_scale/test-deps")).expanduser()


def _installed_source() -> Path | None:
    """The installed package's folder, when it is version 0.4.0 (its __init__ is not run)."""
    try:
        spec = importlib.util.find_spec("torch_fidelity")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    version = (folder / "version.py").read_text() if (folder / "version.py").exists() else ""
    return folder if f'"{VERSION}"' in version or f"'{VERSION}'" in version else None


def _wheel_source() -> Path:
    """The extracted 0.4.0 wheel under deps_dir(), downloaded on first use (raises on failure)."""
    target = deps_dir() / f"torch_fidelity-{VERSION}"
    if (target / "torch_fidelity" / "feature_extractor_inceptionv3.py").exists():
        return target / "torch_fidelity"
    deps_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=deps_dir()) as scratch:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                               f"torch-fidelity=={VERSION}", "-d", scratch],
                              check=False, capture_output=True, text=True, timeout=300)
        wheels = list(Path(scratch).glob("torch_fidelity-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(f"pip download torch-fidelity=={VERSION} failed: "
                               f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
        extracted = Path(scratch) / "extracted"
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extractall(extracted)
        try:
            os.replace(extracted, target)  # atomic: a concurrent run sees all of it or nothing
        except OSError:
            if not (target / "torch_fidelity").exists():  # lost a race to another process: fine
                raise
    return target / "torch_fidelity"


def _load_from(folder: Path) -> dict[str, types.ModuleType]:
    """Import MODULES from `folder` under stub packages; sys.modules is restored afterwards."""
    package = types.ModuleType("torch_fidelity")
    package.__path__ = [str(folder)]
    utils = types.ModuleType("torch_fidelity.utils")
    utils.__getattr__ = lambda name: None  # metric files import helpers they only use for inputs
    saved = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "torch_fidelity"}
    sys.modules.update({"torch_fidelity": package, "torch_fidelity.utils": utils})
    try:
        return {name: importlib.import_module(f"torch_fidelity.{name}") for name in MODULES}
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] == "torch_fidelity"]:
            del sys.modules[name]
        sys.modules.update(saved)


@functools.lru_cache(maxsize=1)
def load_torch_fidelity() -> tuple[dict[str, types.ModuleType] | None, str | None]:
    """(torch-fidelity 0.4.0's modules by short name, None), or (None, the reason they are missing)."""
    reasons = []
    for source in (_installed_source, _wheel_source):
        try:
            folder = source()
            if folder is not None:
                return _load_from(folder), None
        except Exception as error:  # noqa: BLE001 - any failure here means "skip, saying why"
            reasons.append(f"{source.__name__}: {error}")
    return None, f"torch-fidelity {VERSION} unavailable (not installed, wheel not fetched: {'; '.join(reasons)})"
