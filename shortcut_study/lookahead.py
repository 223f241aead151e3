"""Lookahead as airbench uses it: every `every` optimizer steps the model's floating-point state
(weights and batch-norm statistics) is pulled toward a slow copy of itself, and the slow copy is
copied back. The pull ramps as (step / total)^3 from none to `decay`^`every`, so early training
runs at full speed and the end is averaged; after the last step the model *is* the slow copy."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Lookahead:
    def __init__(self, model: nn.Module, total_steps: int, decay: float, every: int = 5) -> None:
        self.model, self.total, self.decay, self.every = model, max(1, total_steps), decay, every
        self.steps = 0
        self.slow = {k: v.detach().clone() for k, v in self._state().items()}

    def _state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def _sync(self, weight: float) -> None:
        """slow <- slow + (1 - weight) (model - slow); model <- slow."""
        for key, current in self._state().items():
            slow = self.slow[key]
            slow.lerp_(current, 1.0 - weight)
            current.copy_(slow)

    def step(self) -> None:
        """After each optimizer step."""
        self.steps += 1
        if self.steps == self.total:
            self._sync(1.0)
        elif self.steps < self.total and self.steps % self.every == 0:
            self._sync(self.decay ** self.every * (self.steps / self.total) ** 3)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "slow": self.slow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.slow = {k: v.to(self.slow[k].device) for k, v in state["slow"].items()}
