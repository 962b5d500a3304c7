"""Multi-process runs (``accelerate launch`` / ``torchrun``): every rank trains, rank 0 alone writes the run folder.

accelerate (DDP, DeepSpeed, FSDP) does the distributed work inside TRL's trainers; this module only knows the rank
and offers a barrier so that no rank reads an artifact before rank 0 has finished writing it.
"""

from __future__ import annotations

import os


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def start() -> None:
    """Join the process group (gloo on CPU, NCCL on GPUs) when launched with several processes.

    Without ``cpu=True`` a CPU-only ``accelerate launch`` state says ``DistributedType.NO`` (one process), and
    accelerate's ``reduce`` and ``wait_for_everyone`` do nothing, until a TRL trainer happens to reset the state: a
    run whose TRL stages were all skipped (a resume) would train its online stages without averaging gradients."""
    if world_size() > 1:
        import torch
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())


def barrier() -> None:
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def gather_objects(value) -> list:
    """``value`` from every rank, in rank order (all ranks must call it at the same point); ``[value]`` in one
    process. Travels through the process group in memory (torch's object collective), never through a file."""
    if world_size() == 1:
        return [value]
    import torch.distributed as dist

    out = [None] * world_size()
    dist.all_gather_object(out, value)
    return out
