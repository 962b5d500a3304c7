"""Multi-task joint training: every task's data at once, one adapter, per-task loss weights alpha(t).

The continual-learning upper bound: nothing is forgotten because nothing comes later. The loss is the weighted mean
of the examples' own losses (each the mean over its answer tokens), weighted by their task's alpha: `static`
weights (given, rescaled to average 1), or `dynamic` ones by Dynamic Weight Average (Liu et al., 2019), recomputed
every `window` steps from the tasks' recent losses: a task whose loss falls more slowly gets more weight.
"""

from __future__ import annotations

import random
from typing import Literal

from pydantic import Field, field_validator

from alignment.config import DataSource, StageConfig, Strict, TrainingConfig, check_data_source
from alignment.continual import TaskSpec
from alignment.stage import StageContext, StageResult
from stages.sft import SFTStage


class TaskEntry(Strict):
    data: DataSource
    task: str | None = None  # default: <name> of toy:task/<name>, else the file name
    eval_data: DataSource | None = None
    weight: float = Field(1.0, ge=0.0)  # static weighting: this task's alpha (before rescaling)


class MultitaskConfig(TrainingConfig):
    kind: Literal["multitask"] = "multitask"
    tasks: list[TaskEntry] = Field(min_length=1)  # each a data source, or {data, task, eval_data, weight}
    adapter_name: str = "policy"
    weighting: Literal["static", "dynamic"] = "static"
    temperature: float = Field(2.0, gt=0.0)  # dynamic: DWA softmax temperature
    window: int = Field(20, ge=1)  # dynamic: steps per loss window
    completion_only_loss: bool = True
    eval_steps: int | None = Field(None, ge=1)

    @field_validator("tasks", mode="before")
    @classmethod
    def _plain_sources(cls, value):
        return [{"data": v} if isinstance(v, str) else v for v in value] if isinstance(value, list) else value

    def continual_tasks(self) -> list[TaskSpec]:
        return [TaskSpec.from_stage(t.task, t.data, t.eval_data, self.columns) for t in self.tasks]

    def data_sources(self) -> dict[str, str]:
        out = {}
        for i, t in enumerate(self.tasks):
            out[f"tasks.{i}.data"] = t.data
            if t.eval_data:
                out[f"tasks.{i}.eval_data"] = t.eval_data
        return out

    def check_chain(self, index: int, earlier: list[StageConfig]) -> list[str]:
        problems = [
            f"stages.{index}.{field}: {problem}"
            for field, source in self.data_sources().items()
            if (problem := check_data_source(source))
        ]
        if self.eval_data:
            problems.append(f"stages.{index}.eval_data: multitask takes held-out data per task; set tasks.<i>.eval_data")
        names = [t.name for t in self.continual_tasks()]
        if len(set(names)) != len(names):
            problems.append(f"stages.{index}.tasks: two tasks share a name ({', '.join(names)}); set `task:` on each")
        return problems


class MultitaskStage(SFTStage):
    """Multi-task joint training of one adapter with static or dynamic (DWA) per-task loss weights."""

    Config = MultitaskConfig

    def run(self, ctx: StageContext) -> StageResult:
        from alignment.continual import sft_rows

        cfg = self.config
        names = [t.name for t in cfg.continual_tasks()]
        rng = random.Random(ctx.seed)
        rows = []
        for task_id, name in enumerate(names):
            task_rows = sft_rows(self.task_data(ctx, name).train)
            rows += [{**r, "task_id": task_id} for r in task_rows[: cfg.max_samples or None]]
        rng.shuffle(rows)
        rows, _, fitted = self.fit_rows(ctx, rows, [], "prompt_completion")  # prompts cut from the left to fit
        self.weighting = TaskWeights([t.weight for t in cfg.tasks], cfg.weighting, cfg.temperature, cfg.window)
        model = self._prepare_model(ctx)
        trainer = self.build_trainer(ctx, model, rows, [], "prompt_completion", data_collator=task_collator(ctx))
        from alignment.trainer_hooks import train

        train_loss = train(trainer, ctx)  # checkpoints, resume, NaN guard
        model.eval()
        metrics = {"train_loss": round(train_loss, 4), "train_samples": len(rows), **fitted}
        metrics.update({f"alpha/{name}": round(a, 4) for name, a in zip(names, self.weighting.alpha)})
        artifact = self._save(ctx)
        result = StageResult(metrics, {cfg.adapter_name: ctx.relative(artifact)}, ctx.task_accuracy())
        self.method(ctx).release(ctx.policy, cfg.adapter_name)  # base-weight methods: the shared base as loaded
        return result

    def trainer_class(self, ctx: StageContext):
        return weighted_trainer(super().trainer_class(ctx), self.weighting, ctx.logger)


class TaskWeights:
    """alpha per task: static, or Dynamic Weight Average over windows of per-task mean losses."""

    def __init__(self, weights: list[float], mode: str, temperature: float, window: int):
        from alignment.algorithms.continual import static_weights

        self.alpha = static_weights(weights, len(weights)) if mode == "static" else [1.0] * len(weights)
        self.mode, self.temperature, self.window = mode, temperature, window
        self.sums, self.counts, self.history, self.steps = [0.0] * len(weights), [0] * len(weights), [], 0

    def record(self, task_ids: list[int], losses: list[float]) -> bool:
        """Add a batch's per-example losses; True when a window closed and (dynamic) alpha changed."""
        from alignment.algorithms.continual import dynamic_weight_average

        for k, loss in zip(task_ids, losses):
            self.sums[k] += loss
            self.counts[k] += 1
        self.steps += 1
        if self.mode != "dynamic" or self.steps % self.window or not all(self.counts):
            return False
        self.history = (self.history + [[s / c for s, c in zip(self.sums, self.counts)]])[-2:]
        self.sums, self.counts = [0.0] * len(self.sums), [0] * len(self.counts)
        if len(self.history) == 2:
            self.alpha = dynamic_weight_average(self.history[1], self.history[0], self.temperature)
        return True


def task_collator(ctx: StageContext):
    """TRL's language-modelling collator, plus each example's `task_id`."""
    import dataclasses

    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    @dataclasses.dataclass
    class TaskCollator(DataCollatorForLanguageModeling):
        def torch_call(self, examples):
            batch = super().torch_call(examples)
            batch["task_id"] = torch.tensor([e["task_id"] for e in examples])
            return batch

    return TaskCollator(pad_token_id=ctx.policy.tokenizer.pad_token_id)


def weighted_trainer(trainer_cls, weighting: TaskWeights, logger):
    """An SFT trainer whose loss is the alpha-weighted mean of the examples' own answer losses."""
    import torch

    from alignment.policy import real_token_logits

    class WeightedTaskTrainer(trainer_cls):
        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if "task_id" not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, "task_id"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            task_ids, labels = inputs.pop("task_id"), inputs.pop("labels")
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False)
            logits = real_token_logits(outputs.logits, inputs["input_ids"])  # prompt tuning: without its virtual tokens
            targets = labels[:, 1:]
            token_loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="none"
            )
            mask = targets != -100
            per_example = (token_loss * mask).sum(1) / mask.sum(1).clamp(min=1)
            alpha = torch.tensor(weighting.alpha, device=per_example.device)[task_ids]
            loss = (alpha * per_example).mean()
            if self.model.training and weighting.record(task_ids.tolist(), per_example.detach().tolist()):
                logger.log(self.state.global_step, {f"alpha/{k}": round(a, 4) for k, a in enumerate(weighting.alpha)}, echo=False)
            scaled = getattr(self, "loss_is_scaled_for_ga", None)
            if scaled is None:
                scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
            if scaled:
                loss = loss / self.current_gradient_accumulation_steps
            return (loss, outputs) if return_outputs else loss

    return WeightedTaskTrainer
