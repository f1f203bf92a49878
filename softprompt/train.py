"""One readable training loop for every prompt-learning method.

Per optimizer step: ``grad_accum`` micro-batches (prompt keys/values computed once per micro-batch, loss on
target tokens only), gradient clipping, optimizer and schedule step, a line in ``metrics.jsonl`` (loss, lr,
prompt gradient norm in total and per virtual token, tokens/s). Every ``eval_every`` steps the primary
metric is measured on the validation split; the best state is kept (a CPU copy, returned in
:class:`TrainResult` and handed to ``save_best``), early stopping stops after ``early_stopping_patience``
evaluations without improvement, and ``stop_when_flat`` ends the run once the validation loss has
flattened (:mod:`softprompt.plateau`: it fell by less than that fraction over the last third of the steps
so far, at two evaluations in a row): the lr then falls linearly to 0 over another third of the steps, and
the run stops.
A divergence guard
(:mod:`softprompt.guard`) skips a step with a non-finite loss or gradient and rolls the prompt and optimizer
back, with a lower lr, when the loss rises and stays up; too many rollbacks end the run as diverged.
``checkpoint/`` (:mod:`softprompt.checkpoint`) holds what a resumed run needs to continue exactly where it
stopped: the data order is a pure function of (seed, epoch), so only the step, method/optimizer/scheduler
state, the best state so far, the guard's state and the torch RNG states (CPU and CUDA) are saved.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from softprompt.checkpoint import load_checkpoint, resume_settings, save_checkpoint, truncate_log
from softprompt.config import ConfigError, TrainArgs
from softprompt.data import DataError, Encoded, TaskData, collate
from softprompt.distributed import all_average, distributed, from_rank0, unit_weights
from softprompt.evaluate import evaluate_prompt
from softprompt.forward import family_of
from softprompt.guard import DivergenceGuard
from softprompt.methods import PromptMethod, checkpointing_problem
from softprompt.model import fingerprint
from softprompt.plateau import cooldown_end, cooldown_factor, flat_now
from softprompt.schedule import lr_lambda, warmup_warning, with_cooldown
from softprompt.selection import primary_metric

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    ``best_state`` is a CPU copy of the method's ``state_dict()`` at ``best_step`` (the best validation
    step) and ``best_metrics`` its validation metrics (``val_``-prefixed; ``save_best`` gets them with
    ``best_step``); both
    are ``None`` when no validation ran, and ``best_state`` also when resuming a checkpoint written before
    checkpoints kept it (``best_step`` is then set).
    """

    steps: int
    best_metric: float | None
    best_step: int | None
    stopped_early: bool
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    diverged: bool = False  # the guard ended the run; the method holds the last good state
    rollbacks: int = 0
    lr_scale: float = 1.0  # the guard's multiplier on the schedule's lr at the end
    best_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    best_metrics: dict | None = None
    flat_step: int | None = None  # the step the validation loss was flat at (``stop_when_flat``); the lr then
    # fell to 0 until ``steps``, where the run stopped


def log_rows(path: Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl`` (none when it does not exist)."""
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def build_optimizer(params, args: TrainArgs) -> torch.optim.Optimizer:
    """AdamW or Adafactor (the paper's choice, lr 0.3) over the method's parameters."""
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.Adafactor(params, lr=args.lr, weight_decay=args.weight_decay)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Example order of one epoch: a pure function of (seed, epoch), so resuming needs no RNG state."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def step_groups(encoded: list[Encoded], args: TrainArgs, epoch: int, steps: int) -> list[list[int]]:
    """Example indices of each optimizer step of one epoch.

    With ``group_by_length``, each window of 32 steps' worth of shuffled examples is sorted by length before
    it is cut into steps (less padding), and the steps are shuffled again; all seeded by (seed, epoch).
    """
    per_step = args.batch_size * args.grad_accum
    order = epoch_order(len(encoded), args.seed, epoch)[: steps * per_step]
    if args.group_by_length:
        window = per_step * 32
        order = [i for w in range(0, len(order), window)
                 for i in sorted(order[w:w + window], key=lambda i: len(encoded[i].input_ids))]
    groups = [order[s * per_step:(s + 1) * per_step] for s in range(steps)]
    if args.group_by_length:
        random.Random(args.seed * 7_919 + epoch).shuffle(groups)
    return groups


def micro_batches(encoded: list[Encoded], args: TrainArgs, pad_id: int, steps_per_epoch: int,
                  rank: int = 0, world: int = 1):
    """Yield ``(step, epoch, [micro-batches])`` for every optimizer step, forever over epochs.

    With ``world`` data-parallel processes, every process builds the same steps and takes every
    ``world``-th example of each (its share of the global batch).
    """
    epoch = 0
    micro = max(1, args.batch_size // world)
    while True:
        for s, idx in enumerate(step_groups(encoded, args, epoch, steps_per_epoch)):
            mine = idx[rank::world]
            group = [collate([encoded[i] for i in mine[j:j + micro]], pad_id) for j in range(0, len(mine), micro)]
            yield epoch * steps_per_epoch + s, epoch, group
        epoch += 1


def _enable_checkpointing(model) -> None:
    """Recompute the frozen model's activations in the backward pass instead of keeping them.

    transformers only checkpoints in training mode, so the model is switched to it; every dropout in it is
    then set to 0 so the frozen model computes exactly what it computes in eval mode.
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        # rates kept as plain floats and applied with F.dropout(training=self.training) (OPT, BART) or a
        # layer-skipping probability (LayerDrop)
        for name, value in list(vars(module).items()):
            if (name.endswith("dropout") or name == "layerdrop") and isinstance(value, float):
                setattr(module, name, 0.0)
    for name in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout"):
        if hasattr(model.config, name):
            setattr(model.config, name, 0.0)


def loss_units(batch) -> int:
    """What a family's micro-batch loss averages over: its target tokens, or its rows' classes."""
    return int(batch.class_labels.numel()) if batch.class_labels is not None else int(batch.target_mask.sum())


def _cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies of ``state``'s tensors (sharing no storage with the live ones)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def train(model, tokenizer, method: PromptMethod, task: TaskData, args: TrainArgs,
          save_best: Callable[[PromptMethod, dict], None] | None = None,
          eval_batch_size: int = 32, max_length: int = 256,
          on_step: Callable[[int], None] | None = None,
          loss_fn: Callable[..., torch.Tensor] | None = None, max_new_tokens: int = 16,
          keep_best: bool = True, checkpoints: bool = True, resume_key: dict | None = None,
          outputs: tuple[str, ...] = ()) -> TrainResult:
    """Train ``method``'s parameters against the frozen ``model``.

    Args:
        model: frozen base model.
        tokenizer: its tokenizer.
        method: the prompt method (its parameters are the only ones updated).
        task: data with ``train`` (and optionally ``validation``) splits.
        args: loop settings; ``args.output_dir`` receives metrics.jsonl and checkpoint/.
        save_best: called with (method, metrics) whenever validation improves (e.g. to write ``best/``): the
            validation metrics and ``best_step``, the step they were measured at (that line of ``metrics.jsonl``
            is marked ``"best": true``; the last line so marked is the best state's).
        eval_batch_size: batch size for validation.
        max_length: token budget per example.
        on_step: called after every optimizer step with the step number (tests use it to simulate a kill).
        loss_fn: ``loss_fn(model, batch, prompt)``, the loss of a micro-batch in place of the family's
            (``family.loss``), e.g. a distillation loss; the batches are the family's encoding of ``task``.
        max_new_tokens: a generation task's validation decodes this many tokens (``--max-new-tokens``, as the
            final report does: fewer would cut every answer longer than that and select on truncated text).
        keep_best: keep a CPU copy of the best validation state (``result.best_state``); a caller that uses
            the last state (``compare``) turns it off, so that full fine-tuning's peak memory holds no extra copy
            of the model.
        checkpoints: write ``checkpoint/`` (for ``--resume``); off, the run writes none (``compare``: its run
            folders are temporary, and full fine-tuning's checkpoint is gigabytes of writes in its train time).
        resume_key: more settings a resume must repeat, beside the loop's and the data's (``distill``: the
            context and temperature its loss depends on: another teacher was trained against in silence).
        outputs: the caller's files and folders in ``args.output_dir`` (``best/``, ``eval.json``...) that a fresh
            run (no ``--resume``) removes with an earlier run's log, checkpoint and ``train_args.json``, once every
            check passed: a run that does not rewrite one (no validation, no test split) or is killed left the
            earlier run's beside its own.

    Returns:
        The :class:`TrainResult`; ``best_state`` holds the best validation step's method state.
    """
    if args.gradient_checkpointing and method.injects == "kv":  # before anything is written
        raise ConfigError(checkpointing_problem(method.name))
    t_start = time.perf_counter()
    rank, world = distributed()
    main = rank == 0  # only the first process writes logs, checkpoints and best prompts
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    method.to(model.device).train()
    # transformers turns the cache off under checkpointing: the prompt goes in with the text (one pass)
    pass_mode = "concat" if args.gradient_checkpointing else args.prompt_pass
    if args.gradient_checkpointing:
        _enable_checkpointing(model)
    fmt = task.format
    family = family_of(model)
    problem = family.format_problem(model, fmt)
    if problem:
        raise ConfigError(problem)
    valid = task.splits.get("validation") or []
    encoded = {}
    # the validation examples are encoded as validation will encode them, now: a target longer than --max-length
    # or a conversation the chat template refuses stopped the run at its first validation, steps in
    for split, examples in (("train", task.examples("train")), ("validation", valid)):
        try:
            encoded[split] = family.encode_examples(tokenizer, examples, fmt, max_length)  # targets or classes
        except DataError as e:
            raise DataError(f"{split} split: {e}") from None
    train_enc = encoded["train"]
    if not train_enc:  # every step would do nothing, and the initial prompt would be saved as trained
        raise DataError("train split: no example is left to train on once encoded (a text corpus needs documents "
                        "of at least 2 tokens)")
    per_step = args.batch_size * args.grad_accum
    steps_per_epoch = max(1, len(train_enc) // per_step)
    total = args.max_steps or steps_per_epoch * args.epochs
    # each micro-batch's mean loss weighs by its loss units (target tokens, or classes), so that the step's loss is
    # the mean over all its units whatever the split into micro-batches and processes; a custom loss: by rows
    units = loss_units if loss_fn is None else (lambda b: int(b.input_ids.shape[0]))
    loss_fn = loss_fn or family.loss
    params = [p for p in method.parameters() if p.requires_grad]
    opt = build_optimizer(params, args)
    guard = DivergenceGuard(args.divergence_guard, args.spike_factor, args.max_rollbacks)
    schedule = lr_lambda(args, total)
    metric_name, higher = primary_metric(fmt, args.metric, valid)
    # best_metrics: the best step's validation metrics, in the checkpoint's state.json with the rest
    # val_curve: every validation loss so far, the flat rule's input; flat_step/stop_at: the plateau and the
    # end of the cool-down after it (all resumed with the rest)
    state = {"best_metric": None, "best_step": None, "bad_evals": 0, "best_metrics": None, "val_curve": [],
             "flat_step": None, "stop_at": None}
    # the guard lowers the lr by a multiplier on the schedule, read at every step: the shape is kept; after a
    # plateau the cool-down applies too (``with_cooldown``; ``state`` is read at every step, also once a resume
    # replaced it)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: guard.lr_scale * with_cooldown(
        args, schedule(s), cooldown_factor(s, state.get("flat_step"), state.get("stop_at"))))
    best_state = None
    start = 0
    metrics_path = out / "metrics.jsonl"
    # what a resume must repeat (the base model's fingerprint only when a checkpoint is written or read: it hashes
    # the embedding matrix, and a run without checkpoints, such as compare's full fine-tuning, needs none)
    settings = {**resume_settings(args, train_enc, valid, fingerprint(model) if checkpoints or args.resume else None),
                **(resume_key or {})}
    if args.resume and (out / "checkpoint" / "state.json").exists():
        state, best_state = load_checkpoint(out, method, opt, sched, guard, settings)
        start = state.pop("step")
        # the best so far in this run's metric: a checkpoint written when ``--metric auto`` read accuracy on a split
        # one label dominates (it now reads macro-F1) recorded its best as an accuracy
        kept = (state.get("best_metrics") or {}).get(f"val_{metric_name}")
        if kept is not None:
            state["best_metric"] = kept
        if main:
            truncate_log(metrics_path, start)
        log.info("resumed from %s at step %d", out / "checkpoint", start)
    elif main:  # a fresh run in a used folder: the earlier run's outputs go (a --resume after this run was killed
        # before its first checkpoint resumed the other run's state: its prompt, saved as this run's; a best/ or
        # eval.json this run does not rewrite stayed beside its prompt)
        for name in ("metrics.jsonl", "checkpoint", "train_args.json", *outputs):
            if (out / name).is_dir() and not (out / name).is_symlink():
                shutil.rmtree(out / name)
            else:
                (out / name).unlink(missing_ok=True)
    history: list[dict] = []
    # a run that ended early (early stopping, the cool-down's end, the guard) and is resumed stays ended
    ended = state.pop("ended", None)
    if start and not ended and state.get("flat_step") is not None:
        # a cool-down is cut at the run's end (``cooldown_end``): a resume that grows --max-steps/--epochs continues
        # it to its own end, as the schedule follows the new length (its stop_at was the old end: the next step ran
        # at lr 0 and the run stopped); one that had come to its end is over
        state["stop_at"] = cooldown_end(state["flat_step"], args.eval_every, total)
        if state["stop_at"] <= start:
            ended = "stopped"
    if start:  # the next step's lr from the schedule as it now stands (the checkpoint's is the old length's)
        for group, base, fn in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
            group["lr"] = base * fn(sched.last_epoch)
    stopped, diverged = ended == "stopped", ended == "diverged"
    if ended:
        log.info("the resumed run had already ended at step %d (%s): nothing left to train", start, ended)
        total = start
    warmup_note = warmup_warning(args, total) if start < total else None  # console, first line written
    if warmup_note and main:
        log.warning("%s", warmup_note)
    bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=None if main else True)
    with open(metrics_path, "a") if main else contextlib.nullcontext() as logf:
        for step, epoch, group in micro_batches(train_enc, args, tokenizer.pad_token_id, steps_per_epoch,
                                                rank, world):
            if step < start:
                continue
            if step >= total:
                break
            guard.snapshot_if_due(step, method, opt)
            t0 = time.perf_counter()
            loss_sum, tokens = 0.0, 0
            weights = unit_weights([units(mb) for mb in group], world, model.device)
            for mb, weight in zip(group, weights, strict=True):
                mb = mb.to(model.device)
                prompt = family.step_prompt(model, method(), pass_mode)
                loss = loss_fn(model, mb, prompt) * weight
                loss.backward()
                loss_sum += float(loss.detach())
                tokens += mb.num_tokens
            # the guard decides on these averaged values, identical on every process: all take the same decision
            if world > 1:  # average the prompt gradients (and the logged loss) over the processes
                # a process given no example this step (a global batch or a train split smaller than the process
                # count) has no gradients: it contributes zeros, so that every process reduces the same tensors;
                # a parameter no process had a gradient for goes back to none (the optimizer skips it, as alone)
                had = [float(p.grad is not None) for p in params]
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                stats = torch.tensor([loss_sum, tokens, *had], dtype=torch.float64, device=model.device)
                all_average([p.grad for p in params] + [stats], world)
                loss_sum, tokens = float(stats[0]), int(round(float(stats[1]) * world))  # tokens: all ranks
                for p, anyone in zip(params, stats[2:].tolist(), strict=True):
                    if not anyone:
                        p.grad = None
            grads = [p.grad for p in params if p.grad is not None]
            per_token = _per_token_grad_norm(method)
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)) if grads else 0.0
            fault = guard.check_step(step + 1, loss_sum, gnorm)
            if fault is None:
                opt.step()
                fault = guard.check_params(step + 1, params)
            alarm = guard.rollback(step + 1, fault, method, opt) if fault else None
            sched.step()
            opt.zero_grad(set_to_none=True)
            step_s = time.perf_counter() - t0
            row = {"step": step + 1, "epoch": epoch, "loss": loss_sum, "lr": sched.get_last_lr()[0],
                   "grad_norm": gnorm, "grad_norm_per_token": per_token, "tokens_per_s": tokens / step_s,
                   "step_s": step_s}
            if warmup_note and step == start:  # the first line this run writes (a resumed run's too)
                row["warning"] = warmup_note
            if alarm:
                row.update(alarm.record())
                diverged = alarm.stop
                if main:
                    log.warning("%s", alarm.message(args.max_rollbacks))
            # after a rollback the prompt is an earlier step's: validating it here would credit it to this step;
            # but the run's last step is validated whatever happened (its state is the one the run keeps: a
            # search run, validated only there, had no point at all)
            last = step + 1 in (total, state.get("stop_at")) and not diverged
            if valid and (not alarm or last) and ((step + 1) % args.eval_every == 0 or last):
                t_val = time.perf_counter()
                method.eval()
                model.eval()
                with torch.no_grad():
                    kv = family.inference_prompt(model, method())
                m, _ = evaluate_prompt(model, tokenizer, kv, valid, fmt, eval_batch_size, max_new_tokens,
                                       max_length=max_length, with_loss=True)
                m = from_rank0(m, world)
                method.train()
                model.train(args.gradient_checkpointing)
                row.update({f"val_{k}": v for k, v in m.items() if k != "n"})
                row["val_s"] = time.perf_counter() - t_val  # so that a caller can tell training time from it
                value = m[metric_name]
                best = state["best_metric"]
                if best is None or (value > best if higher else value < best):
                    best_metrics = {f"val_{k}": v for k, v in m.items()}
                    state.update(best_metric=value, best_step=step + 1, bad_evals=0, best_metrics=best_metrics)
                    best_state = _cpu_copy(method.state_dict()) if keep_best else None
                    row["best"] = True
                    if save_best and main:
                        save_best(method, {**best_metrics, "best_step": step + 1})
                else:
                    state["bad_evals"] += 1
                    stopped = 0 < args.early_stopping_patience <= state["bad_evals"]
                if "loss" in m:
                    curve = state.setdefault("val_curve", [])
                    curve.append({"step": step + 1, "loss": m["loss"]})
                    if args.stop_when_flat and state.get("flat_step") is None and flat_now(curve,
                                                                                           args.stop_when_flat):
                        state.update(flat_step=step + 1, stop_at=cooldown_end(step + 1, args.eval_every, total))
                        if main:
                            log.info("the validation loss is flat at step %d: the lr falls to 0 by step %d, "
                                     "where the run stops", step + 1, state["stop_at"])
            if state.get("stop_at") is not None and step + 1 >= state["stop_at"] and step + 1 < total:
                stopped = True
            if main:
                logf.write(json.dumps(row) + "\n")
                logf.flush()
            history.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}", **({f"val_{metric_name}": f"{row[f'val_{metric_name}']:.3f}"}
                                                         if f"val_{metric_name}" in row else {}))
            if main and checkpoints and ((step + 1) % args.checkpoint_every == 0 or step + 1 == total or stopped
                                         or diverged):
                ending = {"ended": "diverged" if diverged else "stopped"} if stopped or diverged else {}
                save_checkpoint(out, step + 1, method, opt, sched, {**state, **ending}, guard, best_state,
                                settings)
            if on_step:
                on_step(step + 1)
            if diverged:
                break
            if stopped:
                why = (f"the cool-down after the plateau at step {state['flat_step']} is over" if state.get("flat_step")
                       else f"{state['bad_evals']} evaluations without a better {metric_name}")
                log.info("early stopping at step %d, %s (best %s %.4f at step %s)", step + 1, why, metric_name,
                         state["best_metric"], state["best_step"])
                break
    bar.close()
    method.eval()
    model.eval()
    if main:
        (out / "train_args.json").write_text(json.dumps(asdict(args), indent=2))
    return TrainResult(steps=(history[-1]["step"] if history else start), best_metric=state["best_metric"],
                       best_step=state["best_step"], stopped_early=stopped, history=history,
                       seconds=time.perf_counter() - t_start, diverged=diverged, rollbacks=guard.rollbacks,
                       lr_scale=guard.lr_scale, best_state=best_state, best_metrics=state.get("best_metrics"),
                       flat_step=state.get("flat_step"))


def _per_token_grad_norm(method: PromptMethod) -> list[float] | None:
    """Gradient norm of each virtual token's embedding (methods exposing ``embeddings`` (P, H))."""
    emb = getattr(method, "embeddings", None)
    if emb is None or emb.grad is None:
        return None
    return [round(float(x), 6) for x in emb.grad.norm(dim=-1)]
