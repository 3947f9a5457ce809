"""Evaluate a generator across all ranks: each rank makes and scores its share, one exact gather.

The `num_samples` latents are drawn at once from one seeded CPU generator and dealt to the ranks
in contiguous shares (`rank_share`), so W ranks produce exactly the samples of one process, and
`all_gather_features` returns them in the same order. Real features come from the on-disk cache
(rank 0 decides hit or miss and tells the others, so all ranks take the same collective path) or
are extracted the same way. Metrics are computed once, on rank 0, and broadcast: every rank logs
and acts on (best checkpoint) the same numbers.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from dgm_scale.data.transforms import from_8bit, to_8bit
from dgm_scale.metrics.cache import load_cached, save_cached
from dgm_scale.metrics.extractors import Extracted, FeatureExtractor, build_extractor
from dgm_scale.metrics.gather import all_gather_features, broadcast_object, rank_and_world
from dgm_scale.metrics.real_data import rank_share, real_batches, source_fingerprint
from dgm_scale.metrics.registry import METRICS, compute_metrics, known_metrics, resolve_options

log = logging.getLogger(__name__)


@dataclass
class EvalSettings:
    real: str  # real-data source spec (folder, shards, .npz, builtin:NAME)
    extractor: str  # a resolved extractor spec (see extractors.py)
    metrics: list[str] = field(default_factory=list)  # empty = fid, kid, pr, ndb (+ is with logits)
    num_samples: int = 2000  # generated samples
    num_real: int = 0  # real samples (a seeded subset); 0 = as many as num_samples, at most all
    seed: int = 0  # latents and the real subset
    batch_size: int = 250  # per rank, for generation and extraction
    options: dict[str, Any] = field(default_factory=dict)  # metric options (registry.OPTION_DEFAULTS)
    cache_dir: str = "~/.cache/dgm_scale"
    inception_weights: Optional[str] = None  # path or URL; None = the reference URL

    @property
    def has_sample_metrics(self) -> bool:
        """Whether generated samples are scored (the defaults, or a named sample metric)."""
        return not self.metrics or any(name in METRICS for name in self.metrics)

    @property
    def has_probe(self) -> bool:
        """Whether the model's features are probed (probe_metric.py)."""
        return "probe" in self.metrics


def _barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


def extract_all(extractor: FeatureExtractor, batches: Iterable[Tensor], sample_shape: tuple[int, ...],
                device: torch.device) -> Extracted:
    """Run the extractor over model-space batches -> Extracted of all rows (on `device`)."""
    features, logits = [], []
    for batch in batches:
        out = extractor(batch.to(device))
        features.append(out.features)
        if out.logits is not None:
            logits.append(out.logits)
    if not features:  # an empty share still joins the gather, with [0, D] rows of the right width
        out = extractor(torch.zeros(1, *sample_shape, device=device))
        return Extracted(out.features[:0], None if out.logits is None else out.logits[:0])
    return Extracted(torch.cat(features), torch.cat(logits) if logits else None)


def generated_batches(module, num: int, seed: int, batch_size: int, rank: int = 0, world: int = 1,
                      variant: str = ""):
    """This rank's share of `num` samples of `module`'s sampler `variant`, in batches.

    `module`: a GenerativeModule (anything with its `sample_batch`): sample i of the sequence
    `seed` is the same whichever rank and batch draws it; conditional models get class i % K.
    """
    start, end = rank_share(num, rank, world)
    for lo in range(start, end, batch_size):
        hi = min(lo + batch_size, end)
        samples = module.sample_batch(hi - lo, seed, lo, variant=variant)
        # Images are scored as the 8-bit images they are saved as (`sample --out-dir`): so a dump
        # of them scored with `dgm-scale fid` gives the numbers evaluation gives.
        yield from_8bit(to_8bit(samples)).to(samples.device) if samples.dim() == 4 else samples


def _gather(extracted: Extracted) -> Extracted:
    logits = None if extracted.logits is None else all_gather_features(extracted.logits.contiguous())
    return Extracted(all_gather_features(extracted.features.contiguous()), logits)


class Evaluator:
    """Holds the extractor and the real features of a run; `evaluate(module)` scores a generator."""

    def __init__(self, settings: EvalSettings, sample_shape: tuple[int, ...], device: torch.device,
                 extractor: Optional[FeatureExtractor] = None):
        """`extractor`: one already built from `settings` (by `prepare_evaluation`), else built here."""
        self.settings, self.sample_shape, self.device = settings, tuple(sample_shape), device
        resolve_options(settings.options)  # unknown option keys fail now, not after training
        unknown = [name for name in settings.metrics if name not in known_metrics()]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; known: {known_metrics()}")
        self.cache_dir = Path(settings.cache_dir).expanduser()
        rank, _ = rank_and_world()
        # Rank 0 downloads / trains the extractor first, the others then read its file.
        if rank != 0:
            _barrier()
        if extractor is None:
            extractor = build_extractor(settings.extractor, self.sample_shape, self.cache_dir,
                                        settings.inception_weights)
        self.extractor = extractor.to(device).eval()
        if rank == 0:
            _barrier()
        self._real: Optional[Tensor] = None
        self._real_ready = False  # on every rank: real_features() has run (the features are on rank 0)

    def metric_names(self) -> list[str]:
        """The sample metrics it computes (a model metric such as probe is scored elsewhere)."""
        if self.settings.metrics:
            return [name for name in self.settings.metrics if name in METRICS]
        names = [name for name in ("fid", "kid", "pr", "ndb") if name in METRICS]
        return names + (["is"] if self.extractor.has_logits else [])

    def key_parts(self) -> dict[str, Any]:
        s = self.settings
        return {"real": s.real, "fingerprint": source_fingerprint(s.real), "num_real": s.num_real or s.num_samples,
                "exact": s.num_real > 0, "seed": s.seed, "sample_shape": list(self.sample_shape),
                "extractor": self.extractor.key()}

    def real_features(self) -> Optional[Tensor]:
        """All real features [num_real, D] on rank 0 (None elsewhere); cached on disk and in memory.
        Every rank knows whether they are in memory (`_real_ready`): the ranks whose `_real` is
        None must not re-enter the collectives below while rank 0 goes on (a second sampler of
        the same evaluation, e.g. a GAN's raw generator, hung 2-process runs)."""
        if self._real_ready:
            return self._real
        rank, world = rank_and_world()
        key = self.key_parts()
        cached = load_cached(key, self.cache_dir) if rank == 0 else None
        if broadcast_object(cached is not None):
            self._real = cached if rank == 0 else None
            self._real_ready = True
            return self._real
        s = self.settings
        batches = real_batches(s.real, self.sample_shape, s.num_real or s.num_samples, s.seed, rank, world,
                               s.batch_size, exact=s.num_real > 0)
        local = extract_all(self.extractor, batches, self.sample_shape, self.device)
        features = all_gather_features(local.features.contiguous()).cpu()
        if rank == 0:
            path = save_cached(key, features, self.cache_dir)
            log.info("cached %d real features of %s -> %s", len(features), s.real, path)
            self._real = features
        self._real_ready = True
        return self._real

    @torch.no_grad()
    def evaluate(self, module, variant: str = "") -> dict[str, float]:
        """Metrics of `module`'s sampler `variant` (every rank calls this; all get rank 0's results)."""
        s = self.settings
        rank, world = rank_and_world()
        return self.score(generated_batches(module, s.num_samples, s.seed, s.batch_size, rank, world, variant))

    @torch.no_grad()
    def score(self, batches: Iterable[Tensor]) -> dict[str, float]:
        """Metrics of this rank's share of the compared samples (model-space batches) against the
        real data (every rank calls this; all get rank 0's results)."""
        s = self.settings
        rank, _ = rank_and_world()
        start = time.perf_counter()
        real = self.real_features()
        fake = _gather(extract_all(self.extractor, batches, self.sample_shape, self.device))
        results = None
        if rank == 0:
            logits = None if fake.logits is None else fake.logits.cpu().double()
            fake_features = fake.features.cpu().double()
            results = compute_metrics(self.metric_names(), real.double(), fake_features, logits, s.options)
            results["eval_seconds"] = time.perf_counter() - start
        return broadcast_object(results)


def eval_settings(cfg) -> EvalSettings:
    """EvalSettings from a run config's `eval` block, with `auto` resolved against `data`."""
    from dgm_scale.metrics.extractors import resolve_extractor_spec
    from dgm_scale.metrics.real_data import data_source_spec

    ev = cfg.eval
    return EvalSettings(
        real=data_source_spec(cfg.data) if ev.real == "auto" else str(ev.real),
        extractor=resolve_extractor_spec(str(ev.extractor), cfg.data.name),
        metrics=list(ev.metrics), num_samples=int(ev.num_samples), num_real=int(ev.num_real), seed=int(ev.seed),
        batch_size=int(ev.batch_size), options=dict(ev.options), cache_dir=str(ev.cache_dir),
        inception_weights=ev.inception_weights)


def scores_samples(cfg) -> bool:
    """Whether a run's samples are scored against real data (images, 2-D points; not text)."""
    from dgm_scale.data.config import modality_of

    return modality_of(cfg.data.name) != "text"


def _summed_over_ranks(module, batches: Iterable, rows: int,
                       score: Callable[[Any, int], Optional[Tensor]]) -> Optional[Tensor]:
    """The sum of score(batch, index) -> float64 [rows, 2] (a total, the count it is over) over
    `batches`: every rank passes the same batches in the same order and scores every W-th, then
    the sums are all-reduced, so the result does not depend on the world size. None as soon as
    `score` gives None (a model without such a score)."""
    rank, world = rank_and_world()
    totals = torch.zeros(rows, 2, dtype=torch.float64)
    for index, batch in enumerate(batches):
        if index % world != rank:
            continue
        scored = score(batch, index)
        if scored is None:
            return None
        totals += scored
    if world > 1:
        totals = totals.to(module.device)
        dist.all_reduce(totals)
        totals = totals.cpu()
    return totals


@torch.no_grad()
def heldout_likelihood(module, batches: Iterable) -> dict[str, float]:
    """The held-out negative log-likelihood of a family that has one (`heldout_nll`): bits per
    dim (images) or per character (text), over `batches` (see _summed_over_ranks); {} for
    families without a likelihood."""
    def nll(batch, index: int) -> Optional[Tensor]:
        scored = module.heldout_nll(batch, seed=index)
        return None if scored is None else torch.tensor([[float(scored[0]), float(scored[1])]], dtype=torch.float64)

    totals = _summed_over_ranks(module, batches, 1, nll)
    if totals is None or totals[0, 1] == 0:
        return {}
    name = "bits_per_char" if module.modality == "text" else "bits_per_dim"
    return {name: float(totals[0, 0] / totals[0, 1] / math.log(2.0))}


@torch.no_grad()
def heldout_averages(module, batches: Iterable) -> dict[str, float]:
    """The module's `heldout_scores` (e.g. a classifier's test_accuracy) averaged over the
    held-out samples of `batches`: per name, the sum over all samples / their number (see
    _summed_over_ranks: every rank returns the same numbers, whatever the world size); {} for a
    model without them."""
    names = list(module.heldout_score_names)
    if not names:
        return {}

    def scores(batch, index: int) -> Tensor:
        rows = torch.zeros(len(names), 2, dtype=torch.float64)
        for name, (total, count) in module.heldout_scores(batch).items():
            rows[names.index(name)] += torch.tensor([float(total), float(count)], dtype=torch.float64)
        return rows

    totals = _summed_over_ranks(module, batches, len(names), scores)
    return {name: float(totals[i, 0] / totals[i, 1]) for i, name in enumerate(names) if totals[i, 1] > 0}


def evaluate_module(module, evaluator: Optional["Evaluator"], heldout: Optional[Iterable] = None,
                    probe=None) -> dict[str, float]:
    """Everything an evaluation reports: the sample metrics of each of the module's samplers
    (the default one unprefixed, e.g. fid; another as `raw/fid`), the held-out likelihood, the
    held-out scores and, with a `probe` (probe_metric.ProbeEvaluator), the model's probe_*
    (once: not per sampler)."""
    results: dict[str, float] = {}
    if evaluator is not None and evaluator.metric_names():
        for variant in module.sampler_variants():
            prefix = f"{variant}/" if variant else ""
            results.update({prefix + name: value for name, value in evaluator.evaluate(module, variant).items()})
    if heldout is not None:
        if module.has_likelihood:
            results.update(heldout_likelihood(module, heldout))
        results.update(heldout_averages(module, heldout))
    if probe is not None:
        results.update(probe.evaluate(module))
    return results


def prepare_evaluation(cfg, module=None) -> Optional[FeatureExtractor]:
    """Before training: fetch / build the extractor the run's evaluations will use (download the
    Inception weights, train the digits classifier), so that a bad eval setup stops the run before
    its directory exists; the run's Evaluator then takes it as it is. With the `probe` metric, check
    that `module` (the run's model) encodes and the real data has the labels it needs. None without
    evaluations or sample metrics. ConfigError names the config key at fault (a bad real-data
    source fails as a DataError)."""
    from dgm_scale.config import ConfigError
    from dgm_scale.metrics.probe_metric import ProbeEvaluator
    from dgm_scale.modules.base import sample_shape

    if (cfg.eval.every == 0 and not cfg.eval.at_end) or not scores_samples(cfg):
        return None
    settings = eval_settings(cfg)
    if settings.has_probe and module is not None:
        ProbeEvaluator(settings, sample_shape(cfg.data)).check(module)
    if not settings.has_sample_metrics:
        return None
    try:
        return build_extractor(settings.extractor, sample_shape(cfg.data), Path(settings.cache_dir).expanduser(),
                               settings.inception_weights)
    except ValueError as error:
        raise ConfigError(f"config key 'eval.extractor' ({settings.extractor}): {error} - set eval.inception_weights, "
                          "another eval.extractor, or eval.every=0 eval.at_end=false") from None
