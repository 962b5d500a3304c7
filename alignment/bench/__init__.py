"""`alignment bench <what> --out DIR`: figures measured side by side in one run, written as DIR/<what>.json,
DIR/<what>.md and DIR/<what>.png (medians of repeats, min..max, spread, load average at start and end).

    rollout      tokens/s: raw model.generate, HFEngine, raw vLLM, VLLMEngine; batch sizes; with/without LoRA
    sync         adapter trained -> first token generated with it: LoRA hot-swap and merged reload, per rank
    ppo          one PPO iteration's time split and samples/s, per engine
    memory       peak PSS of SFT, PPO (HF / vLLM engine), each with and without gradient checkpointing, and a
                 four-model-copies baseline
    compare-trl  samples/s of our PPO/GRPO/RLOO against TRL's GRPOTrainer and RLOOTrainer
    toy          the toy world's calibration: per world, the base's gate figures and the shipped configs' results

Benchmarks print figures; no test asserts a speed. docs/benchmarks.md holds the latest figures.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

from alignment.errors import UserError

BENCHMARKS = ("rollout", "sync", "ppo", "memory", "compare-trl", "toy")
ENGINES = ("hf", "vllm-merged", "vllm-lora")
ENGINE_CHOICES = {"rollout": ENGINES, "sync": ENGINES[1:], "ppo": ENGINES, "compare-trl": ("vllm", "hf")}
DEFAULT_ENGINES = {"compare-trl": "vllm"}  # others: every choice
MEMORY_RUNS = ("imports", "sft", "sft-no-ckpt", "ppo-hf", "ppo-hf-no-ckpt", "ppo-vllm", "four-copies")


@dataclasses.dataclass
class Options:
    out: Path
    size: str = "76m"
    repeats: int = 3
    threads: int = 0  # 0: every core
    batches: str = "8,32,64"
    batch: int = 64
    new_tokens: int | None = None  # None: the benchmark's default
    ranks: str = "8,16,64"
    engines: str | None = None  # None: the benchmark's default
    runs: str | None = None  # memory (default MEMORY_RUNS) and toy (default every run)
    worlds: str = "0,1,2,3,4"  # toy only
    seeds: str = "0"  # toy only: training seeds (`seed:` of the configs), one row per world and seed
    dtype: str = "auto"  # auto: float32 on CPU (bf16 matmuls are slow without AVX512-BF16/AMX), bf16 on a GPU


def _ints(text: str, option: str, minimum: int = 1) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < minimum:
        kind = "positive integers, e.g. 8,32,64" if minimum == 1 else "integers from 0, e.g. 0,1,2"
        raise UserError(f"bench {option}: {text!r} is not a comma-separated list of {kind}")
    return values


def _choose(what: str, option: str, text: str, choices: tuple[str, ...]) -> list[str]:
    """The comma-separated ``text``, each checked against ``choices``; vLLM ones need vLLM installed."""
    chosen = [e.strip() for e in text.split(",") if e.strip()]
    if not chosen or any(e not in choices for e in chosen):
        raise UserError(f"bench {option}: {text!r} for `{what}`; choose from {', '.join(choices)} (comma-separated)")
    if any("vllm" in e for e in chosen) and importlib.util.find_spec("vllm") is None:
        raise UserError(f"bench {option}: vLLM is not installed; install the `cpu` or `cuda` extra or leave the vLLM "
                        "choices out")
    return chosen


def run_benchmark(what: str, options: Options) -> list[Path]:
    """Runs one benchmark; returns the files written."""
    from alignment.bench.common import SIZES, Bench, use_threads

    if what not in BENCHMARKS:
        raise UserError(f"bench: unknown benchmark {what!r}; choose one of {', '.join(BENCHMARKS)}")
    if options.size not in SIZES:
        raise UserError(f"bench --size: {options.size!r}; choose one of {', '.join(SIZES)}")
    if options.repeats < 1:
        raise UserError("bench --repeats: must be at least 1")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = options.threads or cores
    if not 1 <= threads <= cores:
        raise UserError(f"bench --threads: {options.threads} is outside 1..{cores} (this machine's free cores)")
    if what == "toy":
        from alignment.bench import toy

        engines = _choose(what, "--runs", options.runs or ",".join(toy.RUNS), toy.RUNS)
        worlds = _ints(options.worlds, "--worlds", minimum=0)
        seeds = _ints(options.seeds, "--seeds", minimum=0)
    elif what == "memory":
        engines = _choose(what, "--runs", options.runs or ",".join(MEMORY_RUNS), MEMORY_RUNS)
    else:
        choices = ENGINE_CHOICES[what]
        engines = _choose(what, "--engines", options.engines or DEFAULT_ENGINES.get(what, ",".join(choices)), choices)
    use_threads(threads)
    if options.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UserError(f"bench --dtype: {options.dtype!r}; choose auto, float32, bfloat16 or float16")
    bench = Bench(options.out, options.size, options.repeats, threads, options.dtype)
    if what == "toy":
        report = toy.run(bench, worlds, seeds, engines)
    elif what == "rollout":
        from alignment.bench import rollout

        report = rollout.run(bench, _ints(options.batches, "--batches"), options.new_tokens or 128, engines)
    elif what == "sync":
        from alignment.bench import sync

        report = sync.run(bench, _ints(options.ranks, "--ranks"), options.batch, options.new_tokens or 64, engines)
    elif what == "ppo":
        from alignment.bench import ppo

        report = ppo.run(bench, options.batch, options.new_tokens or 128, engines)
    elif what == "memory":
        from alignment.bench import memory

        report = memory.run(bench, options.batch, options.new_tokens or 128, engines)
    else:
        from alignment.bench import compare_trl

        if options.batch % compare_trl.GROUP:
            raise UserError(f"bench --batch: {options.batch} completions per step must be a multiple of the group size "
                            f"{compare_trl.GROUP}")
        report = compare_trl.run(bench, engines, compare_trl.Shape(options.batch // compare_trl.GROUP,
                                                                   options.new_tokens or 64))
    return bench.write(report)
