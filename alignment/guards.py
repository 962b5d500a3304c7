"""Non-finite guard: a NaN/inf loss, reward or gradient stops the stage before the optimiser step uses it.

The error names the stage and the step; the weights are left as they were after the last good step and the last
complete checkpoint stays on disk, so lowering the learning rate (or fixing the reward) and rerunning resumes from it.
Gradient-norm spikes (above ``SPIKE_FACTOR`` times the median of the recent norms) are logged, not fatal.
"""

from __future__ import annotations

import json
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
    """Checks each step's gradient norm: non-finite stops the stage, a spike is printed and appended to
    ``<stage>/grad_norm_spikes.jsonl`` (metrics.jsonl keeps one line per logging step)."""

    def __init__(self, stage: str, folder=None):
        from pathlib import Path

        self.stage = stage
        self.path = Path(folder) / "grad_norm_spikes.jsonl" if folder is not None else None
        self.recent: deque[float] = deque(maxlen=SPIKE_WINDOW)
        self.spikes = 0

    def check(self, step: int, norm: float) -> bool:
        """True when ``norm`` is a spike. Raises NonFiniteError when it is NaN or inf."""
        check_finite(self.stage, step, gradient=norm)
        median = statistics.median(self.recent) if len(self.recent) >= SPIKE_MIN_HISTORY else None
        self.recent.append(norm)
        if median is None or norm <= SPIKE_FACTOR * median:
            return False
        self.spikes += 1
        from alignment.io import skip_write
        from alignment.metrics import console

        console.print(f"[yellow]warning:[/yellow] {self.stage}: gradient-norm spike at step {step}: "
                      f"{norm:.3g} (recent median {median:.3g})")
        if self.path is not None and not skip_write(self.path):
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "grad_norm": norm, "recent_median": median}) + "\n")
        return True
