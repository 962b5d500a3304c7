"""Optimiser schedules from the fine-tuning catalogue, for trainer-based stages (SFT and the stages built on it).

- layer-wise learning-rate decay (LLRD): parameters are grouped by depth (``alignment.methods.layer_group``:
  0 embeddings, i + 1 decoder layer i, L + 1 final norm / head / virtual-token encoders); group g trains at
  ``learning_rate * decay ** (L + 1 - g)``;
- progressive unfreezing: only the top non-empty group trains at first; every ``every`` steps (or epochs) one more
  group below joins (a ``TrainerCallback`` switching ``requires_grad``; AdamW skips parameters without gradients,
  so a frozen group stays bit-identical);
- warmup + cosine/linear decay, weight decay and gradient clipping are the stage's own fields
  (`lr_scheduler`, `warmup_ratio`, `weight_decay`, `max_grad_norm`), handed to the transformers Trainer.
"""

from __future__ import annotations

from transformers import TrainerCallback

from alignment.methods import layer_group, num_layers


def parameter_groups(model, learning_rate: float, weight_decay: float, layer_decay: float | None) -> list[dict]:
    """AdamW parameter groups of the trainable parameters: one per (depth group, decayed or not). Matrices get
    ``weight_decay``; vectors (norm gains, biases) none, as transformers does."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return groups_of(named, num_layers(model), learning_rate, weight_decay, layer_decay)


def groups_of(named, L: int, learning_rate: float, weight_decay: float, layer_decay: float | None) -> list[dict]:
    """``parameter_groups`` of given (name, parameter) pairs in a model of ``L`` decoder layers."""
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in named:
        depth, decays = layer_group(name, L), param.ndim >= 2
        scale = layer_decay ** (L + 1 - depth) if layer_decay else 1.0
        group = groups.setdefault((depth, decays), {
            "params": [], "names": [], "depth": depth, "lr": learning_rate * scale,
            "weight_decay": weight_decay if decays else 0.0,
        })
        group["params"].append(param)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups)]


class ProgressiveUnfreezing(TrainerCallback):
    """Top group first; one more group below every ``every`` steps (unit ``steps``) or epochs (unit ``epochs``)."""

    def __init__(self, groups: list[dict], every: int, unit: str = "steps", switch: bool = True):
        depths = sorted({g["depth"] for g in groups}, reverse=True)
        self.schedule = [[p for g in groups if g["depth"] == d for p in g["params"]] for d in depths]
        self.depths = depths
        self.every, self.unit = every, unit
        self.switch = switch  # False: gradients only (requires_grad must not change under TRL's `ref` adapter switch)
        self.unfrozen = 0

    def unfrozen_groups(self, step: int, epoch: float) -> int:
        done = step if self.unit == "steps" else int(epoch)
        return min(len(self.schedule), 1 + done // self.every)

    def apply(self, step: int, epoch: float) -> None:
        n = self.unfrozen_groups(step, epoch)
        if n == self.unfrozen or not self.switch:
            return
        for i, params in enumerate(self.schedule):
            for p in params:
                p.requires_grad_(i < n)
        self.unfrozen = n

    def hold(self, step: int, epoch: float) -> None:
        """Drop the gradients of the groups not yet unfrozen (AdamW then skips them). ``requires_grad`` alone does not
        hold where something re-enables it mid-training: peft's ``set_adapter`` (TRL switching to its `ref` adapter
        in DPO/KTO, our shared policy on every adapter switch)."""
        for params in self.schedule[self.unfrozen_groups(step, epoch):]:
            for p in params:
                p.grad = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.apply(0, 0.0)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.hold(state.global_step, state.epoch or 0.0)

    def on_step_begin(self, args, state, control, **kwargs):
        self.apply(state.global_step, state.epoch or 0.0)

    def on_train_end(self, args, state, control, **kwargs):
        if not self.switch:
            return
        for params in self.schedule:  # the method's trainable set, as it was
            for p in params:
                p.requires_grad_(True)


def trainer_schedule(cfg, model, switch: bool = True) -> tuple[dict, list]:
    """(Trainer keyword arguments, callbacks) for a stage config's `layer_lr_decay` / `unfreeze_every`; nothing when
    neither is set (the Trainer builds its own AdamW). ``switch`` False: progressive unfreezing leaves
    ``requires_grad`` alone and only drops gradients (DPO/KTO on a peft adapter: TRL's switch to its `ref` adapter
    re-enables ``requires_grad`` between a checkpointed forward and its recomputation, which then fails)."""
    decay, every = getattr(cfg, "layer_lr_decay", None), getattr(cfg, "unfreeze_every", None)  # SFT-family fields
    if not decay and not every:
        return {}, []
    groups = parameter_groups(model, cfg.learning_rate, cfg.weight_decay, decay)
    import torch

    optimizer = torch.optim.AdamW(groups)
    callbacks = [ProgressiveUnfreezing(groups, every, cfg.unfreeze_unit, switch)] if every else []
    return {"optimizers": (optimizer, None)}, callbacks


class OnlineSchedule:
    """LLRD and progressive unfreezing for the online stages' own loops (PPO, GRPO, RLOO), on the policy's
    parameters: ``optimizer()`` builds the AdamW groups; ``hold(iteration)`` (after backward, before clipping) drops
    the gradients of the groups not yet unfrozen, one more every ``unfreeze_every`` iterations (top first), so AdamW
    skips them. Gradients rather than ``requires_grad``: the shared policy re-applies trainability on every adapter
    switch."""

    def __init__(self, cfg, named, L: int, params: list):
        decay, self.every = getattr(cfg, "layer_lr_decay", None), getattr(cfg, "unfreeze_every", None)
        self.params = params  # without a schedule: one group, in the order the stage has always used
        # no weight decay in the groups (online stages have no `weight_decay` field; the plain AdamW's 0.01 aside)
        self.groups = groups_of(named, L, cfg.learning_rate, 0.0, decay) if decay or self.every else None
        self.unfreezing = ProgressiveUnfreezing(self.groups, self.every) if self.every else None

    def optimizer(self, learning_rate: float):
        import torch

        return torch.optim.AdamW(self.groups if self.groups else self.params, lr=learning_rate)

    def hold(self, iteration: int) -> None:
        if self.unfreezing is not None:
            self.unfreezing.hold(iteration - 1, 0.0)
