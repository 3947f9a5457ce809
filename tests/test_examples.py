"""The Python API page's block (docs/python-api.md) and the examples/ scripts run as written (shortened by overrides)."""
import os
import subprocess
import sys

import pytest

from doc_blocks import code_blocks
from helpers import ROOT


def run_python(args: list[str], cwd, timeout: int = 300) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                               "HOME": os.environ.get("HOME", str(cwd)), "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_the_python_api_page_block_runs(tmp_path):
    (block,) = [block for block in code_blocks("docs/python-api.md") if block.runner == "tests/test_examples.py"]
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "api.py").write_text(block.code)
    out = run_python(["api.py"], tmp_path)
    assert "runs/vae-" in out  # print(result.run_dir, scores["fid"])
    assert float(out.split()[-1]) > 0


# Under -m slow: the Python API page's block (above, in CI) trains, loads, samples and evaluates
# through the same API calls.
@pytest.mark.slow
def test_train_from_python_then_sample_the_checkpoint(tmp_path):
    out = run_python([str(ROOT / "examples" / "train_from_python.py"), "trainer.max_steps=20",
                      f"run.root={tmp_path / 'runs'}", "trainer.progress_bar=false"], tmp_path)
    assert "trained 20 iterations" in out and "'fid'" in out and "'raw/fid'" in out
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "python-samples.png").is_file()
    out = run_python([str(ROOT / "examples" / "sample_checkpoint.py"), str(run_dir / "checkpoints" / "last.ckpt"),
                      str(tmp_path / "grid.png"), "--num", "9"], tmp_path)
    assert "gan model of iteration 20: 9 samples" in out and (tmp_path / "grid.png").is_file()


def test_api_names_stay_the_api_after_the_package_modules_are_imported():
    """`dgm_scale.train(cfg)` twice in one script: the first call imports the package's modules,
    and a submodule of the same name would then replace the function on the package."""
    import importlib
    import pkgutil

    import dgm_scale

    for module in pkgutil.iter_modules(dgm_scale.__path__):
        if module.name in dgm_scale.__all__:
            importlib.import_module(f"dgm_scale.{module.name}")
    for name in dgm_scale.__all__:
        assert not isinstance(getattr(dgm_scale, name), type(dgm_scale)), f"dgm_scale.{name} is a module"
