"""Build (once) and cache the embedded default: a word-level tokenizer and a tiny pretrained Llama.

Layout of ``<cache>/toy/v<VERSION>-seed<world>/``::

    model/      config.json, model.safetensors, tokenizer files, generation_config.json
    data/       sft.jsonl preference.jsonl preference_eval.jsonl prompts.jsonl task_<name>[_eval].jsonl
    world.json  the build's figures: steps, final loss, the quality gate's measures, seconds
    BUILT       written last: a folder without it is rebuilt

The model has 4 heads of head_dim 32 (vLLM's CPU attention accepts it) and is pretrained on the toy review language
so that it knows the format but is mediocre at the task. Copying the prompt's noun is the one skill a base must have,
and a small transformer learns it suddenly, at a step that float rounding (the CPU's kernels, the thread count) and
the seeds move. Two things make it come early: four heads rather than two, and pretraining that weighs the loss on the
response's noun ``COPY_WEIGHT`` times (the copying signal is one token in twenty otherwise). Then the build checks
the base on the world's held-out evaluation prompts (``assess_base``). A base that fails this gate is trained again
from a fresh initialisation (same world, same data), up to ``MAX_ATTEMPTS`` times; then the build stops with an error
naming the figures. It never hands a broken base to a stage.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from alignment.errors import UserError
from alignment.io import atomic_write_text, write_jsonl
from alignment.toy import world

VERSION = 17
TASK_TRAIN_ROWS = 1200  # per continual-learning task (200 held out)
PRETRAIN_STEPS = 400
PRETRAIN_LR = 1e-2  # peak of a one-cycle schedule
PRETRAIN_BATCH = 64
COPY_WEIGHT = 5.0  # loss weight of the response's first noun (the copy of the prompt's) in pretraining
MAX_ATTEMPTS = 6  # fresh initialisations tried when a base fails the gate ...
PROBE_STEP = 200  # ... or when, halfway, it copies the noun in fewer than PROBE_NOUN_COPY of 32 held-out prompts:
PROBE_NOUN_COPY = 0.5  # an initialisation that has not started copying by then rarely does (the probe saves time)
PRETRAIN_DOCS = 12_000
# The quality gate on the held-out evaluation prompts (greedy answers):
GATE_NOUN_COPY = 0.9  # share of answers that are a proper review of the prompt's noun
GATE_DISTINCT = 0.5  # distinct answers / distinct nouns among the prompts
GATE_GOLD = (0.2, 0.4)  # base gold reward band: proper reviews that lean negative
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]


def cache_root() -> Path:
    if os.environ.get("ALIGNMENT_CACHE"):
        return Path(os.environ["ALIGNMENT_CACHE"]).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("alignment-pipeline"))


def toy_dir(seed: int = 0) -> Path:
    return cache_root() / "toy" / f"v{VERSION}-seed{seed}"


def ensure_toy(seed: int = 0, pretrain_steps: int = PRETRAIN_STEPS, root: Path | None = None, gate: bool = True) -> Path:
    """Return the cached folder of toy world ``seed``, building it first if needed (safe across concurrent processes).

    ``gate=False`` skips the quality gate (tests that build a few-step model to check determinism)."""
    from filelock import FileLock

    folder = (root / "toy" / f"v{VERSION}-seed{seed}") if root else toy_dir(seed)
    if (folder / "BUILT").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if (folder / "BUILT").exists():
            return folder
        staging = folder.with_name(folder.name + ".building")
        shutil.rmtree(staging, ignore_errors=True)
        _build(staging, seed, pretrain_steps, gate)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
        atomic_write_text(folder / "BUILT", json.dumps({"version": VERSION, "seed": seed}))
    return folder


def build_tokenizer(seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.train_from_iterator(world.corpus_for_tokenizer(seed), trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=128,
    )


def build_model_config(vocab_size: int, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,  # head_dim 32: accepted by vLLM's CPU attention
        num_key_value_heads=4,
        head_dim=32,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )


class ToyBuildError(UserError):
    """The toy base model failed its quality gate after every extra round: a bug in the toy, not a user mistake."""


def _greedy_scores(model, tokenizer, prompts: list[str]) -> tuple[list[world.GoldScore], list[str]]:
    from alignment.evaluation import generate_greedy

    answers = generate_greedy(model, tokenizer, prompts, world.GOLD_MAX_NEW_TOKENS)
    return [world.gold_score(p, text, done) for p, (text, done) in zip(prompts, answers)], [t for t, _ in answers]


def assess_base(model, tokenizer, seed: int) -> dict:
    """The quality gate's measures on world ``seed``'s held-out evaluation prompts (greedy answers)."""
    prompts = world.eval_prompts(seed)
    scores, answers = _greedy_scores(model, tokenizer, prompts)
    nouns = {world.prompt_noun(p) for p in prompts}
    return {
        "noun_copy": round(sum(s.content > 0 for s in scores) / len(prompts), 4),
        "distinct_answers": round(len(set(answers)) / len(nouns), 4),
        "gold_reward": round(sum(s.reward for s in scores) / len(prompts), 4),
        "example": prompts[0] + answers[0],
    }


def probe_noun_copy(model, tokenizer, seed: int) -> float:
    """Share of the first 32 held-out prompts whose greedy answer is a proper review of the prompt's noun."""
    scores, _ = _greedy_scores(model, tokenizer, world.eval_prompts(seed)[:32])
    return sum(s.content > 0 for s in scores) / len(scores)


def gate_failures(measures: dict) -> list[str]:
    failures = []
    if measures["noun_copy"] < GATE_NOUN_COPY:
        failures.append(f"noun_copy {measures['noun_copy']} < {GATE_NOUN_COPY}")
    if measures["distinct_answers"] < GATE_DISTINCT:
        failures.append(f"distinct_answers {measures['distinct_answers']} < {GATE_DISTINCT}")
    if not GATE_GOLD[0] <= measures["gold_reward"] <= GATE_GOLD[1]:
        failures.append(f"gold_reward {measures['gold_reward']} outside {GATE_GOLD}")
    return failures


def copy_weights(input_ids, attention, tokenizer):
    """Per-token loss weights for pretraining: 1 on every real token, ``COPY_WEIGHT`` on the response's first noun
    (two tokens after the prompt's closing ``:``, i.e. after ``: the``), 0 on padding. Weights sit on the *label*
    positions (shifted by one, as the loss is)."""
    import torch

    weights = attention[:, 1:].float()
    colon = tokenizer.convert_tokens_to_ids(":")
    rows, cols = (input_ids[:, :-1] == colon).nonzero(as_tuple=True)
    first = {}
    for r, c in zip(rows.tolist(), cols.tolist()):
        first.setdefault(r, c)
    for r, c in first.items():
        if c + 2 < weights.shape[1]:
            weights[r, c + 1] *= COPY_WEIGHT  # label at position c + 2 (the noun), predicted from position c + 1
    return weights


def _pretrain(model, batch, weights, steps: int, generator, probe=None) -> float | None:
    """One-cycle AdamW pretraining on random batches of the corpus, each cut to its longest row, with the weighted
    token loss of ``copy_weights``. ``probe()`` is asked at ``PROBE_STEP``; False stops the run (returns None)."""
    import torch
    import torch.nn.functional as F

    input_ids, attention = batch["input_ids"], batch["attention_mask"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=PRETRAIN_LR, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        if probe is not None and step == PROBE_STEP:
            model.eval()
            if not probe():
                return None
            model.train()
        idx = torch.randint(0, len(input_ids), (PRETRAIN_BATCH,), generator=generator)
        width = int(attention[idx].sum(1).max())
        ids, mask, w = input_ids[idx, :width], attention[idx, :width], weights[idx, : width - 1]
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        loss = (token_loss.view_as(w) * w).sum() / w.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return loss.item()


def write_data(data: Path, seed: int) -> None:
    """The world's datasets (``toy:<name>``), pure functions of its seed."""
    write_jsonl(data / "sft.jsonl", world.sft_pairs(seed, 2000))
    write_jsonl(data / "sft_eval.jsonl", world.sft_pairs(seed + 1000, 128))
    write_jsonl(data / "preference.jsonl", world.preference_pairs(seed, 2000))
    write_jsonl(data / "preference_eval.jsonl", world.preference_pairs(seed, 256, salt=5))
    write_jsonl(data / "prompts.jsonl", world.rl_prompts(seed, 1024))
    for task in world.TASKS:
        write_jsonl(data / f"task_{task}.jsonl", world.task_examples(seed, task, TASK_TRAIN_ROWS))
        write_jsonl(data / f"task_{task}_eval.jsonl", world.task_examples(seed, task, 200, salt=1))


def _build(folder: Path, seed: int, pretrain_steps: int, gate: bool = True) -> None:
    import time

    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    from alignment.metrics import console

    started = time.perf_counter()
    folder.mkdir(parents=True)
    write_data(folder / "data", seed)

    tokenizer = build_tokenizer(seed)
    texts = world.pretrain_corpus(seed, PRETRAIN_DOCS)
    batch = tokenizer([t + " </s>" for t in texts], padding=True, return_tensors="pt", add_special_tokens=True)
    weights = copy_weights(batch["input_ids"], batch["attention_mask"], tokenizer)
    attempts = []
    for attempt in range(MAX_ATTEMPTS if gate else 1):
        torch.manual_seed(seed + 1000 * attempt)  # attempt 0: the world's seed; later ones a fresh initialisation
        model = LlamaForCausalLM(build_model_config(len(tokenizer), tokenizer))
        generator = torch.Generator().manual_seed(seed + 1000 * attempt)
        console.print(f"building toy world {seed} (once per machine): pretraining {pretrain_steps} steps"
                      + (f", attempt {attempt + 1} of {MAX_ATTEMPTS} (the last one failed its gate or probe)" if attempt else ""))
        probed: list[float] = []

        def probe() -> bool:
            probed.append(probe_noun_copy(model, tokenizer, seed))
            return probed[-1] >= PROBE_NOUN_COPY

        loss = _pretrain(model, batch, weights, pretrain_steps, generator, probe if gate else None)
        if loss is None:
            attempts.append({"stopped_at": PROBE_STEP, "noun_copy": round(probed[-1], 4)})
            failures = [f"noun_copy {probed[-1]:.2f} < {PROBE_NOUN_COPY} at step {PROBE_STEP}"]
            measures = {"example": "(stopped early)"}
            continue
        if not gate:
            measures, failures = {}, []
            break
        measures = assess_base(model, tokenizer, seed)
        failures = gate_failures(measures)
        attempts.append({"probe_noun_copy": round(probed[0], 4) if probed else None, "noun_copy": measures["noun_copy"],
                         "gold_reward": measures["gold_reward"]})
        if not failures:
            break
    if failures:
        raise ToyBuildError(
            f"toy world {seed}: the base model failed its quality gate in {len(attempts)} attempts of {pretrain_steps} "
            f"pretraining steps ({'; '.join(failures)}; answer: {measures['example']!r}). This is a bug in "
            "alignment/toy, not in your config: please report it with this line and your CPU model"
        )
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(folder / "model", safe_serialization=True)
    tokenizer.save_pretrained(folder / "model")
    summary = {"version": VERSION, "seed": seed, "pretrain_steps": pretrain_steps, "attempts": attempts,
               "final_loss": round(loss, 4),
               "torch_threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - started, 1)}
    (folder / "world.json").write_text(json.dumps({**summary, "gate": measures}, indent=1))
