"""The lr schedule of the one training loop (``--schedule``): a linear warmup over ``--warmup-steps``, then

- ``linear`` / ``cosine``: decay to 0 at the last step;
- ``constant``: the peak lr to the end;
- ``wsd`` (warmup-stable-decay): the peak lr, then a linear decay to 0 over the last :data:`WSD_DECAY` of the
  steps. With ``--stop-when-flat``, a plateau starts its own cool-down earlier (:mod:`softprompt.plateau`), so
  the lr stays high until the validation loss flattens, whatever the number of steps, and a run that never
  flattens still ends annealed.

The guard's lr scale multiplies the schedule's factor; the plateau's cool-down too, except under ``wsd``, where
it replaces the decay (:func:`with_cooldown`): multiplied, a plateau after ``decay_from`` minus a third of its
steps gave a cool-down that fell quadratically, shorter than the linear one the same run gets with more steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from softprompt.config import TrainArgs

WSD_DECAY = 0.25  # the share of the steps that ``wsd``'s decay takes: a third of the stable phase before it


def wsd_decay_start(total_steps: int, warmup_steps: int) -> int:
    """The step ``wsd``'s decay starts at in a ``total_steps`` run (never inside the warmup)."""
    return max(warmup_steps, total_steps - math.ceil(total_steps * WSD_DECAY))


def lr_lambda(args: TrainArgs, total_steps: int) -> Callable[[int], float]:
    """The lr multiplier of optimizer step ``step`` (0-based) of a ``total_steps`` run (see the module)."""
    decay_from = wsd_decay_start(total_steps, args.warmup_steps)

    def fn(step: int) -> float:
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        if args.schedule == "constant" or (args.schedule == "wsd" and step < decay_from):
            return 1.0
        if args.schedule == "wsd":
            return max(0.0, (total_steps - step) / max(1, total_steps - decay_from))
        progress = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
        progress = min(1.0, progress)
        return 1.0 - progress if args.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return fn


def with_cooldown(args: TrainArgs, value: float, cooldown: float) -> float:
    """The schedule's factor ``value`` with the plateau's cool-down factor ``cooldown`` applied: under ``wsd`` the
    lower of the two (the cool-down replaces the decay, whichever comes first falls linearly to 0); under the
    other schedules their product (the cool-down scales what is left of the decay)."""
    return min(value, cooldown) if args.schedule == "wsd" else value * cooldown


def warmup_warning(args: TrainArgs, total_steps: int) -> str | None:
    """What is wrong when the warmup takes the whole ``total_steps`` run (``None`` when it does not): the lr is
    still rising towards ``--lr`` at the last step, and a decaying schedule never starts its decay. The schedule
    is kept as asked; the run says so (console and ``metrics.jsonl``)."""
    if args.warmup_steps < total_steps:
        return None
    decay = "" if args.schedule == "constant" else f"; the {args.schedule} schedule's decay never starts"
    return (f"--warmup-steps {args.warmup_steps} >= the run's {total_steps} steps: the lr is still warming up at "
            f"the last step ({min(1.0, total_steps / args.warmup_steps):.3g} x --lr){decay}; lower --warmup-steps "
            "or train longer (--max-steps, --epochs)")
