"""The shared gold evaluator (toy world): every policy is scored the same way.

A fixed set of 128 held-out toy prompts, greedy decoding, at most ``GOLD_MAX_NEW_TOKENS`` new tokens.
``gold_reward`` in [0, 1] = 0.8 * content + 0.2 * format; ``gold_content`` is the content term alone.
"""

from __future__ import annotations

import statistics

import torch

from alignment.toy import world


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 128):
    """[(completion text, finished)] for each prompt: HF greedy decoding with left padding, stopping on the rollout
    engines' stop set and without the model's generation_config settings (every policy decoded alike)."""
    from alignment.rollout import plain_generation, stop_token_ids

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    stop = stop_token_ids(tokenizer, model)
    out = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            batch = tokenizer(chunk, return_tensors="pt", padding=True).to(model.device)
            with plain_generation(model):
                generated = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=stop,
                )
            for row in generated[:, batch["input_ids"].shape[1] :].tolist():
                end = next((k for k, t in enumerate(row) if t in stop), None)  # padding follows the first stop id
                row = row if end is None else row[: end + 1]
                out.append((tokenizer.decode(row, skip_special_tokens=True), end is not None))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def gold_scores(model, tokenizer, seed: int = 0) -> list[float]:
    """Per-prompt gold rewards of the greedy completions on the evaluator's prompts (in a fixed order)."""
    return [s.reward for s in _scored(model, tokenizer, seed)]


def _scored(model, tokenizer, seed: int) -> list[world.GoldScore]:
    prompts = world.eval_prompts(seed)
    completions = generate_greedy(model, tokenizer, prompts, world.GOLD_MAX_NEW_TOKENS)
    return [world.gold_score(p, text, finished) for p, (text, finished) in zip(prompts, completions)]


def gold_eval(model, tokenizer, seed: int = 0, baseline: list[float] | None = None) -> dict[str, float]:
    """gold_reward, gold_content, gold_format; with ``baseline`` (per-prompt scores) also gold_win_rate."""
    scores = _scored(model, tokenizer, seed)
    metrics = {
        "gold_reward": round(statistics.fmean(s.reward for s in scores), 4),
        "gold_content": round(statistics.fmean(s.content for s in scores), 4),
        "gold_format": round(statistics.fmean(s.format for s in scores), 4),
    }
    if baseline is not None:
        metrics["gold_win_rate"] = round(win_rate([s.reward for s in scores], baseline), 4)
    return metrics


def win_rate(ours: list[float], theirs: list[float]) -> float:
    """Fraction of prompts where ours scores higher; ties count half."""
    if len(ours) != len(theirs) or not ours:
        raise ValueError("win_rate needs two equally long, non-empty score lists")
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours, theirs)) / len(ours)


@torch.no_grad()
def completion_logprobs(model, tokenizer, prompts: list[str], completions: list[str]) -> list[float]:
    """Sum of log-probs of each completion's tokens given its prompt (prompt + completion tokenised together)."""
    out = []
    for prompt, completion in zip(prompts, completions):
        n_prompt = len(tokenizer(prompt).input_ids)
        ids = tokenizer(prompt + completion, return_tensors="pt").input_ids.to(model.device)
        logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        targets = ids[0, 1:]
        token_logps = logps.gather(-1, targets[:, None]).squeeze(-1)
        out.append(token_logps[n_prompt - 1 :].sum().item())
    return out
