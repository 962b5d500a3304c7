"""End of sequence is learned, whatever the tokenizer's pad token (issue 20, item 2).

Stand-ins built locally from the toy model (never downloaded): copies whose tokenizer has no pad token
(``pad_token=None``, ``config.pad_token_id=None``: the policy pads with eos), pads with eos, or pads with unk; and a
pad-less copy whose base never ends an answer (its eos row negated: like a model pretrained without eos, its greedy
answers run on to the token limit).

What the real trainers (TRL's SFT, DPO, KTO, ORPO; real peft LoRA) receive keeps each completion's eos in its labels
(or completion mask), and padding is masked by the attention mask, not by token id (with pad = eos, the padding
positions hold the eos id and are still masked). The default chat template (a tokenizer without one) ends each
assistant turn with eos: SFT on chat rows learns to stop, and PPO after it finishes its answers.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.test_truncation import Spy

BOS, EOS, UNK, DOT = 2, 3, 1, 5  # the toy tokenizer's <s>, </s>, <unk> and "."


def make_standin(toy_dir, folder, pad: str, never_stops: bool = False):
    """A copy of the toy model + tokenizer with pad token ``pad`` ("none", "eos", "unk")."""
    from transformers import AutoTokenizer

    shutil.copytree(toy_dir / "model", folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = {"none": None, "eos": tok.eos_token, "unk": tok.unk_token}[pad]
    pad_id = None if pad == "none" else tok.pad_token_id
    for f in list(folder.glob("tokenizer*")) + list(folder.glob("special_tokens_map.json")):
        f.unlink()
    tok.save_pretrained(folder)
    for name in ("config.json", "generation_config.json"):
        if (folder / name).exists():
            data = json.loads((folder / name).read_text())
            data["pad_token_id"] = pad_id
            (folder / name).write_text(json.dumps(data, indent=2))
    if never_stops:
        from safetensors.torch import load_file, save_file

        weights = load_file(folder / "model.safetensors")
        (key,) = [k for k in weights if k.endswith("embed_tokens.weight")]  # tied: also the eos output row
        weights[key][EOS] = -weights[key][EOS]
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert AutoTokenizer.from_pretrained(folder).pad_token_id == pad_id
    return folder


def toy_rows(toy_dir, name: str, n: int) -> list[dict]:
    lines = (toy_dir / "data" / f"{name}.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines[:n]]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def as_messages(row: dict) -> dict:
    return {"messages": [{"role": "user", "content": row["prompt"]},
                         {"role": "assistant", "content": row["completion"].strip()}]}


class BatchSpy:
    """Records the collated batches each trainer's ``compute_loss`` receives (what the loss is computed from)."""

    def __init__(self, mp):
        import trl
        from trl.experimental.orpo import ORPOTrainer

        self.seen = {"sft": [], "dpo": [], "kto": [], "orpo": []}
        for name, cls in (("sft", trl.SFTTrainer), ("dpo", trl.DPOTrainer), ("kto", trl.KTOTrainer),
                          ("orpo", ORPOTrainer)):
            mp.setattr(cls, "compute_loss", self._wrap(name, cls.compute_loss))

    def _wrap(self, name, compute_loss):
        def wrapped(trainer, model, inputs, *args, **kwargs):
            self.seen[name].append({k: v.tolist() for k, v in inputs.items() if hasattr(v, "tolist")})
            return compute_loss(trainer, model, inputs, *args, **kwargs)

        return wrapped


def ends_of(batch: dict, ids: str, mask: str, attention: str):
    """Per row: (the last attended token, its mask bit, the tokens after it, their mask bits)."""
    out = []
    for row_ids, row_mask, row_att in zip(batch[ids], batch[mask], batch[attention]):
        n = sum(row_att)
        assert row_att == [1] * n + [0] * (len(row_att) - n)  # right-padded
        out.append((row_ids[n - 1], row_mask[n - 1], row_ids[n:], row_mask[n:]))
    return out


ONE_STEP = {"max_steps": 1, "batch_size": 4, "max_samples": 4, "eval_fraction": 0.0, "max_length": 64}


@pytest.fixture(scope="module", params=["none", "eos", "unk"])
def pad_run(request, toy_dir, tmp_path_factory):
    """SFT (prompt/completion) -> SFT (chat messages) -> DPO -> KTO -> ORPO, one step each, on a stand-in with the
    given pad token; returns (what the trainers were handed, their collated batches, the tokenizer, the pad)."""
    from alignment.config import config_from_dict
    from alignment.pipeline import Pipeline
    from alignment.policy import load_tokenizer

    out = tmp_path_factory.mktemp(f"pad-{request.param}")
    model = make_standin(toy_dir, out / "model", request.param)
    sft = toy_rows(toy_dir, "sft", 4)
    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in toy_rows(toy_dir, "preference", 4)]
    sft_data = write_jsonl(out / "sft.jsonl", sft)
    chat_data = write_jsonl(out / "chat.jsonl", [as_messages(r) for r in sft])
    pair_data = write_jsonl(out / "pairs.jsonl", pairs)
    stages = [{"kind": "sft", "data": sft_data, **ONE_STEP}, {"kind": "sft", "data": chat_data, **ONE_STEP},
              {"kind": "dpo", "data": pair_data, **ONE_STEP}, {"kind": "kto", "data": pair_data, **ONE_STEP},
              {"kind": "orpo", "data": pair_data, **ONE_STEP}]
    raw = {"name": "pad", "model": str(model), "output_dir": str(out / "runs"), "logging": {"log_every": 50},
           "stages": stages}
    with pytest.MonkeyPatch.context() as mp:
        spy, batches = Spy(mp), BatchSpy(mp)
        Pipeline(*config_from_dict(raw)).run()
    tokenizer = load_tokenizer(str(model))
    return spy.seen, batches.seen, tokenizer, {"sft": sft, "pairs": pairs}, request.param


def test_standin_tokenizer_pads_as_asked(pad_run):
    _, _, tokenizer, _, pad = pad_run
    assert tokenizer.pad_token_id == {"none": EOS, "eos": EOS, "unk": UNK}[pad]  # none: the policy pads with eos
    assert tokenizer.eos_token_id == EOS


def test_sft_labels_keep_the_eos_of_every_completion(pad_run):
    seen, batches, tokenizer, data, pad = pad_run
    plain, chat = seen["sft"][:4], seen["sft"][4:]
    assert len(plain) == 4 and len(chat) == 4
    # by hand: "review of the rice in dublin :" + " the rice was tidy ." -> labels on the answer and its eos only
    by_prompt = {r["prompt"]: r for r in data["sft"]}
    for example in plain:
        prompt_ids = tokenizer(example["prompt"]).input_ids
        answer = tokenizer(by_prompt[example["prompt"]]["completion"], add_special_tokens=False).input_ids
        assert answer[0] == 4 and answer[-1] == DOT  # "the" ... "."
        assert example["input_ids"] == prompt_ids + answer + [EOS]
        assert example["labels"] == [-100] * len(prompt_ids) + answer + [EOS]
    for example in chat:  # the default template: "user : <prompt>\nassistant : <answer></s>\n"
        assert example["input_ids"][-2:] == [DOT, EOS] and example["labels"][-2:] == [DOT, EOS]
    # the collated batches: each row's last real token is its eos, learned; padding masked by the attention mask
    assert len(batches["sft"]) == 2
    for batch in batches["sft"]:
        ends = ends_of(batch, "input_ids", "labels", "attention_mask")
        assert any(tail for _, _, tail, _ in ends)  # some rows are padded
        for last, label, tail, tail_labels in ends:
            assert last == EOS and label == EOS
            assert tail == [tokenizer.pad_token_id] * len(tail) and tail_labels == [-100] * len(tail)


def test_dpo_and_kto_completion_masks_keep_eos(pad_run):
    seen, batches, tokenizer, data, pad = pad_run
    answers = {tuple(tokenizer(r[k], add_special_tokens=False).input_ids) for r in data["pairs"]
               for k in ("chosen", "rejected")}
    assert len(seen["dpo"]) == 4 and len(seen["kto"]) == 8
    for example in seen["dpo"]:
        assert tuple(example["chosen_ids"][:-1]) in answers and example["chosen_ids"][-1] == EOS
        assert tuple(example["rejected_ids"][:-1]) in answers and example["rejected_ids"][-1] == EOS
    for example in seen["kto"]:
        assert tuple(example["completion_ids"][:-1]) in answers and example["completion_ids"][-1] == EOS
    for name in ("dpo", "kto"):
        assert batches[name]
        for batch in batches[name]:
            for last, in_loss, tail, tail_mask in ends_of(batch, "input_ids", "completion_mask", "attention_mask"):
                assert last == EOS and in_loss == 1
                assert tail == [tokenizer.pad_token_id] * len(tail) and tail_mask == [0] * len(tail)


def test_orpo_labels_keep_eos(pad_run):
    seen, batches, tokenizer, data, pad = pad_run
    assert len(seen["orpo"]) == 4
    for example in seen["orpo"]:
        for key in ("chosen", "rejected"):
            assert example[f"{key}_input_ids"][-2:] == [DOT, EOS] and example[f"{key}_labels"][-2:] == [DOT, EOS]
    assert batches["orpo"]
    for batch in batches["orpo"]:
        for key in ("chosen", "rejected"):
            for last, label, tail, tail_labels in ends_of(batch, f"{key}_input_ids", f"{key}_labels",
                                                          f"{key}_attention_mask"):
                assert last == EOS and label == EOS and tail_labels == [-100] * len(tail)


def test_default_chat_template_ends_assistant_turns_with_eos(toy_dir):
    from alignment.policy import load_tokenizer, prepare_tokenizer

    tok = load_tokenizer(str(toy_dir / "model"))
    tok.chat_template = None
    prepare_tokenizer(tok)
    turns = [{"role": "user", "content": "review of the tea in oslo :"},
             {"role": "assistant", "content": "the tea was good ."}]
    assert tok.apply_chat_template(turns, tokenize=False) == \
        "user : review of the tea in oslo :\nassistant : the tea was good .</s>\n"
    assert tok.apply_chat_template(turns[:1], tokenize=False, add_generation_prompt=True) == \
        "user : review of the tea in oslo :\nassistant : "
    assert tok.apply_chat_template(turns, tokenize=True, return_dict=True)["input_ids"][-2:] == [DOT, EOS]


def test_tokenizer_that_splits_special_tokens_reads_eos_text_as_eos(toy_dir, caplog):
    """TRL appends eos to answers as text: a tokenizer with ``split_special_tokens`` would read ``.</s>`` as one
    unknown word (the toy tokenizer splits on whitespace) and the answer would end without eos."""
    import logging

    from transformers import AutoTokenizer

    from alignment.policy import prepare_tokenizer

    tok = AutoTokenizer.from_pretrained(toy_dir / "model", split_special_tokens=True)
    assert tok(" the tea was good .</s>", add_special_tokens=False).input_ids[-1] == UNK  # the hazard
    with caplog.at_level(logging.INFO, logger="alignment"):
        prepare_tokenizer(tok)
    assert tok(" the tea was good .</s>", add_special_tokens=False).input_ids[-2:] == [DOT, EOS]
    assert any("splits special tokens" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------- behaviour


def greedy_finished(policy, adapter: str | None, prompts: list[str], max_new_tokens: int = 16) -> float:
    from alignment.evaluation import generate_greedy

    with policy.using(adapter) if adapter else policy.disabled() as model:
        out = generate_greedy(model, policy.tokenizer, prompts, max_new_tokens)
    return sum(finished for _, finished in out) / len(out)


def test_padless_model_learns_to_stop_and_ppo_finishes(toy_dir, tmp_path):
    """A pad-less base that never ends its answers (greedy: 0 of 32 finish), on chat rows with the default template:
    SFT then ends its greedy answers with eos, and a short PPO after it (HF engine, the toy's gold reward) finishes
    its sampled answers. On the old template (no eos after an answer) SFT never saw eos: 0 finished, and PPO's
    answers all ran to max_new_tokens."""
    from alignment.config import config_from_dict
    from alignment.pipeline import Pipeline
    from alignment.policy import SharedPolicy

    model = make_standin(toy_dir, tmp_path / "model", "none", never_stops=True)
    sft = toy_rows(toy_dir, "sft", SFT_ROWS)
    chat = write_jsonl(tmp_path / "chat.jsonl", [as_messages(r) for r in sft])
    held_out = [json.loads(x)["prompt"] for x in (toy_dir / "data" / "prompts.jsonl").read_text().splitlines()[:32]]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": [{"role": "user", "content": p}]}
                                                       for p in held_out])
    stages = [{"kind": "sft", "data": chat, "epochs": 1, "batch_size": 16, "learning_rate": 5e-3,
               "eval_fraction": 0.0},
              {"kind": "ppo", "prompts": prompts, "reward": "toy_gold", "iterations": PPO_ITERATIONS, "batch_size": 16,
               "minibatch_size": 16, "ppo_epochs": 1, "max_new_tokens": 16, "rollout": {"engine": "hf"}}]
    raw = {"name": "eos", "model": str(model), "output_dir": str(tmp_path / "runs"), "logging": {"log_every": 50},
           "stages": stages}
    summary = Pipeline(*config_from_dict(raw)).run()

    policy = SharedPolicy.load(str(model))
    chat_prompts = [policy.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                         add_generation_prompt=True) for p in held_out]
    assert greedy_finished(policy, None, chat_prompts) == 0.0  # the base never stops
    run = tmp_path / "runs" / "eos"
    policy.load_adapter("sft", run / "0-sft" / "adapters" / "policy")
    sft_finished = greedy_finished(policy, "sft", chat_prompts)
    ppo = [json.loads(x) for x in (run / "1-ppo" / "metrics.jsonl").read_text().splitlines()]
    ppo_finished = [m["finished"] for m in ppo if "finished" in m]
    print(f"SFT greedy finished {sft_finished:.3f}; PPO finished per iteration {ppo_finished}; "
          f"final kl {summary['stages'][1]['metrics'].get('kl')}")
    assert sft_finished >= 0.8
    assert len(ppo_finished) == PPO_ITERATIONS and ppo_finished[-1] >= 0.5 and min(ppo_finished) >= 0.5


SFT_ROWS = 640
PPO_ITERATIONS = 3


def test_padless_tokenizer_gets_one_line_saying_why(toy_dir, tmp_path, caplog):
    """The README's promise: a missing pad token gets the stated fallback (eos) and one clear line saying why."""
    import logging

    from alignment.policy import load_tokenizer

    model = make_standin(toy_dir, tmp_path / "model", "none")
    with caplog.at_level(logging.INFO, logger="alignment"):
        tok = load_tokenizer(str(model))
    lines = [r.getMessage() for r in caplog.records if "pad token" in r.getMessage()]
    assert tok.pad_token_id == EOS and len(lines) == 1
    assert lines[0] == ("tokenizer has no pad token: padding with '</s>' (embeddings are never resized; padding is "
                        "masked by the attention mask, so a real '</s>' at an answer's end is still learned)")


def test_ewc_dpo_on_a_padless_model_keeps_eos(toy_dir, tmp_path, monkeypatch):
    """The continual EWC stage's DPO objective (TRL's DPOTrainer plus the penalty) on the pad-less stand-in."""
    from alignment.config import config_from_dict
    from alignment.pipeline import Pipeline

    model = make_standin(toy_dir, tmp_path / "model", "none")
    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in toy_rows(toy_dir, "preference", 8)]
    data = write_jsonl(tmp_path / "pairs_task.jsonl", pairs)
    spy, batches = Spy(monkeypatch), BatchSpy(monkeypatch)
    stage = {"kind": "ewc", "data": data, "objective": "dpo", "fisher_samples": 2, **ONE_STEP}
    raw = {"name": "ewc", "model": str(model), "output_dir": str(tmp_path / "runs"), "stages": [stage],
           "continual": {"eval_samples": 4}, "logging": {"log_every": 50}}
    Pipeline(*config_from_dict(raw)).run()
    assert len(spy.seen["dpo"]) == 4 and batches.seen["dpo"]
    for example in spy.seen["dpo"]:
        assert example["chosen_ids"][-2:] == [DOT, EOS] and example["rejected_ids"][-2:] == [DOT, EOS]
    for batch in batches.seen["dpo"]:
        for last, in_loss, tail, tail_mask in ends_of(batch, "input_ids", "completion_mask", "attention_mask"):
            assert last == EOS and in_loss == 1 and tail == [EOS] * len(tail) and tail_mask == [0] * len(tail)
