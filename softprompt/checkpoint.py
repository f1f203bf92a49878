"""The training loop's checkpoint (``checkpoint/`` in a run's output folder): written atomically every
``--checkpoint-every`` steps, read back by ``--resume``.

A checkpoint holds the method's tensors, the best state so far, the optimizer and scheduler state, the RNG
states, the divergence guard's snapshots, and ``state.json`` (the loop state and the settings a resume must
repeat, :func:`resume_settings`). :func:`load_checkpoint` checks all of it before the run continues: a
checkpoint written with other settings, or a damaged file, is a :class:`~softprompt.config.ConfigError`
naming it (CLI exit 2), never a traceback mid-run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from softprompt.config import ConfigError, TrainArgs, flag
from softprompt.data.dataset import examples_digest
from softprompt.guard import DivergenceGuard
from softprompt.methods import PromptMethod
from softprompt.model import fingerprint_mismatch
from softprompt.store.atomic import write_folder_atomically

log = logging.getLogger("softprompt")


# (--max-steps/--epochs may grow on a resume, to train longer: the schedule then follows the new length)
RESUMED = ("optimizer", "lr", "weight_decay", "seed", "batch_size", "grad_accum", "group_by_length",
           "warmup_steps", "schedule", "metric")
DATA_KEY = "train_data_sha256"  # the encoded training examples: the data order is a function of (seed, epoch) over them
VALIDATION_KEY = "validation_digest"  # the validation examples the best metric and the plateau's curve were measured on
MODEL_KEY = "model_fingerprint"  # the base model the prompt was trained against (:func:`softprompt.model.fingerprint`)


def resume_settings(args: TrainArgs, train_enc: list | None = None, validation: list | None = None,
                    model_fingerprint: dict | None = None) -> dict:
    """The settings a checkpoint records and a resume must repeat: the optimizer state and the lr schedule come
    from the checkpoint (another optimizer fails at its first step, another lr would be ignored), the rest of
    the epoch's data order from the seed, the batch size and the length grouping (another would repeat some
    examples and skip others), the schedule's shape from the warmup and the schedule, the best state so far
    from the metric (an accuracy compared with a loss). With ``train_enc`` (the encoded training examples), a
    fingerprint of them: other data (another file, data seed, max length or sample cap) shuffled by the same
    seed is another order. With ``validation`` (the validation examples, ``[]`` for none), their digest: the best
    metric and the plateau's curve so far were measured on them. With ``model_fingerprint``, the base model's:
    a prompt trained against one model and continued against another is neither's."""
    out = {k: getattr(args, k) for k in RESUMED}
    if train_enc is not None:
        h = hashlib.sha256()
        for e in train_enc:
            h.update(repr((list(e.input_ids), e.target_start, e.class_label, e.target_mask)).encode())
        out[DATA_KEY] = h.hexdigest()
    if validation is not None:
        out[VALIDATION_KEY] = examples_digest(validation)
    if model_fingerprint is not None:
        out[MODEL_KEY] = model_fingerprint
    return out


def _changed(key: str, there, now) -> str | None:
    """How the setting ``key`` differs between the checkpoint (``there``) and this run (``now``); ``None`` when
    it does not."""
    if key == MODEL_KEY:
        if not isinstance(there, dict):
            return f"the base model (the checkpoint's record of it, {there!r}, is not a fingerprint)"
        fields = [m.split(":")[0] for m in fingerprint_mismatch(there, now)]
        if not fields:  # the same weights (also loaded in another dtype, or from another path)
            return None
        return (f"the base model (--model {there.get('name_or_path')!r} there, {now.get('name_or_path')!r} now; "
                f"they differ in {', '.join(fields)})")
    if there == now:
        return None
    return {DATA_KEY: "the training examples (another file, --data-seed, --max-length or sample cap)",
            VALIDATION_KEY: "the validation examples (another --validation-file, held-out share or data seed, "
                            "or a validation split given on one side only)",
            "distill_context_sha256": "the distilled context (another --context or --context-file)",
            }.get(key) or f"{flag(key)} {there!r} there, {now!r} now"


def save_checkpoint(out: Path, step: int, method: PromptMethod, opt, sched, state: dict,
                    guard: DivergenceGuard, best_state: dict[str, torch.Tensor] | None = None,
                    settings: dict | None = None) -> None:
    """Write ``checkpoint/`` atomically: a crash mid-save leaves the previous checkpoint intact."""
    def write(tmp: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in method.state_dict().items()},
                  str(tmp / "method.safetensors"))
        if best_state is not None:  # a resumed run ends with the same best state as an uninterrupted one
            save_file(best_state, str(tmp / "best.safetensors"))
        # dropout on a GPU draws from the CUDA generators, not the CPU one: both are saved
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "torch_rng": torch.get_rng_state(), "cuda_rng": cuda_rng,
                    "guard_snapshots": guard.snapshots}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "guard": guard.state(), "step": step,
                                                    "settings": settings}))

    write_folder_atomically(out / "checkpoint", write, overwrite=True,
                            replaceable=lambda p: (p / "state.json").exists() or not any(p.iterdir()))


def load_checkpoint(out: Path, method: PromptMethod, opt, sched, guard: DivergenceGuard,
                    settings: dict) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """Restore ``checkpoint/`` into the method, optimizer, scheduler, guard and RNGs.

    Returns:
        The loop state (step, best metric and step, ...) and the best state (``None`` when none was saved).

    Raises:
        ConfigError: the checkpoint was written with other settings (:func:`resume_settings`, prompt shapes)
            or a file of it cannot be read, each named.
    """
    ck = out / "checkpoint"

    def damaged(name: str, e: Exception) -> ConfigError:
        return ConfigError(f"--resume: {ck / name} cannot be read ({type(e).__name__}: {e}): the checkpoint is "
                           f"damaged; delete {ck} to start over, or use another --output-dir")

    try:
        state = json.loads((ck / "state.json").read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("expected an object with an integer 'step'")
    except (OSError, ValueError) as e:
        raise damaged("state.json", e) from None
    recorded = state.pop("settings", None) or {}  # absent in checkpoints written before it was recorded
    # a setting the checkpoint does not record (written before it was) is not checked
    changed = [c for k, v in settings.items() if k in recorded and (c := _changed(k, recorded[k], v))]
    if changed:
        raise ConfigError(f"--resume: {ck} was written with other settings ({'; '.join(changed)}); the optimizer "
                          "state, the lr schedule, the rest of the epoch's data order and the best state so far "
                          "come from the checkpoint: resume with the same ones, or use another --output-dir")
    try:
        saved = load_file(str(ck / "method.safetensors"))
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: safetensors, OS errors
        raise damaged("method.safetensors", e) from None
    current = method.state_dict()
    problems = [f"{k}: checkpoint {tuple(saved[k].shape) if k in saved else 'missing'}, "
                f"now {tuple(current[k].shape) if k in current else 'missing'}"
                for k in sorted(set(saved) | set(current))
                if k not in saved or k not in current or saved[k].shape != current[k].shape]
    if problems:
        raise ConfigError(f"--resume: {ck} was written for other prompt settings ({'; '.join(problems)}); "
                          "use the original --method/--num-virtual-tokens or another --output-dir")
    method.load_state_dict(saved)
    # our own file, written by _save_checkpoint; weights_only keeps it to tensors and plain containers. Read
    # onto the CPU: a run checkpointed on a GPU resumes on a machine without one (the optimizer moves its
    # state to its parameters' device; the guard's copies are loaded into the method in place)
    try:
        blob = torch.load(ck / "optimizer.pt", weights_only=True, map_location="cpu")
        opt.load_state_dict(blob["optimizer"])
        sched.load_state_dict(blob["scheduler"])
        torch.set_rng_state(blob["torch_rng"])
    except Exception as e:  # noqa: BLE001 - truncated, foreign or missing: unpickling, key and value errors
        raise damaged("optimizer.pt", e) from None
    cuda_rng = blob.get("cuda_rng") or []  # absent in checkpoints written before it was saved
    if cuda_rng and torch.cuda.is_available():
        if len(cuda_rng) != torch.cuda.device_count():
            log.warning("--resume: %s saved %d CUDA RNG states, this process sees %d devices; GPU dropout "
                        "will not repeat the interrupted run's masks", ck, len(cuda_rng), torch.cuda.device_count())
        else:
            torch.cuda.set_rng_state_all(cuda_rng)
    guard.load_state(state.pop("guard", None), blob.get("guard_snapshots"))
    best = ck / "best.safetensors"
    return state, (load_file(str(best)) if best.exists() else None)



def truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from, so the log has no duplicates."""
    if not path.exists():
        return
    keep, torn = [], 0
    for ln in path.read_text().split("\n"):
        if not ln.strip():
            continue
        try:
            if json.loads(ln)["step"] <= step:
                keep.append(ln)
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill while it was being written
            torn += 1
    if torn:
        log.warning("--resume: dropped %d unreadable line(s) of %s (a run killed while writing it)", torn, path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)
