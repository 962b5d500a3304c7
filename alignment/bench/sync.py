"""`alignment bench sync`: from "adapter trained" to "first token generated with it", per LoRA rank and sync mode,
and the generation speed after each sync.

Each repeat changes the adapter's weights (as a training step would), then times ``engine.sync(policy)`` and one
one-token generation: in `lora` mode that first generation is when vLLM loads the new adapter. The `lora` engine
is started with ``max_lora_rank`` = the largest rank measured (one engine serves every rank).
"""

from __future__ import annotations

from alignment.bench.common import MAX_POSITIONS, Bench, Chart, Report, Timer, bench_prompts, summarize
from alignment.bench.rollout import engine_tokens, load_policy, randomize_adapter, tokens_per_s

GOALS = {"lora": (16, 0.1), "merged": (16, 1.0)}  # mode -> (rank, seconds to the first token)


def run(bench: Bench, ranks: list[int], batch: int, new_tokens: int, engines: list[str]) -> Report:
    from alignment.config import AdapterConfig
    from alignment.rollout import Sampling
    from alignment.rollout.vllm import VLLMEngine

    report = Report("sync", f"Adapter sync to the first generated token ({bench.size} Llama, {bench.dtype})",
                    {"ranks": ranks, "generation_batch": batch, "new_tokens": new_tokens},
                    ["mode", "rank", "to_first_token_s", "min", "max", "spread", "sync_call_s", "one_token_s",
                     "tok_s_after"],
                    chart=Chart("label", "to_first_token_s", "seconds to the first token (median, min..max)",
                                "min", "max"))
    policy = load_policy(bench, lora_rank=min(ranks))
    one_token, sampling = Sampling(1, temperature=1.0), Sampling(new_tokens, temperature=1.0)
    prompts = bench_prompts(batch)
    for mode in [e.removeprefix("vllm-") for e in engines]:
        engine = VLLMEngine(policy, mode, memory_fraction=0.3, lora_rank=max(ranks), max_model_len=MAX_POSITIONS,
                            seed=0)
        try:
            for rank in ranks:
                policy.add_adapter("policy", AdapterConfig(r=rank, alpha=2 * rank))
                first, calls = [], []
                for i in range(bench.repeats + 1):  # the first round is a warm-up
                    randomize_adapter(policy, "policy", seed=i + 1)  # "a training step moved the adapter"
                    with Timer() as total:
                        with Timer() as call:
                            engine.sync(policy)
                        engine.generate(prompts[:1], one_token)
                    if i:
                        first.append(total.seconds)
                        calls.append(call.seconds)
                steady = []  # the same one-token generation with nothing new to load: what the first token costs anyway
                for _ in range(bench.repeats):
                    with Timer() as t:
                        engine.generate(prompts[:1], one_token)
                    steady.append(t.seconds)
                speed = summarize([tokens_per_s(lambda: engine_tokens(engine, prompts, sampling))
                                   for _ in range(bench.repeats)])
                stats = summarize(first)
                report.rows.append({"mode": mode, "rank": rank, "to_first_token_s": stats["median"],
                                    "min": stats["min"], "max": stats["max"], "spread": stats["spread"],
                                    "sync_call_s": summarize(calls)["median"],
                                    "one_token_s": summarize(steady)["median"], "tok_s_after": speed["median"],
                                    "label": f"{mode} r{rank}"})
        finally:
            engine.close()
    for mode, (rank, seconds) in GOALS.items():
        row = next((r for r in report.rows if r["mode"] == mode and r["rank"] == rank), None)
        if row:
            report.goal(f"{mode} sync to the first token, rank {rank} (s)", row["to_first_token_s"], seconds,
                        higher_is_better=False)
    report.notes.append("sync_call_s: `engine.sync(policy)` alone (lora: save the adapter; merged: merge, write, "
                        "reload); one_token_s: a one-token generation with the adapter already loaded; the rest of "
                        "to_first_token_s is the engine taking up the new weights at the first request")
    report.notes.append(f"tok_s_after: generation speed after the sync, {batch} prompts x {new_tokens} new tokens")
    return report
