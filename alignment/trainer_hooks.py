"""Reliability for the stages on TRL/transformers trainers: checkpoints marked complete, resume, NaN guard, Ctrl-C.

The trainer does the heavy lifting (``save_strategy="steps"`` writes adapters, optimiser, scheduler, RNG states and
the trainer state; ``resume_from_checkpoint`` restores them and skips the batches already seen, so the data order
is the uninterrupted run's). What it lacks, these callbacks add:

- ``COMPLETE`` is written into ``checkpoint-N`` after the trainer finished saving it; resume only picks complete ones;
- every named adapter (TRL's ``default`` and ``ref`` too) is restored from the checkpoint, not only the active one;
- a log line is forced at every checkpoint and at the last step, so ``train_loss`` over the whole stage can be
  rebuilt from the restored ``log_history`` (the trainer's own ``training_loss`` covers only the steps since resume);
- non-finite gradients stop the stage before the optimiser step; logged gradient norms are checked for spikes;
- a pending Ctrl-C makes the trainer save at the end of the current step, then stops.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from alignment import checkpoint, faults
from alignment.guards import GradNormMonitor, check_finite


class ReliabilityCallback(TrainerCallback):
    def __init__(self, stage: str, label: str, resume: Path | None, folder: Path | None = None):
        self.stage, self.label, self.resume = stage, label, resume  # folder name (kill points), name in errors
        self.monitor = GradNormMonitor(label, folder)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.resume is not None and model is not None:
            restore_adapters(model, self.resume)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            from alignment.guards import grad_norm

            check_finite(self.label, state.global_step + 1, gradient=grad_norm(model.parameters()))

    def on_step_end(self, args, state, control, **kwargs):
        faults.kill_point(self.stage, f"step:{state.global_step}")
        if checkpoint.interrupt_requested():
            control.should_save = True
        if control.should_save or state.global_step >= state.max_steps:
            control.should_log = True  # so log_history covers every step up to each checkpoint
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        check_finite(self.label, state.global_step, loss=logs.get("loss"))
        if logs.get("grad_norm") is not None:
            self.monitor.check(state.global_step, logs["grad_norm"])

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        faults.kill_point(self.stage, f"save:{state.global_step}")
        if folder.is_dir():
            checkpoint.mark_complete(folder, state.global_step)
        checkpoint.stop_if_interrupted(f"{self.label} step {state.global_step}")


def restore_adapters(model, folder: Path) -> None:
    """Load every named adapter of ``model`` from a trainer checkpoint (peft puts ``default`` at the top and the
    others in sub-folders named after them)."""
    for name in getattr(model, "peft_config", {}) or {}:
        candidates = [folder / name / "adapter_model.safetensors"]
        if name == "default":
            candidates.append(folder / "adapter_model.safetensors")
        found = next((c for c in candidates if c.is_file()), None)
        if found is not None:
            checkpoint.load_adapter_weights(model, name, found)


def train(trainer, ctx) -> float:
    """``trainer.train()`` with checkpoints, resume from ``ctx.resume`` and the guards; returns the mean training
    loss over every step of the stage (the same whether or not it was interrupted)."""
    stage = ctx.dir.name
    trainer.add_callback(ReliabilityCallback(stage, ctx.label, ctx.resume, ctx.dir))
    if ctx.resume is not None:
        from alignment.metrics import console

        console.print(f"resuming {stage} from {ctx.resume.name} (step {checkpoint.checkpoint_step(ctx.resume)})")
    trainer.train(resume_from_checkpoint=str(ctx.resume) if ctx.resume is not None else None)
    return mean_train_loss(trainer.state.log_history)


def mean_train_loss(log_history: list[dict]) -> float:
    """Mean per-step loss from the trainer's log lines (each is the mean over the steps since the previous one)."""
    total, previous = 0.0, 0
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            total += entry["loss"] * (entry["step"] - previous)
            previous = entry["step"]
    return total / max(previous, 1)
