"""AdapterFusion's attention over adapter outputs (Pfeiffer et al., 2021), as a pure function.

At every token, a query from the layer's input attends over the adapters' outputs (keys), and the fused output is
the attention-weighted sum of their values:

    scores_i = (W_q x) . (W_k a_i) / sqrt(d)      weights = softmax_i(scores)      out = sum_i weights_i V(a_i)

With a single adapter the softmax is 1, so with an identity value the fused output *is* that adapter's output.
"""

from __future__ import annotations

import math

import torch


def fusion_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse adapter outputs.

    query:  (..., d)        the projected layer input
    keys:   (..., n, d)     the projected output of each of n adapters
    values: (..., n, out)   what is mixed (the adapters' outputs, or a projection of them)
    returns (fused (..., out), weights (..., n))
    """
    scores = (keys @ query.unsqueeze(-1)).squeeze(-1) / (math.sqrt(query.shape[-1]) * temperature)
    weights = torch.softmax(scores.float(), dim=-1).to(values.dtype)
    return (weights.unsqueeze(-1) * values).sum(dim=-2), weights
