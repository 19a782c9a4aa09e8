"""Scalar heads (reward and value) reading the backbone's final hidden state."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class ScalarHead(nn.Module):
    """``Linear(hidden, 1)`` applied at every position.

    ``init="reward"``: weight ~ N(0, 1/sqrt(d+1)), bias 0 (Stiennon et al. 2020; docs/ppo-notes.md §C2).
    ``init="zero"``: weight and bias 0, so a fresh value head predicts 0 (Ziegler et al. 2019).
    ``bias``/``gain`` buffers hold the reward normalisation recorded after reward training:
    ``normalised = (raw - mean) / std`` is applied by :meth:`normalise`, never inside forward, so
    the raw score stays available.
    """

    def __init__(self, hidden_size: int, init: str = "reward"):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        if init == "reward":
            nn.init.normal_(self.linear.weight, std=1.0 / math.sqrt(hidden_size + 1))
        elif init == "zero":
            nn.init.zeros_(self.linear.weight)
        else:
            raise ValueError(f"head init {init!r}: choose reward or zero")
        nn.init.zeros_(self.linear.bias)

    detach_input = False   # a value head on the policy's trunk with value.stop_gradient: trains itself only

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.detach_input:
            hidden = hidden.detach()
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)
