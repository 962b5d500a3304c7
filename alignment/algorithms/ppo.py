"""PPO maths for language models: masked statistics, KL estimators, KL-shaped rewards, clipped losses.

Shapes: B sequences, T response tokens; ``mask`` (B, T) is 1 on real response tokens.
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over positions where mask is 1. x, mask: (B, T) -> scalar."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of x over masked positions. x, mask: (B, T) -> scalar."""
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    n = mask.sum()
    return ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over masked positions (mean kept if shift_mean is False); zero outside the mask."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token KL(policy || reference) estimate from sampled tokens' log-probs. (B, T) -> (B, T).

    k1: log p - log q (unbiased, can be negative); k3: (q/p - 1) - log(q/p) (unbiased, always >= 0; Schulman 2020).
    """
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r} (k1 or k3)")


def kl_shaped_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards: -kl_coef * KL_t on every response token, plus the sequence score on its last token.

    scores: (B,); kl, mask: (B, T) with each row's mask a prefix of ones. Returns (B, T).
    """
    rewards = -kl_coef * kl * mask.to(kl.dtype)
    last = mask.long().sum(dim=1).clamp(min=1) - 1
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(rewards)
    return rewards


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate: mean over tokens of max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip)).

    All (B, T). Returns (scalar loss, {"clipfrac", "approx_kl"}) with approx_kl the k3 estimate of KL(old || new).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)
    with torch.no_grad():
        clipfrac = masked_mean(((ratio - 1).abs() > clip).float(), mask).item()
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask).item()
    return loss, {"clipfrac": clipfrac, "approx_kl": approx_kl}


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float | None
) -> tuple[torch.Tensor, dict[str, float]]:
    """0.5 * mean of max((V - R)^2, (V_clipped - R)^2), V_clipped = old + clamp(V - old, -clip, clip). All (B, T)."""
    v_loss_unclipped = (values - returns) ** 2
    if clip is None:
        loss = 0.5 * masked_mean(v_loss_unclipped, mask)
        frac = 0.0
    else:
        v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        v_loss_clipped = (v_clipped - returns) ** 2
        loss = 0.5 * masked_mean(torch.max(v_loss_unclipped, v_loss_clipped), mask)
        frac = masked_mean((v_loss_clipped > v_loss_unclipped).float(), mask).item()
    return loss, {"vf_clipfrac": frac}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[R - V] / Var[R] over masked positions (1 = perfect critic, <= 0 = no better than a constant)."""
    var_returns = masked_var(returns, mask)
    return float(1 - masked_var(returns - values, mask) / var_returns) if var_returns > 0 else float("nan")


class AdaptiveKLController:
    """Ziegler et al. 2019: nudge the KL coefficient so the observed KL tracks ``target`` over ``horizon`` samples."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_samples: int) -> float:
        proportional_error = max(min(current_kl / self.target - 1, 0.2), -0.2)
        self.value *= 1 + proportional_error * n_samples / self.horizon
        return self.value
