"""`alignment bench ppo`: one PPO iteration's time split (generate, score, policy / reference / value forward,
train, sync) and samples/s, with each engine: HF, vLLM `merged`, vLLM `lora`.

The stage is the real `kind: ppo` stage run by the pipeline (policy from a short SFT, same-base trained reward).
The stage records generate / score / train / sync itself; the three no-grad forward passes of step 2 are timed by
wrapping the stage module's ``token_logprobs`` and ``_values`` for the duration of the run (measurement only: the
wrappers call the originals unchanged). The first iteration is a warm-up; medians are over the rest.
"""

from __future__ import annotations

import contextlib
import importlib
import statistics
import time
from collections import defaultdict

from alignment.bench.common import Bench, Chart, Report, summarize
from alignment.bench.runs import PREP_STAGES, deltas, iteration_records, online_stage, run_config, write_config

ENGINES = {"hf": {"engine": "hf"}, "vllm-merged": {"engine": "vllm", "sync": "merged"},
           "vllm-lora": {"engine": "vllm", "sync": "lora"}}
PARTS = ("generate", "score", "policy_forward", "reference_forward", "value_forward", "train", "sync")


@contextlib.contextmanager
def timed_forwards(module_name: str):
    """Seconds of each no-grad ``token_logprobs`` call (by adapter) and ``_values`` call of a stage module."""
    import torch

    module = importlib.import_module(module_name)
    seconds: dict[str, list[float]] = defaultdict(list)
    original_logprobs, original_values = module.token_logprobs, getattr(module, "_values", None)

    def token_logprobs(policy, adapter, seq, temperature, **options):
        if torch.is_grad_enabled():  # the training forward: counted in `train`
            return original_logprobs(policy, adapter, seq, temperature, **options)
        start = time.perf_counter()
        out = original_logprobs(policy, adapter, seq, temperature, **options)
        seconds[f"{adapter}_forward"].append(time.perf_counter() - start)
        return out

    def values(policy, head, seq, grad=False):
        if grad:
            return original_values(policy, head, seq, grad)
        start = time.perf_counter()
        out = original_values(policy, head, seq, grad)
        seconds["value_forward"].append(time.perf_counter() - start)
        return out

    module.token_logprobs = token_logprobs
    if original_values is not None:
        module._values = values
    try:
        yield seconds
    finally:
        module.token_logprobs = original_logprobs
        if original_values is not None:
            module._values = original_values


def run(bench: Bench, batch: int, new_tokens: int, engines: list[str]) -> Report:
    report = Report("ppo", f"One PPO iteration ({bench.size} Llama, {bench.dtype}, {batch} prompts x {new_tokens} "
                    "new tokens)",
                    {"batch": batch, "new_tokens": new_tokens, "iterations": bench.repeats + 1, "engines": engines,
                     "ppo_epochs": 2, "minibatch_size": 16},
                    ["engine", "iteration_s", "samples_s", "min", "max", "spread", *[f"{p}_s" for p in PARTS],
                     "other_s", "generate_tok_s"],
                    chart=Chart("engine", "samples_s", "samples / s (median, min..max)", "min", "max"))
    for name in engines:
        stage = online_stage("ppo", bench.repeats + 1, batch_size=batch, max_new_tokens=new_tokens,
                             rollout=ENGINES[name])
        path = write_config(bench, f"ppo-{name}", [*PREP_STAGES, stage])
        with timed_forwards("stages.ppo") as forwards:
            run_config(path)
        report.rows.append(_row(name, iteration_records(bench.out, bench.size, "ppo"), forwards, batch))
    hf = next((r for r in report.rows if r["engine"] == "hf"), None)
    vllm = [r for r in report.rows if r["engine"].startswith("vllm")]
    if hf and vllm:
        best = max(vllm, key=lambda r: r["generate_tok_s"])
        report.goal(f"rollout tok/s during PPO, {best['engine']} / hf", best["generate_tok_s"] / hf["generate_tok_s"],
                    2.2)
    report.notes.append("the first iteration (engine warm-up) is left out; parts are medians over iterations, so "
                        "they need not add up to the median iteration; `other`: packing, KL, GAE, logging")
    return report


def _row(name: str, records: list[dict], forwards: dict[str, list[float]], batch: int) -> dict:
    """Medians over every iteration but the first (warm-up) of ``records`` (all of the stage's metrics lines)."""
    walls = [r["wall_s"] for r in records][1:]
    stats = summarize([batch / w for w in walls])
    row = {"engine": name, "iteration_s": statistics.median(walls), "samples_s": stats["median"], "min": stats["min"],
           "max": stats["max"], "spread": stats["spread"]}
    for part in ("generate", "score", "train", "sync"):
        row[f"{part}_s"] = statistics.median(deltas(records, f"time_{part}")[1:])
    for part in ("policy_forward", "reference_forward", "value_forward"):
        row[f"{part}_s"] = statistics.median(forwards[part][1:]) if len(forwards[part]) > 1 else None
    row["other_s"] = row["iteration_s"] - sum(row[f"{p}_s"] or 0.0 for p in PARTS)
    generated = [r["response_length"] * batch for r in records]
    row["generate_tok_s"] = statistics.median(
        [t / g for t, g in zip(generated, deltas(records, "time_generate"))][1:])
    return row
