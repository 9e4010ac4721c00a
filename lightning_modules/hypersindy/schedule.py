"""The beta (KL weight) and lambda (L0 weight) schedules of HyperSINDy, with spikes and threshold epochs."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class LossWeights:
    """Current beta and lambda and their caps; stored in checkpoints so a resumed run continues exactly."""

    beta: float
    lam: float
    beta_max: float
    lambda_max: float

    def state_dict(self) -> dict[str, float]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, float]) -> None:
        for key, value in state.items():
            setattr(self, key, float(value))


@dataclass
class ScheduleEpochs:
    """Epoch counts of the schedule after scaling to the run length (all >= 1)."""

    beta_warmup: int
    threshold_interval: int
    beta_spike_epoch: int | None
    lambda_spike_epoch: int | None


def scale_epochs(
    epochs: dict[str, int | None], reference_epochs: int | None, max_epochs: int | None
) -> dict[str, int | None]:
    """Scale epoch counts by max_epochs / reference_epochs, rounded and at least 1.

    The counts stay unchanged when either run length is None.
    """
    if reference_epochs is None or max_epochs is None or max_epochs < 0 or max_epochs == reference_epochs:
        return dict(epochs)
    factor = max_epochs / reference_epochs
    return {k: (None if v is None else max(1, round(v * factor))) for k, v in epochs.items()}


def advance(
    weights: LossWeights,
    epoch: int,
    warmup: int,
    beta_spike: float | None,
    beta_spike_epoch: int | None,
    lambda_spike: float | None,
    lambda_spike_epoch: int | None,
) -> None:
    """Update the weights at the end of 0-based epoch `epoch`.

    beta grows by beta_max / warmup per epoch up to beta_max (so beta(e) = min(beta_0 + 0.1 e, 10) with the
    published settings 10 and 100); lambda moves to lambda_max. When epoch + 1 is a spike epoch, the value and its cap
    become the spike value, which therefore holds from the spike epoch on.
    """
    weights.beta = min(weights.beta + weights.beta_max / warmup, weights.beta_max)
    weights.lam = min(weights.lam + weights.lambda_max, weights.lambda_max)
    if beta_spike is not None and beta_spike_epoch is not None and epoch + 1 == beta_spike_epoch:
        weights.beta = weights.beta_max = float(beta_spike)
    if lambda_spike is not None and lambda_spike_epoch is not None and epoch + 1 == lambda_spike_epoch:
        weights.lam = weights.lambda_max = float(lambda_spike)


def is_threshold_epoch(epoch: int, interval: int) -> bool:
    """Tell whether the mask update is due after 0-based epoch `epoch`: interval, 2 interval, ..., never 0."""
    return epoch > 0 and epoch % interval == 0
