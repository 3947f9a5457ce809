"""A recurrent network over byte sequences: embeddings -> LSTM / GRU -> a 256-way softmax head.

    net = SequenceRNN(cell="lstm", layers=2, width=256, embed_dim=64, num_classes=0, positions=256)
    logits, state = net(tokens [N, T], labels [N] | None)   # -> [N, T, 256], the next symbol's logits

Inputs are symbols 0..255 and a start symbol (256). `positions` > 0 adds a learned embedding of
the step index (images: where in the raster scan a pixel is; the sequence length is then fixed);
`num_classes` > 0 adds a class embedding to every input (class-conditional models).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor, nn

SYMBOLS = 256
START = SYMBOLS  # the input symbol before the first one of an image
CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


class SequenceRNN(nn.Module):
    def __init__(self, cell: str = "lstm", layers: int = 2, width: int = 256, embed_dim: int = 64,
                 num_classes: int = 0, positions: int = 0, dropout: float = 0.0):
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"unknown cell {cell!r}; expected one of {', '.join(CELLS)}")
        self.num_classes, self.positions = num_classes, positions
        self.embed = nn.Embedding(SYMBOLS + 1, embed_dim)
        self.position = nn.Embedding(positions, embed_dim) if positions > 0 else None
        self.label = nn.Embedding(num_classes, embed_dim) if num_classes > 0 else None
        self.rnn = CELLS[cell](embed_dim, width, num_layers=layers, batch_first=True,
                               dropout=dropout if layers > 1 else 0.0)
        self.head = nn.Linear(width, SYMBOLS)

    def forward(self, tokens: Tensor, labels: Optional[Tensor] = None, state: Any = None,
                offset: int = 0) -> Tuple[Tensor, Any]:
        """tokens [N, T] (int64, 0..256) -> (logits [N, T, 256], recurrent state).

        `state` / `offset`: continue a sequence after `offset` steps with the state they left
        (sampling step by step)."""
        x = self.embed(tokens)
        if self.position is not None:
            steps = torch.arange(offset, offset + tokens.shape[1], device=tokens.device)
            x = x + self.position(steps.clamp(max=self.positions - 1))
        if self.label is not None:
            if labels is None:
                raise ValueError(f"this network is class-conditional (num_classes={self.num_classes}) and needs labels")
            x = x + self.label(labels.long()).unsqueeze(1)
        out, state = self.rnn(x, state)
        return self.head(out), state
