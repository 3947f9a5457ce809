"""The diffusion family end to end: tiny trainings of each objective through the Python API and
the CLI, the sampling contract (sample i depends only on (seed, i)), guidance, the EMA, your own
denoiser by class path and one-line errors for bad settings (exact resume after kill -9:
test_kill_resume.py)."""
import pytest
import torch

from dgm_scale.cli import main
from dgm_scale.config import ConfigError, load_config
from dgm_scale.families.diffusion.module import guided_denoiser
from dgm_scale.modules import build_module, load_module
from dgm_scale.training import train
from helpers import ROOT, TINY_RUN, metrics_rows, one_line, torchrun

TINY_DIFFUSION = [*TINY_RUN, "model.kind=diffusion", "model.denoiser.width=8", "model.denoiser.channel_mult=[1,2]",
                  "model.denoiser.blocks=1", "sampler.steps=3"]
CONDITIONAL = ["model.num_classes=10", "model.label_dropout=0.2"]
DENOISER = ROOT / "examples" / "custom_nets" / "denoiser.py"


@pytest.mark.parametrize("objective", [["loss.objective=eps"], ["loss.objective=v", "loss.timesteps=0"],
                                       ["loss.objective=edm"], ["loss.objective=flow", "loss.time_sampling=logit_normal"]])
def test_each_objective_trains_and_its_checkpoint_samples(objective, tmp_path):
    result = train(load_config(overrides=[*TINY_DIFFUSION, *objective, *CONDITIONAL, f"run.dir={tmp_path / 'run'}"]))
    rows = metrics_rows(tmp_path / "run")
    assert [float(row["train/iteration"]) for row in rows] == [1.0, 2.0, 3.0]
    assert all(0 < float(row["train/loss"]) < 10 for row in rows)
    assert (tmp_path / "run" / "samples" / "final.png").is_file()
    module = load_module(result.checkpoint)
    for sampler in ("ddpm", "ddim", "euler", "heun", "dpmpp_2m"):
        images = module.sample_batch(4, seed=1, sampler=sampler, steps=3, guidance=2.0)
        assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all() and images.abs().max() <= 1


def randomised(module):
    """`module` with noise added to its sampling network's weights (zero-initialised layers too)."""
    with torch.no_grad():
        for param in module.sampling_network().parameters():
            param.add_(0.1 * torch.randn_like(param))
    return module


def test_sample_i_depends_only_on_the_seed_and_i():
    """Stochastic samplers with guidance: any split of a sequence into batches gives the same
    samples (and dropout is off while sampling)."""
    module = randomised(build_module(load_config(overrides=[*TINY_DIFFUSION, *CONDITIONAL, "loss.objective=edm",
                                                            "model.denoiser.dropout=0.5"])))
    for options in ({"sampler": "ddpm", "steps": 4, "guidance": 2.5}, {"sampler": "heun", "steps": 4, "churn": 5.0}):
        whole = module.sample_batch(7, seed=3, **options)
        parts = torch.cat([module.sample_batch(3, seed=3, start=0, **options),
                           module.sample_batch(4, seed=3, start=3, **options)])
        torch.testing.assert_close(parts, whole, rtol=0, atol=1e-5)
        assert not torch.allclose(module.sample_batch(3, seed=4, **options), whole[:3])
    assert module.denoiser.training  # sampling put the network back in training mode


def test_guidance_weights_mix_the_conditional_and_unconditional_denoisers():
    """w = 0: the unconditional model; w = 1: the conditional one; D_w = D_0 + w (D_1 - D_0)."""
    module = randomised(build_module(load_config(overrides=[*TINY_DIFFUSION, *CONDITIONAL])))
    labels = torch.arange(5) % 10
    net = module.sampling_network()
    x, t = torch.randn(5, 1, 8, 8), 300.0
    with torch.no_grad():
        conditional, unconditional, guided = (
            guided_denoiser(net, module.process, module.objective, labels, w, 10)(x, t) for w in (1.0, 0.0, 3.0))
    assert not torch.allclose(conditional, unconditional)
    torch.testing.assert_close(guided, unconditional + 3.0 * (conditional - unconditional), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # sampler.clip_denoised: D clamped to the data range after guidance
        clipped = guided_denoiser(net, module.process, module.objective, labels, 3.0, 10, clip=True)(x, t)
    assert guided.abs().max() > 1 and torch.equal(clipped, guided.clamp(-1, 1))


def test_the_loss_is_logged_by_noise_level_and_charted(tmp_path):
    from dgm_scale.families.diffusion.module import loss_by_noise_level

    binned = loss_by_noise_level(torch.tensor([1.0, 2.0, 3.0, 5.0]), torch.tensor([0.05, 0.5, 0.7, 20.0]))
    assert {k: v.item() for k, v in binned.items()} == {"loss_sigma_0_0.1": 1.0, "loss_sigma_0.1_1.0": 2.5,
                                                        "loss_sigma_10.0_inf": 5.0}
    train(load_config(overrides=[*TINY_DIFFUSION, "loss.objective=edm", "data.batch_size=64", f"run.dir={tmp_path}"]))
    rows = metrics_rows(tmp_path)
    binned = [key for key in rows[-1] if key.startswith("train/loss_sigma_") and rows[-1][key] != ""]
    assert len(binned) >= 3  # ln sigma ~ N(-1.2, 1.2^2): 64 draws reach three bins
    assert (tmp_path / "plots" / "loss_by_noise.png").is_file()


def test_label_dropout_and_hidden_labels_become_no_class():
    module = build_module(load_config(overrides=[*TINY_DIFFUSION, "model.num_classes=10", "model.label_dropout=0.3"]))
    labels = module.training_labels(torch.tensor([4, 5, -1, 7]), torch.tensor([0.1, 0.5, 0.9, 0.29]))
    assert labels.tolist() == [10, 5, 10, 10]
    assert build_module(load_config(overrides=TINY_DIFFUSION)).training_labels(torch.tensor([1]), torch.zeros(1)) is None


def test_the_ema_denoiser_samples_and_the_raw_one_is_a_variant(tmp_path):
    result = train(load_config(overrides=[*TINY_DIFFUSION, "loss.objective=flow", "model.ema_decay=0.9", f"run.dir={tmp_path / 'run'}"]))
    module = load_module(result.checkpoint)
    assert set(module.sampler_variants()) == {"", "raw"}
    ema, raw = dict(module.denoiser_ema.named_parameters()), dict(module.denoiser.named_parameters())
    assert any(not torch.equal(ema[name], raw[name]) for name in raw)
    assert not torch.equal(module.sample_batch(2, variant="raw"), module.sample_batch(2))
    assert [row["train/ema_decay"] for row in metrics_rows(tmp_path / "run")][-1] != ""


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_two_ranks_stay_identical_and_equal_one_rank_with_their_batch(strategy, tmp_path):
    """2 processes (DDP with your own denoiser, or DeepSpeed ZeRO-2 with the U-Net) x batch 8 train
    the weights of 1 process x batch 16: every draw (noise levels, noise, label dropout) is the
    global batch's, split across ranks like the data."""
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    common = [*TINY_DIFFUSION, *CONDITIONAL, "loss.objective=edm"]
    if strategy == "ddp":  # your own denoiser by class path, under torchrun
        common += [f"model.denoiser.target={DENOISER}:Denoiser", "model.denoiser.kwargs.width=8"]
    proc = torchrun(["tests/ddp_worker.py", str(ROOT / "configs" / "edm.yaml"), str(tmp_path), *common,
                     "trainer.devices=2", f"trainer.strategy={strategy}", f"run.dir={tmp_path / 'ddp'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True)["params"] for r in (0, 1))
    single = dict(train(load_config(ROOT / "configs" / "edm.yaml", [*common, "data.batch_size=16",
                                                                       f"run.dir={tmp_path / 'one'}"])).module.named_parameters())
    assert ("denoiser.conv_mid.weight" in rank0) == (strategy == "ddp")  # the user's class / the U-Net
    for name, tensor in rank0.items():
        torch.testing.assert_close(tensor, rank1[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(tensor, single[name].detach(), rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("fmt, suffix", [("torchscript", "pt"),
                                         pytest.param("onnx", "onnx", marks=pytest.mark.slow)])  # (torch.export: ~25 s)
def test_a_deterministic_sampler_exports_and_makes_the_models_samples(fmt, suffix, tmp_path):
    from dgm_scale.export.build import export_module
    from dgm_scale.export.runtime import load_export

    module = randomised(build_module(load_config(overrides=[*TINY_DIFFUSION, *CONDITIONAL, "loss.objective=v",
                                                            "sampler.name=dpmpp_2m", "sampler.guidance=2"])))
    meta = export_module(module, tmp_path / f"sampler.{suffix}", fmt, dynamic_batch=True)
    assert [entry["name"] for entry in meta["inputs"]] == ["noise", "labels"]
    exported = load_export(tmp_path / f"sampler.{suffix}")
    inputs = module.export_inputs(5, seed=2, start=3)
    torch.testing.assert_close(exported(**inputs), module.sample_batch(5, seed=2, start=3), rtol=0, atol=1e-5)
    from dgm_scale.serve.sources import ExportSource, as_array  # `dgm-scale serve` of the file: the model's images

    served = ExportSource(tmp_path / f"sampler.{suffix}")
    assert served.meta["options"] == {} and served.meta["latent_dim"] is None
    assert (served.images(4, 3) == as_array(module.sample_batch(3, seed=4), "images")).all()
    module.cfg.sampler.name = "ddpm"  # stochastic: every step draws noise
    with pytest.raises(ConfigError) as error:
        export_module(module, tmp_path / f"ddpm.{suffix}", fmt)
    assert "sampler.name ddpm" in one_line(error.value) and not (tmp_path / f"ddpm.{suffix}").exists()


def test_your_own_denoiser_by_class_path_trains_and_samples_from_the_cli(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", *TINY_DIFFUSION, "loss.objective=flow", *CONDITIONAL, f"model.denoiser.target={DENOISER}:Denoiser",
                 "model.denoiser.kwargs.width=8", f"run.dir={run_dir}"]) == 0
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert type(load_module(checkpoint, trust_code=True).denoiser).__name__ == "Denoiser"
    assert main(["sample", str(checkpoint), "--trust-code", "--num", "4", "--sampler", "euler", "--steps", "4",
                 "--guidance", "2", "--class", "3", "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").is_file()
    for option, key in ((["--steps", "0"], "sampler.steps"), (["--sampler", "plms"], "sampler.name"),
                        (["--guidance", "-1"], "sampler.guidance")):
        assert main(["sample", str(checkpoint), "--trust-code", "--num", "2", *option, "--out", str(tmp_path / "x.png")]) == 2
        message = capsys.readouterr().err.strip()
        assert "\n" not in message and f"'{key}'" in message


@pytest.mark.parametrize("override, key", [
    (["loss.objective=x0"], "loss.objective"),
    (["loss.schedule=quadratic"], "loss.schedule"),
    (["loss.time_sampling=beta"], "loss.time_sampling"),
    (["sampler.name=plms"], "sampler.name"),
    (["sampler.steps=0"], "sampler.steps"),
    (["sampler.steps=20", "loss.timesteps=10"], "sampler.steps"),
    (["sampler.guidance=3"], "sampler.guidance"),  # an unconditional model
    ([*CONDITIONAL, "sampler.guidance=-1"], "sampler.guidance"),
    (["sampler.eta=2"], "sampler.eta"),
    (["sampler.sigma_min=100"], "sampler.sigma_min"),
    (["model.label_dropout=0.1"], "model.label_dropout"),  # an unconditional model
    (["model.denoiser.attention=[3]"], "model.denoiser.attention"),
    (["model.denoiser.channel_mult=[1,2,2,2,2]"], "model.denoiser.channel_mult"),
    (["data.name=ring8"], "model.kind"),
])
def test_bad_settings_stop_with_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as error:
        load_config(overrides=[*TINY_DIFFUSION, *override])
    assert f"'{key}'" in one_line(error.value)


def test_a_denoiser_of_the_wrong_shape_stops_before_training(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nclass Half(torch.nn.Module):\n"
                   "    def forward(self, x, noise_level, labels=None):\n        return x[:, :, ::2, ::2]\n")
    with pytest.raises(ConfigError) as error:
        train(load_config(overrides=[*TINY_DIFFUSION, f"model.denoiser.target={bad}:Half", f"run.dir={tmp_path / 'r'}"]))
    assert "'model.denoiser.target'" in one_line(error.value) and "[2, 1, 4, 4]" in str(error.value)
