"""Bridges between transformers/TRL trainers and our logging: metrics.jsonl + one console line per log step."""

from __future__ import annotations

from transformers import ProgressCallback, TrainerCallback

from alignment.metrics import MetricsLogger


class _ForwardLogs(TrainerCallback):
    def __init__(self, logger: MetricsLogger):
        self.logger = logger

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            metrics = {k: round(v, 6) if isinstance(v, float) else v for k, v in logs.items() if k != "total_flos"}
            self.logger.log(state.global_step, metrics)


class _QuietProgress(ProgressCallback):
    """The trainer's progress bar without its raw dict printing (our logger prints one line instead)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return


def trainer_callbacks(logger: MetricsLogger) -> list[TrainerCallback]:
    return [_ForwardLogs(logger)]


def use_console_progress(trainer) -> None:
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_QuietProgress())
