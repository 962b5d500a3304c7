"""`alignment bench memory`: peak PSS (proportional set size, summed over the whole process tree, read from
/proc/<pid>/smaps_rollup every 0.2 s) of separate processes:

    sft          the SFT stage alone, on rows as long as PPO's sequences (prompt + new_tokens words), batch 16
    ppo-hf       the PPO stage (policy + reference + critic + same-base reward adapters), HF engine
    ppo-vllm     the same with the vLLM engine (its weights and KV reservation live in the same process tree)
    *-no-ckpt    the same without gradient checkpointing (on by default in every training stage, as in TRL)
    four-copies  a baseline: one PPO iteration's work with four separate model copies (policy, reference, critic,
                 reward), as PPO implementations without a shared base hold them

PSS counts shared pages (e.g. the mmapped weights, libraries) once across the tree, so children are not double
counted. The Python runtime with torch, transformers and TRL imported is part of every figure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from alignment.bench.common import Bench, Chart, Report, bench_model
from alignment.bench.runs import PREP_STAGES, online_stage, run_config, write_config

MIB = 1024 * 1024


def pss_bytes(pid: int) -> int:
    """PSS of one process (0 if it is gone or unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, from /proc/<pid>/task/<tid>/children."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError):
                pass
    return tree


def tree_pss(pid: int) -> int:
    return sum(pss_bytes(p) for p in process_tree(pid))


class PeakSampler:
    """Polls the tree's PSS in a thread until stopped; ``peak`` in bytes."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_pss(self.pid))
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def measure_command(command: list[str], log: Path) -> tuple[int, float]:
    """Runs ``command`` (output to ``log``); returns (peak PSS of its tree in bytes, seconds)."""
    from alignment.errors import UserError

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[2]),
                                                                         os.environ.get("PYTHONPATH")]))}
    start = time.time()
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        sampler = PeakSampler(process.pid)
        code = process.wait()
        peak = sampler.stop()
    if code != 0:
        raise UserError(f"bench memory: `{' '.join(command)}` failed (exit {code}); see {log}")
    return peak, time.time() - start


def run(bench: Bench, batch: int, new_tokens: int, runs: list[str]) -> Report:
    report = Report("memory", f"Peak memory, PSS over the process tree ({bench.size} Llama, {bench.dtype})",
                    {"batch": batch, "new_tokens": new_tokens, "sft_batch": 16, "sft_steps": 3, "runs": runs},
                    ["run", "peak_pss_mib", "vs_sft", "seconds"],
                    chart=Chart("run", "peak_pss_mib", "peak PSS (MiB)"))
    peaks = {}
    for name, command in _commands(bench, batch, new_tokens, runs).items():
        peak, seconds = measure_command(command, bench.out / f"memory-{name}.log")
        peaks[name] = peak
        report.rows.append({"run": name, "peak_pss_mib": peak / MIB, "seconds": seconds})
    for row in report.rows:
        row["vs_sft"] = peaks[row["run"]] / peaks["sft"] if "sft" in peaks else None
    if {"sft", "ppo-hf"} <= set(peaks):
        report.goal("PPO peak / SFT peak, HF engine, both with gradient checkpointing (the default)",
                    peaks["ppo-hf"] / peaks["sft"], 1.5, higher_is_better=False)
    if {"sft-no-ckpt", "ppo-hf-no-ckpt"} <= set(peaks):
        report.goal("PPO peak / SFT peak, HF engine, both without gradient checkpointing",
                    peaks["ppo-hf-no-ckpt"] / peaks["sft-no-ckpt"], 1.5, higher_is_better=False)
    if {"ppo-hf", "ppo-vllm"} <= set(peaks):
        report.notes.append(f"vLLM's share (ppo-vllm minus ppo-hf): {(peaks['ppo-vllm'] - peaks['ppo-hf']) / MIB:,.0f} "
                            "MiB (its copy of the weights, KV cache reservation, runtime)")
    report.notes.append("every run is a fresh process: its PSS includes the Python runtime (`imports`: torch, "
                        "transformers, TRL and peft imported, nothing else); each PPO run does 1 iteration (rollout, "
                        "scoring, 2 epochs of minibatch updates, sync)")
    return report


def _commands(bench: Bench, batch: int, new_tokens: int, runs: list[str]) -> dict[str, list[str]]:
    """Run name -> command line, in ``MEMORY_RUNS`` order, for the runs asked for."""
    python = [sys.executable, "-m", "alignment", "run"]
    commands = {}
    if "imports" in runs:
        commands["imports"] = [sys.executable, "-c", "import torch, transformers, trl, peft"]
    for name in ("sft", "sft-no-ckpt"):
        if name in runs:
            data = str(sft_rows(bench.out / "memory-sft.jsonl", batch, new_tokens))
            sft = [{"kind": "sft", "data": data, "max_steps": 3, "batch_size": 16, "eval_fraction": 0.0,
                    "gradient_checkpointing": name == "sft"}]
            commands[name] = [*python, str(write_config(bench, f"memory-{name}", sft,
                                                        name=f"bench-{bench.size}-memory-{name}"))]
    ppo_runs = [r for r in runs if r.startswith("ppo-")]
    if ppo_runs:  # the PPO runs' first stages, trained here (not measured) unless an earlier bench did
        run_config(write_config(bench, "memory-prep", PREP_STAGES, measured=False))
    for name in ppo_runs:
        engine = name.removeprefix("ppo-").removesuffix("-no-ckpt")
        stage = online_stage("ppo", 1, batch_size=batch, max_new_tokens=new_tokens, rollout={"engine": engine},
                             gradient_checkpointing=not name.endswith("-no-ckpt"))
        commands[name] = [*python, str(write_config(bench, f"memory-{name}", [*PREP_STAGES, stage]))]
    if "four-copies" in runs:
        commands["four-copies"] = [sys.executable, "-m", "alignment.bench.memory", str(bench_model(bench.size)),
                                   str(batch), str(new_tokens), bench.dtype]
    return commands


def sft_rows(path: Path, n: int, new_tokens: int) -> Path:
    """SFT rows as long as PPO's sequences (a bench prompt + ``new_tokens`` toy words), so both stages train on
    minibatches of 16 sequences of the same length: the difference is what the extra PPO roles cost."""
    import json
    import random

    from alignment.bench.common import bench_prompts
    from alignment.data import load_rows

    words = sorted({w for row in load_rows("toy:sft") for w in row["completion"].split()})
    rng = random.Random(0)
    rows = [{"prompt": p, "completion": " " + " ".join(rng.choice(words) for _ in range(new_tokens))}
            for p in bench_prompts(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def four_copies(model: str, batch: int, new_tokens: int, dtype: str) -> None:
    """One PPO iteration's work with four separate copies of the model: the policy (LoRA) generates; reference,
    reward and critic score; policy and critic (LoRA) train on minibatches of 16."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from alignment.bench.common import bench_prompts
    from alignment.policy import load_tokenizer

    def load():
        return AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype))

    def lora(m):
        return get_peft_model(m, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))

    tok = load_tokenizer(model)
    tok.padding_side = "left"
    policy, reference, reward, critic = lora(load()), load(), load(), lora(load())
    prompts = tok(bench_prompts(batch), return_tensors="pt", padding=True)
    with torch.no_grad():
        sequences = policy.generate(**prompts, do_sample=True, max_new_tokens=new_tokens, top_k=0,
                                    pad_token_id=tok.pad_token_id)
        for m in (reference, reward, critic):
            m(input_ids=sequences)
    optimizer = torch.optim.AdamW([p for m in (policy, critic) for p in m.parameters() if p.requires_grad], lr=1e-4)
    for mb in sequences.split(16):
        for m in (policy, critic):
            m(input_ids=mb).logits.float().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


if __name__ == "__main__":
    four_copies(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
