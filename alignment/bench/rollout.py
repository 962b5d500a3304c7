"""`alignment bench rollout`: generation tokens/s of raw ``model.generate``, our HFEngine, raw vLLM
(``LLM.generate``) and our VLLMEngine, per batch size, with and without an active LoRA adapter.

Raw vLLM runs on the very engine our VLLMEngine wraps (same settings, same process): the ratio between the two is
our framework overhead. Tokens are the ones actually generated (up to and including eos), sampled at temperature 1.
"""

from __future__ import annotations

from alignment.bench.common import MAX_POSITIONS, Bench, Chart, Report, Timer, bench_model, bench_prompts, repeat

ANCHORS = {  # tok/s measured on this machine by the author (76M, "bf16", 64 prompts x 128 new tokens, 2 cores)
    ("model.generate (raw)", "none"): 518.0,
    ("LLM.generate (raw vLLM)", "none"): 1304.0,
    ("LLM.generate (raw vLLM)", "LoRA r16"): 368.0,
}
LORA_RANK = 16


def response_tokens(sequences, prompt_length: int, eos: int) -> int:
    """New tokens per row up to and including the first eos, summed (HF pads finished rows)."""
    total = 0
    for row in sequences[:, prompt_length:].tolist():
        total += row.index(eos) + 1 if eos in row else len(row)
    return total


def raw_hf_generate(model, tokenizer, prompts: list[str], new_tokens: int) -> int:
    import torch

    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return response_tokens(out, batch["input_ids"].shape[1], tokenizer.eos_token_id)


def raw_vllm_generate(llm, prompts: list[str], new_tokens: int, lora_request=None) -> int:
    from vllm import SamplingParams

    params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=new_tokens)
    outputs = llm.generate(prompts, params, lora_request=lora_request, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outputs)


def engine_tokens(engine, prompts: list[str], sampling) -> int:
    return sum(len(ids) for ids in engine.generate(prompts, sampling).response_ids)


def tokens_per_s(fn) -> float:
    with Timer() as t:
        tokens = fn()
    return tokens / t.seconds


def randomize_adapter(policy, name: str, scale: float = 0.02, seed: int = 0) -> None:
    """A fresh LoRA has B = 0 (a no-op); give B random values so the adapter changes the outputs, as a trained one."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if f".{name}." in n and "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=generator).to(p.dtype) * scale)


def load_policy(bench: Bench, lora_rank: int | None = LORA_RANK):
    """The bench model as a SharedPolicy with a random `policy` LoRA adapter of ``lora_rank`` (None: none)."""
    from alignment.config import AdapterConfig
    from alignment.policy import SharedPolicy

    policy = SharedPolicy.load(str(bench_model(bench.size)), dtype=bench.dtype)
    if lora_rank:
        policy.add_adapter("policy", AdapterConfig(r=lora_rank, alpha=2 * lora_rank))
        randomize_adapter(policy, "policy")
    return policy


def run(bench: Bench, batches: list[int], new_tokens: int, engines: list[str]) -> Report:
    from alignment.rollout import Sampling

    report = Report("rollout", f"Rollout throughput ({bench.size} Llama, {bench.dtype}, {new_tokens} new tokens)",
                    {"batches": batches, "new_tokens": new_tokens, "lora_rank": LORA_RANK, "engines": engines},
                    ["implementation", "adapter", "batch", "tok_s", "min", "max", "spread", "vs_anchor"],
                    chart=Chart("label", "tok_s", "tokens / s (median, min..max)", "min", "max"))
    sampling = Sampling(new_tokens, temperature=1.0)

    def measure(name: str, adapter: str, batch: int, fn) -> None:
        stats = repeat(lambda: tokens_per_s(fn), bench.repeats, warmup=0)
        anchor = ANCHORS.get((name, adapter)) if bench.size == "76m" and batch == 64 and new_tokens == 128 else None
        report.rows.append({"implementation": name, "adapter": adapter, "batch": batch, "tok_s": stats["median"],
                            "min": stats["min"], "max": stats["max"], "spread": stats["spread"],
                            "vs_anchor": stats["median"] / anchor if anchor else None,
                            "label": f"{name.split(' ')[0]} {adapter} b{batch}"})

    if "hf" in engines:
        _hf_rows(bench, batches, new_tokens, sampling, measure)
    modes = [e.removeprefix("vllm-") for e in engines if e.startswith("vllm")]
    if modes:
        _vllm_rows(bench, batches, new_tokens, sampling, measure, modes)
    _goals(report, max(batches))
    if modes:
        report.notes.append("raw LLM.generate runs on the same vLLM engine our VLLMEngine wraps (same process, "
                            "same settings); `merged` serves the adapter merged into the weights (no LoRA at "
                            "generation time)")
    return report


def _hf_rows(bench, batches, new_tokens, sampling, measure) -> None:
    from alignment.rollout.hf import HFEngine

    policy = load_policy(bench, lora_rank=None)
    tok = policy.tokenizer
    raw_hf_generate(policy.base, tok, bench_prompts(4), 4)  # warm-up
    for batch in batches:  # the plain transformers model, before peft wraps it
        measure("model.generate (raw)", "none", batch,
                lambda p=bench_prompts(batch): raw_hf_generate(policy.base, tok, p, new_tokens))
    from alignment.config import AdapterConfig

    policy.add_adapter("policy", AdapterConfig(r=LORA_RANK, alpha=2 * LORA_RANK))
    randomize_adapter(policy, "policy")
    for batch in batches:
        measure("model.generate (raw)", f"LoRA r{LORA_RANK}", batch,
                lambda p=bench_prompts(batch): raw_hf_generate(policy.model, tok, p, new_tokens))
        engine = HFEngine(policy, batch_size=batch)
        measure("HFEngine (ours)", f"LoRA r{LORA_RANK}", batch,
                lambda p=bench_prompts(batch), e=engine: engine_tokens(e, p, sampling))


def _vllm_rows(bench, batches, new_tokens, sampling, measure, modes: list[str]) -> None:
    from alignment.rollout.vllm import VLLMEngine

    policy = load_policy(bench)
    for mode in modes:
        engine = VLLMEngine(policy, mode, memory_fraction=0.3, lora_rank=LORA_RANK, max_model_len=MAX_POSITIONS, seed=0)
        try:
            adapter = f"LoRA r{LORA_RANK}" if mode == "lora" else "none"
            engine.generate(bench_prompts(8), sampling)  # warm-up
            for batch in batches:
                prompts = bench_prompts(batch)
                measure("LLM.generate (raw vLLM)", adapter, batch,
                        lambda p=prompts: raw_vllm_generate(engine.llm, p, new_tokens, engine.lora_request))
                measure(f"VLLMEngine (ours, {mode})", adapter if mode == "lora" else "merged", batch,
                        lambda p=bench_prompts(batch): engine_tokens(engine, p, sampling))
        finally:
            engine.close()


def _goals(report: Report, batch: int) -> None:
    def find(name: str, adapter: str | None = None):
        row = next((r for r in report.rows if r["implementation"] == name and r["batch"] == batch
                    and (adapter is None or r["adapter"] == adapter)), None)
        return row["tok_s"] if row else None

    raw_merged, ours_merged = find("LLM.generate (raw vLLM)", "none"), find("VLLMEngine (ours, merged)")
    raw_lora, ours_lora = find("LLM.generate (raw vLLM)", f"LoRA r{LORA_RANK}"), find("VLLMEngine (ours, lora)")
    hf = find("HFEngine (ours)")
    if raw_merged and ours_merged:
        report.goal(f"VLLMEngine merged / raw vLLM, batch {batch}", ours_merged / raw_merged, 0.9)
    if raw_lora and ours_lora:
        report.goal(f"VLLMEngine lora / raw vLLM with the same LoRA, batch {batch}", ours_lora / raw_lora, 0.9)
    best = max([x for x in (ours_merged, ours_lora) if x] or [0.0])
    if best and hf:
        report.goal(f"VLLMEngine (best sync mode) / HFEngine, batch {batch}", best / hf, 2.2)
