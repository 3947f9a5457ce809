"""The autoregressive Lightning module: teacher forcing on byte sequences, exact likelihood,
step-by-step sampling with keyed noise."""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgm_scale.data.transforms import from_8bit, to_8bit
from dgm_scale.modules.base import GenerativeModule
from dgm_scale.modules.optim import build_optimizer
from dgm_scale.modules.sampling import MAX_TEMPERATURE, keyed_noise, sampler_inputs
from dgm_scale.nets.custom import build_within_memory
from dgm_scale.nets.sequence import START, SYMBOLS, SequenceRNN

#: the context of a text sample without a prompt (training windows start anywhere in the text)
TEXT_START = b"\n"


def image_to_symbols(images: Tensor) -> Tensor:
    """Images [N, C, H, W] in [-1, 1] -> raster-scan 8-bit symbols [N, H * W * C] (int64):
    row by row, left to right, a pixel's channels in order."""
    return to_8bit(images).permute(0, 2, 3, 1).flatten(1)


def symbols_to_image(symbols: Tensor, shape: Tuple[int, int, int]) -> Tensor:
    """The inverse of image_to_symbols: [N, H * W * C] -> [N, C, H, W] in [-1, 1]."""
    channels, height, width = shape
    return from_8bit(symbols.reshape(-1, height, width, channels).permute(0, 3, 1, 2))


class AutoregressiveModule(GenerativeModule):
    has_likelihood = True

    def __init__(self, config: dict):
        super().__init__(config)
        model = self.cfg.model
        self.automatic_optimization = False
        images = self.modality == "images"
        self.sequence_length = math.prod(self.sample_shape) if images else self.cfg.data.seq_len
        self.rnn = build_within_memory("model", lambda: SequenceRNN(
            model.cell, model.layers, model.width, model.embed_dim, self.num_classes,
            positions=self.sequence_length if images else 0, dropout=model.dropout))

    def configure_optimizers(self):
        return build_optimizer(self.rnn.parameters(), self.cfg.optim)

    def networks(self) -> dict:
        return {"rnn": self.rnn}

    # ------------------------------------------------------------------ likelihood
    def inputs_and_targets(self, batch) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """(inputs [N, T], targets [N, T], labels) of a batch. Images: the symbols after a start
        symbol; text windows of T + 1 bytes: the first T, and the last T."""
        x, labels = batch[0], batch[1]
        labels = labels.to(self.device) if self.num_classes > 0 else None
        if self.modality == "images":
            targets = image_to_symbols(x.to(self.device))
            start = torch.full_like(targets[:, :1], START)
            return torch.cat([start, targets[:, :-1]], dim=1), targets, labels
        tokens = x.to(self.device).long()
        return tokens[:, :-1], tokens[:, 1:], labels

    def nll_per_symbol(self, batch) -> Tensor:
        """Negative log-likelihood [N, T] in nats of every target symbol (float32)."""
        inputs, targets, labels = self.inputs_and_targets(batch)
        logits, _ = self.compiled("rnn")(inputs, labels)
        return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")

    def encode_features(self, images: Tensor, labels: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """`hidden`: the top recurrent layer's state [N, width] after reading the start symbol and
        all C*H*W symbols of each image (the last symbol's position is the last one learned)."""
        if self.modality != "images":
            raise NotImplementedError("the autoregressive family encodes images; this model reads text")
        symbols = image_to_symbols(images.to(self.device))
        inputs = torch.cat([torch.full_like(symbols[:, :1], START), symbols], dim=1)
        _, state = self.rnn(inputs, labels.to(self.device) if self.num_classes > 0 and labels is not None else None)
        hidden = state[0] if isinstance(state, tuple) else state  # LSTM: (h, c); GRU: h - each [layers, N, width]
        return {"hidden": hidden[-1].float()}

    @torch.no_grad()
    def heldout_nll(self, batch, seed: int = 0) -> Optional[Tuple[Tensor, int]]:
        """The exact -log P of the batch's symbols (nats, summed), and how many there are."""
        was_training = self.rnn.training
        self.rnn.eval()
        try:
            nll = self.nll_per_symbol(batch)
        finally:
            self.rnn.train(was_training)
        return nll.sum(), nll.numel()

    def training_step(self, batch, batch_idx: int) -> None:
        opt = self.optimizers()
        log_now = self.logging_due()  # before the step, which advances the iteration
        loss = self.nll_per_symbol(batch).mean()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss, opt)
        self.guarded_step(loss, opt, self.rnn, "autoregressive model")
        if not log_now:
            return
        unit = "bits_per_char" if self.modality == "text" else "bits_per_dim"
        self.log_train({"nll": loss.detach(), unit: loss.detach() / math.log(2.0)})
        self.log(unit, loss.detach() / math.log(2.0), prog_bar=True, logger=False)

    # ------------------------------------------------------------------ sampling
    def _prompt(self, num: int, prompt: Optional[str]) -> Tensor:
        if self.modality == "images":
            if prompt is not None:
                raise ValueError("a prompt is for text models; this one models images")
            return torch.full((num, 1), START, dtype=torch.long, device=self.device)
        encoded = TEXT_START if prompt is None else prompt.encode("utf-8")
        if not encoded:
            raise ValueError("the prompt is empty")
        return torch.tensor(list(encoded), dtype=torch.long, device=self.device).expand(num, -1)

    @torch.no_grad()
    def sampling_controls(self) -> Dict[str, Dict[str, Any]]:
        """The softmax's temperature in (0, MAX_TEMPERATURE], default the model's."""
        return {"temperature": {"default": float(self.cfg.model.temperature), "max": MAX_TEMPERATURE}}

    def sample_batch(self, num: int, seed: int = 0, start: int = 0, labels: Optional[Tensor] = None,
                     variant: str = "", temperature: Optional[float] = None, prompt: Optional[str] = None,
                     length: Optional[int] = None, **options: Any) -> Tensor:
        """Images [num, C, H, W] in [-1, 1], or text [num, len(prompt) + length] bytes (the prompt,
        default a newline, then `length` sampled bytes, default data.seq_len). Each symbol is
        drawn by inverting the softmax's CDF (at `temperature`) at a uniform number keyed to
        (seed, sample index, step)."""
        if options or variant:
            raise ValueError(f"unknown sampling option(s) for the autoregressive family: "
                             f"{sorted(options) + (['variant'] if variant else [])}")
        temperature = self.cfg.model.temperature if temperature is None else float(temperature)
        if temperature <= 0:
            raise ValueError(f"the temperature must be > 0, got {temperature}")
        if length is not None and (self.modality == "images" or length < 1):
            raise ValueError("length is for text models and must be >= 1")
        steps = self.sequence_length if self.modality == "images" else int(length or self.cfg.data.seq_len)
        labels = self.default_labels(num, start) if labels is None else labels.to(self.device)
        context = self._prompt(num, prompt)
        uniforms = keyed_noise(seed, start, num, (steps,), uniform=True).to(self.device)
        was_training = self.rnn.training
        self.rnn.eval()
        try:
            drawn = self._draw(context, labels, uniforms, temperature)
        finally:
            self.rnn.train(was_training)
        if self.modality == "images":
            return symbols_to_image(drawn, self.sample_shape)
        return torch.cat([context, drawn], dim=1)

    def _draw(self, context: Tensor, labels: Optional[Tensor], uniforms: Tensor, temperature: float) -> Tensor:
        return draw_symbols(self.rnn, context, labels, uniforms, temperature)

    # The sampler's loop is unrolled into one step per symbol: TorchScript traces that in seconds,
    # torch.export and the ONNX exporter (built on it) did not finish in minutes for 256 steps.
    export_formats = ("torchscript",)

    def export_network(self, variant: str = "") -> nn.Module:
        if self.modality != "images" or variant:
            raise NotImplementedError("the autoregressive family exports image models (text sampling takes "
                                      "prompts of any length)")
        return ImageSampler(copy.deepcopy(self.rnn).cpu().eval(), float(self.cfg.model.temperature),
                            self.sample_shape)

    def export_inputs(self, num: int, seed: int = 0, start: int = 0) -> Dict[str, Tensor]:
        return sampler_inputs(seed, start, num, "uniforms", (self.sequence_length,), self.num_classes)

    def sampler_variants(self) -> Dict[str, str]:
        return {"": f"samples at temperature {self.cfg.model.temperature}"}


def draw_symbols(rnn: SequenceRNN, context: Tensor, labels: Optional[Tensor], uniforms: Tensor,
                 temperature: float) -> Tensor:
    """Symbols [N, steps] continuing `context` [N, P], one step at a time: step t's symbol is where
    uniforms[:, t] falls in the CDF of the softmax at `temperature` (the count of CDF entries
    below it: searchsorted's answer, written with ops every export format has)."""
    logits, state = rnn(context, labels)
    offset = context.shape[1]
    drawn = []
    for step in range(uniforms.shape[1]):
        cdf = torch.softmax(logits[:, -1].float() / temperature, dim=-1).cumsum(dim=-1)
        below = cdf < uniforms[:, step:step + 1] * cdf[:, -1:]
        symbol = below.sum(dim=-1, keepdim=True).clamp(max=SYMBOLS - 1)
        drawn.append(symbol)
        if step + 1 < uniforms.shape[1]:
            logits, state = rnn(symbol, labels, state, offset=offset)
            offset += 1
    return torch.cat(drawn, dim=1)


class ImageSampler(nn.Module):
    """uniforms [N, C*H*W] in [0, 1) (+ labels [N]) -> images [N, C, H, W] in [-1, 1]: an image
    model's sampler on its own, the network `dgm-scale export` traces (its loop unrolled)."""

    def __init__(self, rnn: SequenceRNN, temperature: float, shape: Tuple[int, int, int]):
        super().__init__()
        self.rnn, self.temperature, self.shape = rnn, temperature, tuple(shape)

    def forward(self, uniforms: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        context = torch.full_like(uniforms[:, :1], START, dtype=torch.long)
        return symbols_to_image(draw_symbols(self.rnn, context, labels, uniforms, self.temperature), self.shape)
