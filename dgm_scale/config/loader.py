"""Load a config: schema defaults <- YAML file <- `key=value` overrides, validated once.

Every problem is raised as a `ConfigError` whose message is one line naming the config key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dgm_scale.config.schema import Config


class ConfigError(ValueError):
    """A config problem; the message is one line and names the offending key or file."""


def _one_line(exc: OmegaConfBaseException) -> str:
    """OmegaConf's messages span several lines; keep the key and the first line of the reason."""
    key = getattr(exc, "full_key", None) or "<config>"
    reason = (getattr(exc, "msg", None) or str(exc)).splitlines()[0].strip()
    if "not in" in reason and "Key" in reason:
        return f"unknown config key '{key}'"
    return f"config key '{key}': {reason}"


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{source}: {_one_line(exc)}") from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Return the validated, read-only-structured config (unknown keys are errors)."""
    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, True)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            file_cfg = OmegaConf.load(path)
        except Exception as exc:  # YAML syntax errors
            raise ConfigError(f"config file '{path}': {str(exc).splitlines()[0]}") from None
        cfg = _merge(cfg, file_cfg, str(path))
        if not cfg.run.name:
            cfg.run.name = path.stem
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        if item.startswith("resume="):  # the short form users type: `dgm-scale train ... resume=auto`
            item = "run." + item
        try:
            override = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as exc:
            raise ConfigError(f"override '{item}': {_one_line(exc)}") from None
        cfg = _merge(cfg, override, f"override '{item}'")
    if not cfg.run.name:
        cfg.run.name = "default"
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> DictConfig:
    """Rebuild a validated config from a plain dict (e.g. the one stored in a checkpoint)."""
    cfg = _merge(OmegaConf.structured(Config), data, "stored config")
    validate(cfg)
    return cfg


def _is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _choice(key: str, value: Any, allowed: Sequence[str]) -> None:
    _require(value in allowed, f"config key '{key}': '{value}' is not one of {', '.join(map(str, allowed))}")


def validate(cfg: DictConfig) -> None:
    """Check value ranges and combinations that types alone cannot express."""
    # Registries are imported here, not at module level, so that the schema stays import-light.
    from dgm_scale.data.datasets import DATASETS, STREAM_DATASETS, TOY_DATASETS
    from dgm_scale.distributed.strategy import STRATEGIES
    from dgm_scale.losses.adversarial import ADVERSARIAL_LOSSES
    from dgm_scale.losses.vae import LIKELIHOODS
    from dgm_scale.nets import ARCHS, NORMS

    data, model, loss = cfg.data, cfg.model, cfg.loss
    _choice("data.name", data.name, sorted(DATASETS) + list(STREAM_DATASETS))
    _choice("model.kind", model.kind, ["gan", "vae"])
    _choice("loss.name", loss.name, sorted(ADVERSARIAL_LOSSES))
    _choice("loss.likelihood", loss.likelihood, sorted(LIKELIHOODS))
    for net_key in ("generator", "discriminator"):
        net = model[net_key]
        _choice(f"model.{net_key}.arch", net.arch, sorted(ARCHS))
        _choice(f"model.{net_key}.norm", net.norm, list(NORMS))
        _require(not (net.arch == "mlp" and net.norm == "instance"),
                 f"config key 'model.{net_key}.norm': instance norm is not defined for the mlp arch")
        _require(net.width >= 1, f"config key 'model.{net_key}.width' must be >= 1, got {net.width}")
        _require(net.depth >= 1, f"config key 'model.{net_key}.depth' must be >= 1, got {net.depth}")
    for opt_key in ("g", "d"):
        opt = cfg.optim[opt_key]
        _choice(f"optim.{opt_key}.name", opt.name, ["adam", "rmsprop"])
        _require(opt.lr > 0, f"config key 'optim.{opt_key}.lr' must be > 0, got {opt.lr}")
        _require(len(opt.betas) == 2, f"config key 'optim.{opt_key}.betas' needs 2 values, got {list(opt.betas)}")

    if data.name in TOY_DATASETS:
        _require(data.toy_samples >= 1, f"config key 'data.toy_samples' must be >= 1, got {data.toy_samples}")
        _require(data.toy_std > 0, f"config key 'data.toy_std' must be > 0, got {data.toy_std}")
        for net_key in ("generator", "discriminator"):
            _require(model[net_key].arch == "mlp",
                     f"config key 'model.{net_key}.arch': 2-D toy data '{data.name}' needs arch 'mlp', "
                     f"got '{model[net_key].arch}'")
        _require(model.kind == "gan", f"config key 'model.kind': toy data '{data.name}' is for GANs")
    else:
        res = data.resolution
        _require(_is_power_of_two(res) and 8 <= res <= 256,
                 f"config key 'data.resolution' must be a power of two in [8, 256], got {res}")
        _choice("data.channels", data.channels, [1, 3])
    if data.name in ("folder", "shards"):
        _require(bool(data.path), f"config key 'data.path' is required when data.name={data.name}")
    if data.name == "shards":
        datasets = 1 + len(data.mix)
        _require(len(data.weights) in (0, datasets), f"config key 'data.weights': {len(data.weights)} weights for "
                                                     f"{datasets} datasets (data.path + data.mix)")
        _require(all(w > 0 for w in data.weights), f"config key 'data.weights' must be > 0, got {list(data.weights)}")
        _require(data.shuffle_buffer >= 1, f"config key 'data.shuffle_buffer' must be >= 1, got {data.shuffle_buffer}")
        _require(not data.resampled or data.steps_per_epoch >= 1,
                 "config key 'data.steps_per_epoch' must be >= 1 with data.resampled=true")
    _require(data.batch_size >= 1, f"config key 'data.batch_size' must be >= 1, got {data.batch_size}")
    _require(0.0 <= data.val_fraction < 1.0, f"config key 'data.val_fraction' must be in [0, 1), got {data.val_fraction}")

    _require(loss.n_critic >= 1, f"config key 'loss.n_critic' must be >= 1, got {loss.n_critic}")
    _require(loss.gp_weight >= 0, f"config key 'loss.gp_weight' must be >= 0, got {loss.gp_weight}")
    _require(loss.clip_value >= 0, f"config key 'loss.clip_value' must be >= 0, got {loss.clip_value}")
    _require(loss.beta >= 0, f"config key 'loss.beta' must be >= 0, got {loss.beta}")
    # Batch norm couples the samples of a batch, so the per-sample gradient the penalty constrains
    # is no longer the critic's gradient (Gulrajani et al. 2017, sec. 4): reject it outright.
    if model.kind == "gan" and loss.gp_weight > 0:
        _require(model.discriminator.norm != "batch",
                 "config key 'model.discriminator.norm': batch norm is invalid in a WGAN-GP critic "
                 "(loss.gp_weight > 0); use layer, instance or none")
    _require(0.0 <= model.ema_decay < 1.0, f"config key 'model.ema_decay' must be in [0, 1), got {model.ema_decay}")
    _require(model.latent_dim >= 1, f"config key 'model.latent_dim' must be >= 1, got {model.latent_dim}")
    _require(model.num_classes >= 0, f"config key 'model.num_classes' must be >= 0, got {model.num_classes}")
    if model.kind == "vae":
        _require(model.num_classes == 0, "config key 'model.num_classes': the VAE is unconditional")

    trainer, run = cfg.trainer, cfg.run
    _require(trainer.max_steps >= 1, f"config key 'trainer.max_steps' must be >= 1, got {trainer.max_steps}")
    _choice("trainer.precision", trainer.precision, ["32-true", "32", "bf16-mixed", "16-mixed", "bf16-true"])
    _choice("trainer.strategy", trainer.strategy, STRATEGIES)
    if trainer.strategy == "deepspeed":
        stage = trainer.deepspeed.get("zero_optimization", {}).get("stage", 0)
        # Our forwards use the raw networks (an engine's forward breaks the gradient penalty);
        # ZeRO-3 partitions the parameters themselves, so those forwards would see empty tensors.
        _require(stage in (0, 1, 2), f"config key 'trainer.deepspeed.zero_optimization.stage': {stage} is not "
                                     "supported (use 0, 1 or 2: ZeRO-3 partitions the weights our forwards need)")
        _require(not (trainer.precision == "16-mixed" and trainer.accelerator == "cpu"),
                 "config key 'trainer.precision': DeepSpeed's fp16 needs a GPU; on CPU use bf16-mixed or 32-true")
    _require(trainer.devices >= 1 and trainer.num_nodes >= 1,
             f"config key 'trainer.devices' / 'trainer.num_nodes' must be >= 1, got {trainer.devices} / {trainer.num_nodes}")
    _require(trainer.log_every >= 1, f"config key 'trainer.log_every' must be >= 1, got {trainer.log_every}")
    _choice("trainer.nonfinite", trainer.nonfinite, ["stop", "skip"])
    _require(trainer.max_nonfinite_skips >= 0,
             f"config key 'trainer.max_nonfinite_skips' must be >= 0, got {trainer.max_nonfinite_skips}")
    _require(run.sample_every >= 1, f"config key 'run.sample_every' must be >= 1, got {run.sample_every}")
    _require(run.checkpoint_every >= 1, f"config key 'run.checkpoint_every' must be >= 1, got {run.checkpoint_every}")
    _require(run.keep_checkpoints >= 0, f"config key 'run.keep_checkpoints' must be >= 0, got {run.keep_checkpoints}")
    _require(run.num_samples >= 1, f"config key 'run.num_samples' must be >= 1, got {run.num_samples}")
    _choice("tracking.wandb.mode", cfg.tracking.wandb.mode, ["auto", "online", "offline", "disabled"])
    _validate_eval(cfg)


def _validate_eval(cfg: DictConfig) -> None:
    from dgm_scale.data.datasets import TOY_DATASETS
    from dgm_scale.metrics.registry import METRICS, OPTION_DEFAULTS

    ev = cfg.eval
    _require(ev.every >= 0, f"config key 'eval.every' must be >= 0, got {ev.every}")
    _require(ev.num_samples >= 2, f"config key 'eval.num_samples' must be >= 2, got {ev.num_samples}")
    _require(ev.num_real >= 0, f"config key 'eval.num_real' must be >= 0, got {ev.num_real}")
    _require(ev.batch_size >= 1, f"config key 'eval.batch_size' must be >= 1, got {ev.batch_size}")
    unknown = [name for name in ev.metrics if name not in METRICS]
    _require(not unknown, f"config key 'eval.metrics': unknown metric(s) {unknown}; known: {sorted(METRICS)}")
    unknown = sorted(set(ev.options) - set(OPTION_DEFAULTS))
    _require(not unknown, f"config key 'eval.options': unknown option(s) {unknown}; known: {sorted(OPTION_DEFAULTS)}")
    kind = str(ev.extractor).partition(":")[0]
    _choice("eval.extractor", kind, ["auto", "inception", "classifier", "digits", "identity"])
    toy = cfg.data.name in TOY_DATASETS
    _require(not toy or kind in ("auto", "identity"),
             f"config key 'eval.extractor': 2-D toy data '{cfg.data.name}' is scored with 'identity', not '{ev.extractor}'")
    _require(toy or kind != "identity", "config key 'eval.extractor': 'identity' is for the 2-D toy data")
    _require(not ev.best_metric or ev.best_metric in ("fid", "kid_mean", "ndb", "ndb_fraction"),
             f"config key 'eval.best_metric': '{ev.best_metric}' is not a lower-is-better metric "
             "(fid, kid_mean, ndb, ndb_fraction) or ''")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
