"""Forward + backward of the 76M bench model with a float32 LoRA r=16 adapter on a bf16 base, with and without
autocast: what `alignment.policy.mixed_precision` (the autocast inside `SharedPolicy.using`) changes for our own
training loops (reward, PPO, GRPO, RLOO) in bf16. Transformers' Trainer autocasts TRL's stages the same way.

    python benchmarks/mixed_precision.py [--repeats 5] [--batch 64] [--length 80]

Prints seconds per step (median, min..max) for each mode, run alternately in one process so both see the same load.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from alignment.bench.common import bench_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=80, help="tokens per sequence (prompt + 64 new tokens)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(bench_model("76m")), dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.length))

    def step(autocast: bool) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids, use_cache=False).logits
        torch.log_softmax(logits.float(), -1).gather(-1, ids[:, :, None]).mean().backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step(False), step(True)  # warm-up
    times = {False: [], True: []}
    for _ in range(args.repeats):
        for mode in times:
            times[mode].append(step(mode))
    for mode, label in ((False, "float32 adapter, no autocast"), (True, "float32 adapter, bf16 autocast")):
        t = times[mode]
        print(f"{label:32s} {statistics.median(t):6.2f} s/step  ({min(t):.2f}..{max(t):.2f})")
    print(f"no autocast / autocast: {statistics.median(times[False]) / statistics.median(times[True]):.2f} x")


if __name__ == "__main__":
    main()
