"""Config loading: overrides, variant files, and one-line errors naming the culprit."""
from pathlib import Path

import pytest

from dgm_scale.core.errors import described, first_line
from dgm_scale.cli import main
from dgm_scale.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_the_documented_default_job():
    cfg = load_config()
    assert (cfg.model.kind, cfg.loss.name, cfg.data.name, cfg.model.generator.arch) == ("gan", "nonsaturating", "digits", "dcgan")
    assert cfg.run.name == "default"


def test_overrides_are_typed_and_applied_after_the_file():
    cfg = load_config(CONFIGS / "wgan_gp.yaml", ["trainer.max_steps=2000", "optim.g.lr=1e-4", "optim.d.betas=[0.1,0.8]"])
    assert cfg.trainer.max_steps == 2000 and isinstance(cfg.trainer.max_steps, int)
    assert cfg.optim.g.lr == pytest.approx(1e-4) and isinstance(cfg.optim.g.lr, float)
    assert list(cfg.optim.d.betas) == [0.1, 0.8]
    assert cfg.run.name == "wgan_gp"


SHIPPED_CONFIGS = sorted(CONFIGS.glob("*.yaml"))  # every file, those added later included
assert SHIPPED_CONFIGS, f"no configs under {CONFIGS}"  # an empty list would only skip the test below


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda path: path.stem)
def test_every_shipped_config_loads(path):
    assert load_config(path).run.name == path.stem  # runs are named after their config file


def test_variant_files_carry_the_papers_defaults():
    wgan = load_config(CONFIGS / "wgan.yaml")
    assert (wgan.optim.d.name, wgan.optim.d.lr, wgan.loss.clip_value, wgan.loss.n_critic) == ("rmsprop", 5e-5, 0.01, 5)
    gp = load_config(CONFIGS / "wgan_gp.yaml")
    assert (gp.optim.g.lr, list(gp.optim.g.betas), gp.loss.gp_weight, gp.loss.n_critic) == (1e-4, [0.0, 0.9], 10.0, 5)
    dcgan = load_config(CONFIGS / "nsgan.yaml")
    assert (dcgan.optim.g.lr, list(dcgan.optim.g.betas)) == (2e-4, [0.5, 0.999])


def one_line_error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_key_names_the_full_key():
    assert "unknown config key 'trainer.max_stepz'" in one_line_error(overrides=["trainer.max_stepz=10"])


def test_unknown_key_in_a_file_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  generator:\n    widht: 3\n")
    message = one_line_error(bad)
    assert "bad.yaml" in message and "model.generator.widht" in message


def test_wrong_type_names_the_key():
    message = one_line_error(overrides=["trainer.max_steps=many"])
    assert "trainer.max_steps" in message and "many" in message


def test_resolution_not_a_power_of_two():
    assert "data.resolution" in one_line_error(overrides=["data.resolution=24"])
    assert "data.resolution" in one_line_error(overrides=["data.resolution=512"])


def test_batch_norm_in_a_wgan_gp_critic_is_rejected():
    message = one_line_error(CONFIGS / "wgan_gp.yaml", ["model.discriminator.norm=batch"])
    assert "model.discriminator.norm" in message and "WGAN-GP" in message


def test_invalid_choices_and_combinations():
    assert "loss.name" in one_line_error(overrides=["loss.name=relativistic"])
    assert "model.generator.arch" in one_line_error(overrides=["data.name=ring8"])
    assert "data.path" in one_line_error(overrides=["data.name=folder"])
    assert "optim.g.betas" in one_line_error(overrides=["optim.g.betas=[0.5]"])
    assert "model.discriminator.norm" in one_line_error(overrides=["model.discriminator.arch=mlp", "model.discriminator.norm=instance"])
    assert "override 'oops'" in one_line_error(overrides=["oops"])
    assert "does not exist" in one_line_error("no/such/config.yaml")


def test_cli_reports_errors_in_one_line_and_exit_code_2(capsys, tmp_path):
    assert main(["show-config", "trainer.max_stepz=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "trainer.max_stepz" in err


def test_missing_dataset_path_is_a_one_line_error_before_any_run_dir(capsys, tmp_path):
    code = main(["train", "data.name=folder", f"data.path={tmp_path / 'nowhere'}", "data.channels=3",
                 f"run.root={tmp_path / 'runs'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "data.path" in err and "nowhere" in err
    assert not (tmp_path / "runs").exists()


def test_show_config_prints_resolved_yaml(capsys):
    assert main(["show-config", str(CONFIGS / "hinge.yaml"), "data.batch_size=32"]) == 0
    out = capsys.readouterr().out
    assert "name: hinge" in out and "batch_size: 32" in out and "spectral_norm: true" in out


def test_class_count_must_match_the_dataset(capsys, tmp_path):
    assert main(["train", "model.num_classes=5", f"run.root={tmp_path}"]) == 2
    assert "model.num_classes" in capsys.readouterr().err


@pytest.mark.parametrize("error, first, whole", [
    (ValueError("  bad value\n  traceback detail  "), "bad value", "ValueError: bad value"),
    (KeyError(), "KeyError", "KeyError"),  # no message: the type, never an empty reason
    (EOFError("\n\n"), "EOFError", "EOFError"),
])
def test_every_error_reason_is_the_first_line_of_its_message_or_its_type(error, first, whole):
    assert first_line(error) == first and described(error) == whole
