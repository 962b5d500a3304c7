"""Non-finite guard: a NaN/inf loss, reward or gradient stops the stage before the optimiser step uses it.

The error names the stage and the step; the weights are left as they were after the last good step and the last
complete checkpoint stays on disk, so lowering the learning rate (or fixing the reward) and rerunning resumes from it.
Gradient-norm spikes (above ``SPIKE_FACTOR`` times the median of the recent norms) are logged, not fatal.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

from alignment.errors import UserError

SPIKE_FACTOR = 10.0
SPIKE_WINDOW = 20
SPIKE_MIN_HISTORY = 5


class NonFiniteError(UserError):
    """A NaN or inf in a loss, reward or gradient."""


def _bad(value) -> bool:
    import torch

    if torch.is_tensor(value):
        return not bool(torch.isfinite(value).all())
    return not math.isfinite(float(value))


def check_finite(stage: str, step: int, **values) -> None:
    """Raise NonFiniteError when any of ``values`` (name -> float or tensor) holds a NaN or inf."""
    for name, value in values.items():
        if value is not None and _bad(value):
            raise NonFiniteError(
                f"{stage}: non-finite {name} at step {step}; the stage stopped before applying it and its last "
                "complete checkpoint is kept: lower the learning rate (or fix the reward / data) and rerun to resume"
            )


def grad_norm(parameters) -> float:
    """The total L2 norm of the gradients of ``parameters`` (those without a gradient are skipped)."""
    import torch

    grads = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


class GradNormMonitor:
    """Checks each step's gradient norm: non-finite stops the stage, a spike is logged and counted."""

    def __init__(self, stage: str, logger=None):
        self.stage, self.logger = stage, logger
        self.recent: deque[float] = deque(maxlen=SPIKE_WINDOW)
        self.spikes = 0

    def check(self, step: int, norm: float) -> bool:
        """True when ``norm`` is a spike. Raises NonFiniteError when it is NaN or inf."""
        check_finite(self.stage, step, gradient=norm)
        spike = len(self.recent) >= SPIKE_MIN_HISTORY and norm > SPIKE_FACTOR * statistics.median(self.recent)
        self.recent.append(norm)
        if spike:
            self.spikes += 1
            median = statistics.median(list(self.recent)[:-1])
            from alignment.metrics import console

            console.print(f"[yellow]warning:[/yellow] {self.stage}: gradient-norm spike at step {step}: "
                          f"{norm:.3g} (recent median {median:.3g})")
            if self.logger is not None:
                self.logger.log(step, {"grad_norm_spike": norm, "grad_norm_median": median}, echo=False)
        return spike
