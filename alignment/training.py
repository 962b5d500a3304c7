"""The boundary with transformers/TRL trainers: shared arguments, and logging into metrics.jsonl + the console."""

from __future__ import annotations

from transformers import PrinterCallback, ProgressCallback, TrainerCallback

from alignment.metrics import MetricsLogger


class _ForwardLogs(TrainerCallback):
    def __init__(self, logger: MetricsLogger):
        self.logger = logger

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            metrics = {k: round(v, 6) if isinstance(v, float) else v for k, v in logs.items() if k != "total_flos"}
            self.logger.log(state.global_step, metrics)


def trainer_callbacks(logger: MetricsLogger) -> list[TrainerCallback]:
    return [_ForwardLogs(logger)]


def use_console_progress(trainer) -> None:
    """Our console line per logged step instead of the trainer's progress bar and dict printing (a bar is noise in a
    log file or CI); in a multi-process run, each rank also reports how many (and which) training examples it saw,
    when training ends."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    recorder = record_shard(trainer)
    if recorder is not None:
        trainer.add_callback(_ReportShard(recorder))


class _ReportShard(TrainerCallback):
    def __init__(self, recorder):
        self.recorder = recorder

    def on_train_end(self, args, state, control, **kwargs):
        self.recorder.report()


def trl_args(cfg, ctx) -> dict:
    """Keyword arguments every TRL trainer config takes, from a ``TrainingConfig`` and the stage context."""
    import torch

    dtype = ctx.policy.base.dtype
    return dict(
        output_dir=str(ctx.dir / "checkpoints"),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a value below 1 is a fraction of the steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        gradient_checkpointing=method_trainer_args(ctx).get("gradient_checkpointing", cfg.gradient_checkpointing),
        max_length=cfg.max_length,
        logging_steps=ctx.pipeline.logging.log_every,
        save_strategy="steps",  # checkpoints for resume (alignment/trainer_hooks.py marks them complete)
        save_steps=cfg.checkpoint_every,
        save_total_limit=2,
        logging_nan_inf_filter=False,  # a NaN loss must reach the guard, not be averaged away
        report_to="none",
        disable_tqdm=True,  # our MetricsLogger prints one line per logged step
        seed=ctx.seed,
        data_seed=ctx.seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        dataset_num_proc=None,
        **{k: v for k, v in method_trainer_args(ctx).items() if k != "gradient_checkpointing"},
    )


def method_trainer_args(ctx) -> dict:
    """The adapter method's own trainer arguments (prompt learning: no gradient checkpointing), over the stage's."""
    from alignment.methods import method_for

    return method_for(ctx.adapter).trainer_args()


class ShardRecorder:
    """Wraps a trainer's data collator to count and fingerprint the training examples this rank sees."""

    def __init__(self, collator):
        import hashlib

        self.collator, self.count, self.digest = collator, 0, hashlib.sha256()

    def __call__(self, examples):
        self.count += len(examples)
        for example in examples:
            self.digest.update(repr(example.get("input_ids", example)).encode())
        return self.collator(examples)

    def report(self) -> None:
        """One line per rank (every rank prints it): proof that the ranks trained on different shards."""
        import sys

        from alignment import distributed

        print(f"rank {distributed.rank()}/{distributed.world_size()}: trained on {self.count} examples "
              f"(digest {self.digest.hexdigest()[:12]})", file=sys.stderr, flush=True)


def record_shard(trainer) -> ShardRecorder | None:
    """In a multi-process run, record what this rank trains on (call before ``trainer.train()``)."""
    from alignment import distributed

    if distributed.world_size() == 1:
        return None
    recorder = ShardRecorder(trainer.data_collator)
    trainer.data_collator = recorder
    return recorder
