"""Data parallelism for the training loop: joining the process group torchrun or ``accelerate launch`` set up,
and the collectives the loop needs (gradient averages, rank 0's validation numbers).

Data parallelism for a prompt is plain: every process holds the frozen model and the same prompt, runs its
share of each batch, and the prompt gradients are averaged across processes before every step (the all-reduce
DDP does, on a few kilobytes), so all processes keep identical prompts and take the same decisions.
"""

from __future__ import annotations

import atexit
import os

import torch

from softprompt.config import ConfigError


def launch_world_size() -> int:
    """The process count torchrun / accelerate set in ``WORLD_SIZE`` (1 when unset).

    Raises:
        ConfigError: ``WORLD_SIZE`` is not a number.
    """
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"the environment variable WORLD_SIZE={value!r} is not a process count (torchrun and "
                          "accelerate set it; unset it for one process)") from None


def _leave_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def distributed() -> tuple[int, int]:
    """``(rank, world_size)``; joins the process group when launched by torchrun / ``accelerate launch``.

    (See the module for what the processes share.)
    """
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        world = launch_world_size()
        if world <= 1:
            return 0, 1
        try:
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        except (ValueError, RuntimeError) as e:  # MASTER_ADDR, RANK... missing: not launched by torchrun
            raise ConfigError(f"WORLD_SIZE={world} but the process group cannot start ({e}); launch with "
                              "torchrun or accelerate, or unset WORLD_SIZE") from None
        # left at exit, the group's threads were torn down by the interpreter: now and then a rank aborted
        # ("terminate called without an active exception", SIGABRT) after its work was done, failing the launch
        atexit.register(_leave_group)
    return dist.get_rank(), dist.get_world_size()


def unit_weights(counts: list[int], world: int, device) -> list[float]:
    """Per micro-batch of this process, the factor its mean loss takes so that the gradients, averaged over the
    ``world`` processes, are those of the mean over every unit of the step (``count * world / all units``)."""
    total = float(sum(counts))
    if world > 1:  # every process's units
        t = torch.tensor([total], dtype=torch.float64, device=device)
        all_average([t], world)
        total = float(t[0]) * world
    return [c * world / total if total else 0.0 for c in counts]


def all_average(tensors: list[torch.Tensor], world: int) -> None:
    import torch.distributed as dist

    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= world


def from_rank0(obj, world: int):
    """Rank 0's ``obj`` on every process. Validation metrics drive decisions every process must share (the best
    step, the plateau, early stopping); computed on each, numbers that differ in the last bit (non-deterministic
    kernels) could stop one process while the others waited for it in the next all-reduce."""
    if world <= 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
