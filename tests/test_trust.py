"""Loading a checkpoint runs no code the user did not choose: every key that names code (core/trust.py
CODE_KEYS) outside dgm_scale stops every loading command before anything is imported or called,
unless trusted (--trust-code, trust_code=True, DGM_SCALE_TRUST_CODE=1); and a network target
must be an nn.Module subclass or a marked factory, trusted or not."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import dgm_scale
from dgm_scale.cli import main
from dgm_scale.config import ConfigError, load_config
from dgm_scale.core.trust import TRUST_ENV, code_names, foreign_code, is_code_key, is_packaged
from dgm_scale.modules import build_module, load_module
from dgm_scale.training import train
from helpers import ROOT, TINY, one_line

CUSTOM = ROOT / "examples" / "custom_nets"

#: every command that loads a checkpoint, as CLI arguments after CKPT (OUT: a path in tmp_path)
LOADING_COMMANDS = {
    "sample": ["--num", "2", "--out", "OUT.png"],
    "evaluate": ["--num-samples", "10", "--out", "OUT.json"],
    "export": ["--out", "OUT.pt"],
    "serve": ["--port", "0"],
    "encode": ["--data", "builtin:digits", "--out", "OUT.npz"],
    "probe": ["--data", "builtin:digits", "--labels-per-class", "1"],
}


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory) -> Path:
    """A tiny GAN's checkpoint: built-in names only."""
    run_dir = tmp_path_factory.mktemp("trust") / "run"
    return train(load_config(overrides=[*TINY, "trainer.max_steps=2", f"run.dir={run_dir}"])).checkpoint


def marker_file(folder: Path, name: str, body: str = "") -> tuple[Path, Path]:
    """(a Python file that writes `folder/<name>.ran` when imported, that marker's path)."""
    marker = folder / f"{name}.ran"
    source = folder / f"{name}.py"
    source.write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n{body}")
    return source, marker


def crafted(base: Path, folder: Path, case: str) -> tuple[Path, Path, str]:
    """(a copy of checkpoint `base` whose stored config names code as `case` says, the marker that
    code would write, the config key the refusal must name)."""
    checkpoint = torch.load(base, map_location="cpu", weights_only=True)
    config = checkpoint["hyper_parameters"]["config"]
    if case == "stdlib-target":
        marker = folder / "stdlib.ran"
        config["model"]["generator"]["target"] = "os:system"
        config["model"]["generator"]["kwargs"] = {"command": f"touch {marker}"}
        key = "model.generator.target"
    elif case == "run-imports":
        source, marker = marker_file(folder, "imported_marker")
        config["run"]["imports"] = [str(source)]
        key = "run.imports[0]"
    elif case == "kind":
        source, marker = marker_file(folder, "family_marker")
        config["model"]["kind"] = f"{source}:FAMILY"
        key = "model.kind"
    else:
        source, marker = marker_file(folder, "module_marker")
        config["model"]["module"] = f"{source}:Module"
        key = "model.module"
    path = folder / f"{case}.ckpt"
    torch.save(checkpoint, path)
    return path, marker, key


CASES = ("stdlib-target", "run-imports", "kind", "module")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("command", sorted(LOADING_COMMANDS))
def test_every_loading_command_refuses_foreign_code_in_one_line(command, case, plain_checkpoint, tmp_path, capsys,
                                                               monkeypatch):
    def serve_once(source, host, port, limits=None):  # a server that would start returns instead of serving forever
        print("served", file=sys.stderr)

    monkeypatch.setattr("dgm_scale.serve.server.serve", serve_once)
    checkpoint, marker, key = crafted(plain_checkpoint, tmp_path, case)
    extra = [arg.replace("OUT", str(tmp_path / "out")) for arg in LOADING_COMMANDS[command]]
    assert main([command, str(checkpoint), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{key}=" in err and "--trust-code" in err and "nothing was imported" in err
    assert not marker.exists()
    assert not list(tmp_path.glob("out*"))  # nothing written


@pytest.mark.parametrize("case", CASES)
def test_the_python_api_refuses_foreign_code(case, plain_checkpoint, tmp_path):
    checkpoint, marker, key = crafted(plain_checkpoint, tmp_path, case)
    for load in (dgm_scale.load_module, load_module, dgm_scale.evaluate):
        with pytest.raises(ConfigError) as error:
            load(checkpoint)
        assert f"{key}=" in one_line(error.value) and "trust_code=True" in str(error.value)
    assert not marker.exists()


def test_a_fresh_process_sampling_a_crafted_checkpoint_runs_nothing(plain_checkpoint, tmp_path):
    """The report of issue 19: `dgm-scale sample` on a checkpoint naming a shell-running function."""
    checkpoint, marker, _ = crafted(plain_checkpoint, tmp_path, "stdlib-target")
    out = subprocess.run([sys.executable, "-m", "dgm_scale.cli", "sample", str(checkpoint), "--out",
                          str(tmp_path / "x.png")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "model.generator.target=os:system" in out.stderr and not marker.exists()


def test_trusted_code_is_imported_but_a_plain_callable_is_never_called(plain_checkpoint, tmp_path, capsys,
                                                                       monkeypatch):
    checkpoint, marker, _ = crafted(plain_checkpoint, tmp_path, "run-imports")
    assert load_module(checkpoint, trust_code=True).checkpoint_iteration == 2
    assert marker.exists()  # trusted: the import ran (and the built-in GAN loaded)
    checkpoint, marker, _ = crafted(plain_checkpoint, tmp_path, "stdlib-target")
    assert main(["sample", str(checkpoint), "--trust-code", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "'model.generator.target': 'os:system' is a builtin_function_or_method, not an nn.Module" in err
    monkeypatch.setenv(TRUST_ENV, "1")
    with pytest.raises(ConfigError, match="not an nn.Module subclass or a function marked"):
        load_module(checkpoint)
    assert not marker.exists()


def test_the_custom_networks_example_loads_and_samples_when_trusted(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    assert main(["train", str(CUSTOM / "config.yaml"), *TINY, "model.generator.kwargs.width=8",
                 "model.discriminator.kwargs.width=8", f"run.dir={run_dir}"]) == 0  # the user's own config
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    assert main(["sample", str(checkpoint), "--num", "4", "--out", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert f"model.generator.target={CUSTOM / 'nets.py'}:Generator" in err and "model.discriminator.target" in err
    assert main(["sample", str(checkpoint), "--trust-code", "--num", "4", "--out", str(tmp_path / "a.png")]) == 0
    assert type(load_module(checkpoint, trust_code=True).generator).__name__ == "Generator"
    monkeypatch.setenv(TRUST_ENV, "1")
    assert main(["sample", str(checkpoint), "--num", "4", "--out", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_resuming_ones_own_run_needs_no_trust(tmp_path):
    common = [*TINY, "model.generator.kwargs.width=8", "model.discriminator.kwargs.width=8",
              f"run.dir={tmp_path / 'run'}"]
    assert main(["train", str(CUSTOM / "config.yaml"), *common]) == 0
    assert main(["train", str(CUSTOM / "config.yaml"), *common, "trainer.max_steps=5", "run.resume=auto"]) == 0
    assert load_module(tmp_path / "run" / "checkpoints" / "last.ckpt", trust_code=True).checkpoint_iteration == 5


class LinearGenerator(nn.Module):
    def __init__(self, latent_dim: int, image_shape):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.linear = nn.Linear(latent_dim, int(torch.tensor(image_shape).prod()))

    def forward(self, z, labels=None):
        return torch.tanh(self.linear(z)).view(-1, *self.image_shape)


@dgm_scale.network_factory
def marked_generator(latent_dim: int, image_shape) -> nn.Module:
    return LinearGenerator(latent_dim, image_shape)


def unmarked_generator(latent_dim: int, image_shape) -> nn.Module:
    return marked_generator(latent_dim, image_shape)


def test_a_network_target_is_a_module_class_or_a_marked_factory():
    module = build_module(load_config(overrides=[*TINY, "model.generator.target=test_trust:marked_generator"]))
    assert isinstance(module.generator, LinearGenerator)
    with pytest.raises(ConfigError) as error:
        build_module(load_config(overrides=[*TINY, "model.generator.target=test_trust:unmarked_generator"]))
    assert "'model.generator.target': 'test_trust:unmarked_generator' is a function, not an nn.Module" in \
        one_line(error.value)
    with pytest.raises(TypeError):
        dgm_scale.network_factory(nn.Linear)  # a class needs no mark


@pytest.mark.parametrize("name, packaged", [
    ("dgm_scale", True), ("dgm_scale.families.gan", True), ("dgm_scale.nets.dcgan:Generator", True),
    ("dgm_scale.cli:os.system", False),  # reaching through the module's own imports
    ("dgm_scale_evil.nets:G", False), ("os:system", False), ("/x/dgm_scale/nets.py:G", False),
    ("dgm_scale/nets.py:G", False), ("dgm_scale.nets:G()", False),
])
def test_only_plain_names_inside_the_package_are_always_allowed(name, packaged):
    assert is_packaged(name) is packaged


def test_code_keys_cover_every_key_that_names_code():
    config = {"run": {"imports": ["a.py", "dgm_scale.x"]},
              "model": {"kind": "gan", "module": "m:M", "generator": {"target": "g:G", "kwargs": {"target": "no"}},
                        "discriminator": {"target": None}, "deep": {"inner": {"target": "d:D"}}},
              "loss": {"target": "not code"}}
    assert code_names(config) == [("run.imports[0]", "a.py"), ("run.imports[1]", "dgm_scale.x"),
                                  ("model.module", "m:M"), ("model.generator.target", "g:G"),
                                  ("model.deep.inner.target", "d:D")]
    assert ("run.imports[1]", "dgm_scale.x") not in foreign_code(config)
    assert is_code_key("model.kind") and not is_code_key("model.latent_dim")
    assert code_names({"model": {"kind": "some.module:FAMILY"}}) == [("model.kind", "some.module:FAMILY")]


class RunsACommand:
    """Unpickling this runs `touch MARKER` (what a crafted pickle in a checkpoint folder does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (__import__("os").system, (f"touch {self.marker}",))


def test_zero_partitions_load_without_running_pickled_code(tmp_path, capsys):
    """`checkpoint to-plain` (and a DeepSpeed resume) read per-rank ZeRO files: weights_only with
    DeepSpeed's records allowed, so a crafted shard is refused in one line and runs nothing."""
    pytest.importorskip("deepspeed")
    marker = tmp_path / "pickle.ran"
    (tmp_path / "zero" / "x").mkdir(parents=True)
    torch.save({"state": RunsACommand(marker)}, tmp_path / "zero" / "x" / "rank00000-opt0.pt")
    torch.save({"optimizer_states": [{"zero_shards": {"dir": "zero/x", "world_size": 1}}]}, tmp_path / "s.ckpt")
    assert main(["checkpoint", "to-plain", str(tmp_path / "s.ckpt"), str(tmp_path / "plain.ckpt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "rank00000-opt0.pt' does not load" in err, err
    assert not marker.exists() and not (tmp_path / "plain.ckpt").exists()
