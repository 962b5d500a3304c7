"""HF engine: sampling with ``model.generate`` on the shared policy (active adapter), no weight copy to sync."""

from __future__ import annotations

import torch

from alignment.rollout import Rollout, Sampling, completion_text, plain_generation, stop_token_ids


class HFEngine:
    name = "hf"
    sync_mode = "shared"  # generates with the training weights themselves

    def __init__(self, policy, adapter: str = "policy", batch_size: int = 64):
        self.policy, self.adapter, self.batch_size = policy, adapter, batch_size

    def sleep(self) -> None:
        """Nothing to free: the HF engine is the training model."""

    @torch.no_grad()
    def generate(self, prompts: list[str], sampling: Sampling, seeds: list[int] | None = None) -> Rollout:
        """Samples from torch's RNG, which checkpoints save and restore (``seeds`` is for vLLM; unused here)."""
        tok = self.policy.tokenizer
        out = Rollout(list(prompts), [], [], [], [], [])
        side = tok.padding_side
        tok.padding_side = "left"
        try:
            with self.policy.using(self.adapter) as model:
                model.eval()
                stop = stop_token_ids(tok, model)
                with plain_generation(model):  # only our settings: the trainer's log-probs are the sampler's
                    for start in range(0, len(prompts), self.batch_size):
                        self._generate_chunk(model, prompts[start : start + self.batch_size], sampling, stop, out)
        finally:
            tok.padding_side = side
        return out

    def _generate_chunk(self, model, prompts, sampling, stop: list[int], out: Rollout) -> None:
        tok = self.policy.tokenizer
        batch = tok(prompts, return_tensors="pt", padding=True).to(model.device)
        generated = model.generate(
            **batch,
            do_sample=sampling.temperature > 0,
            temperature=sampling.temperature if sampling.temperature > 0 else None,
            top_p=sampling.top_p,
            top_k=0,
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=tok.pad_token_id,
            eos_token_id=stop,
            output_scores=True,
            return_dict_in_generate=True,
        )
        new_tokens = generated.sequences[:, batch["input_ids"].shape[1] :]
        # scores: one (B, V) tensor per step, after temperature/top-p processing
        step_logps = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in generated.scores], dim=1)
        token_logps = step_logps.gather(-1, new_tokens[:, :, None]).squeeze(-1)
        for i in range(len(prompts)):
            row = new_tokens[i].tolist()
            end = next((k for k, t in enumerate(row) if t in stop), None)  # HF pads after the first stop id
            finished = end is not None
            length = end + 1 if finished else len(row)
            ids = row[:length]
            prompt_ids = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
            out.prompt_ids.append(prompt_ids)
            out.response_ids.append(ids)
            out.texts.append(completion_text(tok, prompt_ids, ids))
            out.finished.append(finished)
            out.logprobs.append(token_logps[i, :length].tolist())

    def sync(self, policy) -> float:
        return 0.0
