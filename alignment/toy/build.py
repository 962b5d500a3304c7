"""Build (once) and cache the embedded default: a word-level tokenizer and a tiny pretrained Llama.

Layout of ``<cache>/toy/v<VERSION>-seed<seed>/``::

    model/      config.json, model.safetensors, tokenizer files, generation_config.json
    data/       sft.jsonl preference.jsonl preference_eval.jsonl prompts.jsonl task_<name>[_eval].jsonl
    BUILT       written last: a folder without it is rebuilt

The model has head_dim 64 (vLLM's CPU attention accepts it) and is pretrained for a few hundred steps on the
toy review language so that it knows the format but is mediocre at the task.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from alignment.io import atomic_write_text, write_jsonl
from alignment.toy import world

VERSION = 15
TASK_TRAIN_ROWS = 1200  # per continual-learning task (200 held out)
PRETRAIN_STEPS = 400
PRETRAIN_DOCS = 12_000
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]


def cache_root() -> Path:
    if os.environ.get("ALIGNMENT_CACHE"):
        return Path(os.environ["ALIGNMENT_CACHE"]).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("alignment-pipeline"))


def toy_dir(seed: int = 0) -> Path:
    return cache_root() / "toy" / f"v{VERSION}-seed{seed}"


def ensure_toy(seed: int = 0, pretrain_steps: int = PRETRAIN_STEPS, root: Path | None = None) -> Path:
    """Return the cached toy folder, building it first if needed (safe across concurrent processes)."""
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
        _build(staging, seed, pretrain_steps)
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
        num_attention_heads=2,  # head_dim 64: accepted by vLLM's CPU attention
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )


def _build(folder: Path, seed: int, pretrain_steps: int) -> None:
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig, LlamaForCausalLM

    folder.mkdir(parents=True)
    data = folder / "data"
    write_jsonl(data / "sft.jsonl", world.sft_pairs(seed, 2000))
    write_jsonl(data / "sft_eval.jsonl", world.sft_pairs(seed + 1000, 128))
    write_jsonl(data / "preference.jsonl", world.preference_pairs(seed, 2000))
    write_jsonl(data / "preference_eval.jsonl", world.preference_pairs(seed, 256, salt=5))
    write_jsonl(data / "prompts.jsonl", world.rl_prompts(seed, 1024))
    for task in world.TASKS:
        write_jsonl(data / f"task_{task}.jsonl", world.task_examples(seed, task, TASK_TRAIN_ROWS))
        write_jsonl(data / f"task_{task}_eval.jsonl", world.task_examples(seed, task, 200, salt=1))

    tokenizer = build_tokenizer(seed)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(build_model_config(len(tokenizer), tokenizer))

    texts = world.pretrain_corpus(seed, PRETRAIN_DOCS)
    batch = tokenizer([t + " </s>" for t in texts], padding=True, return_tensors="pt", add_special_tokens=True)
    input_ids, attention = batch["input_ids"], batch["attention_mask"]
    labels = input_ids.masked_fill(attention == 0, -100)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=pretrain_steps, pct_start=0.1)
    model.train()
    bar = tqdm(range(pretrain_steps), desc="building toy model (pretraining)", leave=False)
    for _ in bar:
        idx = torch.randint(0, len(texts), (64,), generator=generator)
        loss = model(input_ids=input_ids[idx], attention_mask=attention[idx], labels=labels[idx]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(folder / "model", safe_serialization=True)
    tokenizer.save_pretrained(folder / "model")
    (folder / "world.json").write_text(
        json.dumps({"version": VERSION, "seed": seed, "pretrain_steps": pretrain_steps, "final_loss": loss.item()})
    )
