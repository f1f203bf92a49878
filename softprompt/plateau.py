"""When a validation-loss curve has flattened: the rule ``compare``'s "converged" column and ``train``'s
``--stop-when-flat`` share, and the cool-down that follows a plateau.

A curve is a list of ``{"step", "loss"}`` points. Its *last-third gain* at step ``s`` is ``(ref - best) / ref``:
``ref`` is the lowest loss evaluated at or before ``2s/3``, ``best`` the lowest one evaluated after it (up to
``s``): how much the best loss improved over the last third. The curve is flat when that gain is below a
tolerance: a loss that rises again (over-fitting, a too large lr) counts as flat, since more steps at that lr
would not help. Taking the lowest loss, not the last one, before ``2s/3`` keeps one noisy evaluation there
(a bump of a prompt trained at a high lr) from passing for progress.

A run trained with ``stop_when_flat`` does not stop at the plateau: a loss that stopped falling at a high lr
is often bouncing around a lower one, so the lr then falls linearly to 0 over another third of the steps
(:func:`cooldown_end`, :func:`cooldown_factor`: the decay phase of a warmup-stable-decay schedule, started
by the plateau instead of a fixed step), and the run stops after it.
"""

from __future__ import annotations

import math

MIN_EVALS = 6  # evaluations before the rule applies: at least two of them in the last third
CONFIRM = 2  # a run stops once the rule has held at this many evaluations in a row (one bump is noise)


def last_third_gain(curve: list[dict], steps: float) -> float | None:
    """The relative fall of the validation loss over the last third of ``steps`` (see the module); ``None``
    when the curve has no point on one side of ``2 * steps / 3``; ``nan`` when a loss is not finite."""
    cut = steps * 2 / 3
    before = [p["loss"] for p in curve if p["step"] <= cut]
    after = [p["loss"] for p in curve if cut < p["step"] <= steps]
    if not before or not after:
        return None
    if not all(math.isfinite(v) for v in before + after):
        return math.nan
    ref, best = min(before), min(after)
    return (ref - best) / abs(ref) if ref else 0.0


def convergence(curve: list[dict], steps: float, tol: float) -> tuple[bool | None, float | None]:
    """``(flat, gain)`` of ``curve`` at ``steps``: ``(None, None)`` without a point on both sides of 2/3,
    ``(False, None)`` when a loss is not finite, else ``(gain < tol, gain rounded to 4 places)``."""
    gain = last_third_gain(curve, steps)
    if gain is None:
        return None, None
    if math.isnan(gain):
        return False, None
    return gain < tol, round(gain, 4)


def flat_now(curve: list[dict], tol: float) -> bool:
    """Whether a run that measured ``curve`` (in step order) may stop now: its last-third gain was below
    ``tol`` at each of its last :data:`CONFIRM` evaluations, each with at least :data:`MIN_EVALS` before it
    (counting itself). A single evaluation where the loss bumps up is thus not taken for a plateau."""
    if len(curve) < MIN_EVALS + CONFIRM - 1:
        return False
    return all(convergence(curve[:len(curve) - k], curve[len(curve) - k - 1]["step"], tol)[0] is True
               for k in range(CONFIRM))


def cooldown_end(flat_step: int, eval_every: int, total: int) -> int:
    """The step a run whose validation loss flattened at ``flat_step`` stops at: another third of its steps
    (rounded up to whole evaluation intervals, so that it ends with an evaluation), at most ``total``."""
    third = -(-flat_step // 3)
    return min(total, flat_step + max(eval_every, -(-third // eval_every) * eval_every))


def cooldown_factor(step: int, flat_step: int | None, stop_at: int | None) -> float:
    """The lr multiplier of optimizer step ``step`` (0-based): 1 before the plateau, then falling linearly
    from 1 at ``flat_step`` towards 0 at ``stop_at`` (the cool-down that lets a noisy plateau settle)."""
    if flat_step is None or stop_at is None or step < flat_step:
        return 1.0
    if stop_at <= flat_step:
        return 0.0
    return max(0.0, (stop_at - step) / (stop_at - flat_step))
