"""The trajectory interface: a model's depth (or a recurrent model's time) as a sequence of token states.

A LightningModule that can be analysed defines

    def trajectory(self, batch) -> Trajectory

and the dynamical measures in `callbacks.dynamics` take that object and nothing else, so they run
unchanged on a ViT teacher, on Raptor and on the wave segmenter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Trajectory:
    """Token states of a batch at every step of depth or time.

    states: (B, S + 1, N, D) float tensor; step 0 is the state before the first layer or time step, so
        S is the number of layers or time steps. Tokens are N (ViT: cls, registers, patches; wave
        network: pixels) with D features each (ViT: width; wave network: hidden channels).
    token_groups: group name -> LongTensor of token indices, e.g. {"cls": [0], "reg": [1..4],
        "patch": [5..N-1]}; the measures report each group apart.
    labels: (B,) class per sample for the class-basin measures, or None.
    boundaries: phase boundaries as step indices (0 < b < S), drawn on every depth plot.
    rollout: continues the model from a state: rollout(state (B, N, D), step l) -> states at steps
        l..S as (B, S - l + 1, N, D); used by the perturbation test. It may keep per-sample inputs of the
        batch it was made from (the wave network keeps its velocities and frequencies), so callers pass
        states of exactly those B samples, in the same order. None when the model cannot resume from an
        arbitrary state.
    classify: maps final states (B, N, D) to class logits (B, n_classes), for label agreement after a
        perturbation. None when there is no such head.
    """

    states: torch.Tensor
    token_groups: dict[str, torch.Tensor]
    labels: torch.Tensor | None = None
    boundaries: list[int] = field(default_factory=list)
    rollout: Callable[[torch.Tensor, int], torch.Tensor] | None = None
    classify: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.states.dim() != 4:
            raise ValueError(
                f"Trajectory.states must have shape (B, steps, tokens, features); got {tuple(self.states.shape)}."
            )

    @property
    def num_steps(self) -> int:
        return self.states.shape[1] - 1
