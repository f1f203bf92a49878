"""Successive halving over prompt-training trials, on the validation split, with :func:`softprompt.train.train`.

Each trial is a run of the ordinary training loop in its own folder (``trials/tNN``), with its lr schedule
over the plan's horizon. A trial runs a rung as one segment: ``train`` from its checkpoint (``resume``) up to
the rung's last step, where it is stopped right after the checkpoint of that step is written; the next
segment resumes there, so a trial promoted through every rung trains exactly as one uninterrupted run.
Before the last rung ``train`` does not evaluate (it gets the validation split, but no evaluation falls within
those segments): the search evaluates every trial itself at the end of each such rung, on the validation split.
In the last rung ``train`` evaluates every ``--eval-every`` steps and at the horizon, and keeps the best state, as
``softprompt train`` does: a finished trial's result is its best validated prompt (``best_step``). No trial stops
early. The test split is never read.

The untuned trial (``--lr`` with the prompt settings ``train`` would use, when the search has it) is continued
at every rung whatever its rank, in a slot of its own (``TuneArgs.keep_default``): the search then contains the
run ``softprompt train`` would make, selected the same way, and returns another only when it validates better.

Ranking at a rung: the task's primary metric (``--metric``; accuracy for classification), ties broken by
validation loss, then by trial order. A trial the divergence guard stops, or whose prompt or validation
numbers are not finite, is marked ``diverged``, never promoted and ranked after every finished trial; one
whose training or evaluation raises (out of memory with the longest prompt) is marked ``failed`` likewise.
The search goes on in both cases.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from softprompt.config import ConfigError, PromptArgs, TrainArgs
from softprompt.data import DataError, TaskData, token_counts
from softprompt.distributed import launch_world_size
from softprompt.evaluate import evaluate_prompt
from softprompt.forward import family_of
from softprompt.methods import build_method
from softprompt.selection import primary_metric
from softprompt.train import log_rows, train
from softprompt.tune.space import TrialSpec, TuneArgs, epochs_problem, plan_rungs, trial_specs, untuned_index
from softprompt.tune.trials import RungResult, Trial, TuneResult, rank_key, remove_stale_trials

log = logging.getLogger(__name__)

class _RungReached(Exception):
    """Raised from ``train``'s step callback once a segment's last step is trained and checkpointed."""


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


class _Search:
    """The state of one search (kept out of the public function so each step reads as a method)."""

    def __init__(self, model, tokenizer, task: TaskData, prompt: PromptArgs, train_args: TrainArgs,
                 tune: TuneArgs, out: Path, eval_batch_size: int, max_length: int, save_meta: dict,
                 progress: Callable[[TuneResult], None] | None = None, max_new_tokens: int = 16):
        self.model, self.tok, self.prompt, self.base, self.tune = model, tokenizer, prompt, train_args, tune
        self.max_new_tokens = max_new_tokens
        self.progress = progress
        self.out, self.eval_batch_size, self.max_length, self.save_meta = out, eval_batch_size, max_length, save_meta
        if launch_world_size() > 1:
            raise ConfigError("softprompt tune runs in one process (its trials are sequential): launch it without "
                              "torchrun / accelerate launch")
        self.fmt = task.format
        problem = family_of(model).format_problem(model, self.fmt)
        if problem:
            raise ConfigError(problem)
        self.valid = task.splits.get("validation") or []
        if not self.valid:
            raise ConfigError("tune selects on the validation split and the task has none: pass --validation-file "
                              "FILE, or --validation-from-train FRACTION to hold out part of the training data "
                              "(the test split is never used for selection)")
        # train() evaluates only in the last rung (see _train_args); it never stops early
        self.train_task = TaskData(task.format, {"train": task.examples("train"), "validation": self.valid})
        # both splits are encoded now, as train() and the validation encode them: train() checks the validation
        # split only when it has it, so a target over --max-length raised in the first segment, after the command
        # had removed the earlier search's results, and exited 2 as if the search had been refused
        self.n_encoded = len(self._encode("train", self.train_task.examples("train")))
        self._encode("validation", self.valid)
        self.metric, self.higher = primary_metric(self.fmt, train_args.metric, self.valid)
        specs, self.notes = trial_specs(tune, prompt, train_args)
        self.token_counts = None
        if any(s.method_config.get("init") == "sample_vocab" for s in specs):
            self.token_counts = token_counts(tokenizer, self.train_task.examples("train"))
        specs = self._buildable(specs)
        self.trials = [Trial(i, s, out / "trials" / f"t{i:02d}") for i, s in enumerate(specs)]
        i = untuned_index(specs, prompt, train_args) if tune.keep_default else None
        self.default = None if i is None else self.trials[i]
        if tune.keep_default and i is None:
            self.notes.append(f"no trial is the untuned run (--lr {train_args.lr:g} with the base prompt settings): "
                              "none is kept at every rung")
        self.plan = plan_rungs(len(specs), tune.eta, self._horizon(), tune.min_steps, tune.budget_steps,
                               train_args.warmup_steps, keep_default=self.default is not None)
        if tune.top_k > len(specs):
            raise ConfigError(f"invalid arguments:\n  --top-k {tune.top_k} is more than the {len(specs)} trials")
        # every rung but the last ends at a checkpoint (train always writes one at the horizon)
        self.checkpoint_every = math.gcd(*self.plan.rungs[:-1]) if len(self.plan.rungs) > 1 else self.plan.horizon
        for trial in self.trials:  # every trial's loop settings are valid before anything is written
            self._train_args(trial)
        self.steps_used, self.stopped_by = 0, None
        self.t0 = time.perf_counter()
        self.step_time, self.steps_timed = 0.0, 0  # seconds in training steps, and those steps (every segment)
        self.overheads: list[float] = []  # each segment's time outside its steps
        self.eval_seconds: list[float] = []

    def _buildable(self, specs: list[TrialSpec]) -> list[TrialSpec]:
        """The specs whose prompt can be built on this model and task; each other combination gets a note (the
        method's reason: class_labels init without labels, a prefix method on a classifier...), and when none
        is left the search is refused, all before any trial trains."""
        reasons: dict[str, str | None] = {}
        for spec in specs:
            if spec.prompt_key not in reasons:
                try:
                    self._method(spec)
                    reasons[spec.prompt_key] = None
                except ValueError as e:
                    reasons[spec.prompt_key] = (f"method={spec.method} num_virtual_tokens={spec.num_virtual_tokens} "
                                                f"init={spec.init}: {e}")
        refused = [r for r in reasons.values() if r is not None]
        if refused and len(refused) == len(reasons):
            raise ConfigError("invalid arguments:\n  --search: no combination can be built on this model and "
                              "task:\n    " + "\n    ".join(refused))
        self.notes += [f"{r}; skipped" for r in refused]
        return [s for s in specs if reasons[s.prompt_key] is None]

    def _horizon(self) -> int | None:
        """The trials' schedule length: --max-steps; else what --budget-steps pays for; else --epochs."""
        if self.base.max_steps:
            return self.base.max_steps
        if self.tune.budget_steps is not None:
            if epochs_problem(self.tune, self.base):
                raise ConfigError(f"invalid arguments:\n  {epochs_problem(self.tune, self.base)}")
            return None
        per_step = self.base.batch_size * self.base.grad_accum
        # what train counts an epoch in: encoded examples (an --objective lm document is many chunks)
        return max(1, self.n_encoded // per_step) * self.base.epochs

    def _encode(self, split: str, examples: list) -> list:
        """``examples`` encoded as :func:`~softprompt.train.train` encodes them; errors name the split."""
        try:
            encoded = family_of(self.model).encode_examples(self.tok, examples, self.fmt, self.max_length)
        except DataError as e:
            raise DataError(f"{split} split: {e}") from None
        if split == "train" and not encoded:
            raise DataError("train split: no example is left to train on once encoded (a text corpus needs inputs "
                            "of at least 2 tokens)")
        return encoded

    # ----- one segment ---------------------------------------------------------------------------------

    def _method(self, spec: TrialSpec):
        return build_method(spec.method, spec.method_config, self.model, self.tok,
                            label_texts=self.fmt.label_texts if self.fmt.is_classification else None,
                            token_counts=self.token_counts)

    def _train_args(self, trial: Trial, last_rung: bool = True) -> TrainArgs:
        """``trial``'s loop; before the last rung no evaluation falls within the run (``eval_every`` past it)."""
        return dataclasses.replace(self.base, output_dir=str(trial.folder), lr=trial.spec.lr,
                                   max_steps=self.plan.horizon, checkpoint_every=self.checkpoint_every,
                                   early_stopping_patience=0, stop_when_flat=0.0, resume=trial.steps > 0,
                                   seed=self.base.seed if trial.seed is None else trial.seed,
                                   eval_every=self.base.eval_every if last_rung else self.plan.horizon + 1)

    def run_segment(self, trial: Trial, rung: int) -> None:
        """Train ``trial`` up to the end of ``rung`` (from its checkpoint), then evaluate it on validation."""
        stop_at = self.plan.rungs[rung]
        t0 = time.perf_counter()
        method = self._method(trial.spec)

        def on_step(step: int) -> None:
            if step == stop_at and stop_at < self.plan.horizon:  # the checkpoint of this step is written
                raise _RungReached

        start, result = trial.steps, None
        last_rung = rung == len(self.plan.rungs) - 1
        try:
            result = train(self.model, self.tok, method, self.train_task, self._train_args(trial, last_rung),
                           eval_batch_size=self.eval_batch_size, max_length=self.max_length, on_step=on_step,
                           max_new_tokens=self.max_new_tokens)
            trial.steps, diverged = result.steps, result.diverged
        except _RungReached:
            trial.steps, diverged = stop_at, False
        except RuntimeError as e:  # e.g. out of memory with the longest prompt: this trial fails, not the search
            self._failed(trial, rung, start, e)
            return
        finally:
            self.model.eval()
            method.eval()
        rows = log_rows(trial.folder / "metrics.jsonl")
        events = [r for r in rows if "event" in r]
        trial.rollbacks = sum(r["event"] == "rollback" for r in events)  # the "diverged" event is no rollback
        diverged = diverged or any(r["event"] == "diverged" for r in events)
        self.steps_used += trial.steps - start
        # a segment's time is a fixed part (building the method, encoding the data, skipping to the checkpoint,
        # writing one) and its steps' time: the unweighted mean of seconds per step over segments made the short
        # rung-0 segments, mostly fixed part, price every later step, and a minutes budget stopped early; a step
        # the guard rolled back (its row has an "event") took its time too
        mine = [r for r in rows if start < r["step"] <= trial.steps]
        stepping = sum(r.get("step_s", 0.0) for r in mine)
        validating = sum(r.get("val_s", 0.0) for r in mine)  # train's own evaluations (last rung)
        self.step_time += stepping
        self.steps_timed += max(0, trial.steps - start)
        self.overheads.append(max(0.0, time.perf_counter() - t0 - stepping - validating))
        if diverged:
            who = "the divergence guard" if self.base.divergence_guard else "a non-finite step (the guard is off)"
            self._diverged(trial, rung, f"{who} stopped it at step {trial.steps}: "
                                        f"{events[-1].get('reason', '') if events else ''}".rstrip(": "))
            return
        if not all(torch.isfinite(t).all() for t in method.state_dict().values()):
            self._diverged(trial, rung, f"non-finite prompt values at step {trial.steps}")
            return
        best_step = None
        if last_rung and result is not None and result.best_state is not None and result.best_metrics:
            # train's best validated state of the run (its evaluations every --eval-every and at the end)
            method.load_state_dict(result.best_state)
            metrics = {k.removeprefix("val_"): float(v) for k, v in result.best_metrics.items() if k != "val_n"}
            best_step = result.best_step
            self.eval_seconds.append(validating)
        else:
            t1 = time.perf_counter()
            try:
                metrics = self.evaluate(method)
            except RuntimeError as e:
                self._failed(trial, rung, trial.steps, e)
                return
            self.eval_seconds.append(time.perf_counter() - t1)
        value, loss = metrics.get(self.metric), metrics.get("loss")
        if not _finite(value) or (loss is not None and not math.isfinite(loss)):
            self._diverged(trial, rung, f"non-finite validation {self.metric} {value} / loss {loss}")
            return
        trial.rungs.append(RungResult(rung, trial.steps, value, loss, metrics, round(time.perf_counter() - t0, 3),
                                      best_step))
        trial.status = "ok"
        from softprompt.data import bos_after_prompt
        from softprompt.store import save_prompt

        save_prompt(trial.prompt_dir, method, self.model, task=self.save_meta.get("task"),
                    train_config={**self.save_meta.get("train_config", {}),
                                  "tune": {"trial": trial.id, "rung": rung, "steps": trial.steps,
                                           **({"best_step": best_step} if best_step is not None else {})},
                                  "prompt": dataclasses.asdict(self._prompt_args(trial.spec)),
                                  # the loop it trained with, not the search's segment bookkeeping
                                  "train": dataclasses.asdict(dataclasses.replace(
                                      self._train_args(trial), resume=False, stop_when_flat=self.base.stop_when_flat,
                                      checkpoint_every=self.base.checkpoint_every))},
                    metrics={f"val_{k}": v for k, v in metrics.items()}, overwrite=True,
                    bos=bos_after_prompt(self.fmt))
        log.info("rung %d  %s  %s: %d steps, validation %s %.4f (loss %.4f%s) in %.1fs", rung, trial.id,
                 trial.spec.label(), trial.steps, self.metric, value, loss if loss is not None else math.nan,
                 "" if best_step is None else f", its best, at step {best_step}", time.perf_counter() - t0)

    def _prompt_args(self, spec: TrialSpec) -> PromptArgs:
        return dataclasses.replace(self.prompt, method=spec.method, num_virtual_tokens=spec.num_virtual_tokens,
                                   init=spec.init)

    def _failed(self, trial: Trial, rung: int, steps_before: int, error: Exception) -> None:
        rows = log_rows(trial.folder / "metrics.jsonl")  # the steps it trained before the error count
        trial.steps = max([steps_before] + [r["step"] for r in rows])
        self.steps_used += trial.steps - steps_before
        trial.status, trial.note = "failed", f"rung {rung}: {type(error).__name__}: {error}"
        log.warning("rung %d  %s  %s failed (%s: %s); ranked after the finished trials", rung, trial.id,
                    trial.spec.label(), type(error).__name__, error)

    def _diverged(self, trial: Trial, rung: int, why: str) -> None:
        trial.status, trial.note = "diverged", f"rung {rung}: {why}"
        log.warning("rung %d  %s  %s diverged (%s); ranked last", rung, trial.id, trial.spec.label(), why)

    def evaluate(self, method) -> dict[str, float]:
        """Validation metrics of the method's current prompt (what ``train`` computes at its evaluations)."""
        with torch.no_grad():
            kv = family_of(self.model).inference_prompt(self.model, method())
            metrics, _ = evaluate_prompt(self.model, self.tok, kv, self.valid, self.fmt, self.eval_batch_size,
                                         self.max_new_tokens, max_length=self.max_length, with_loss=True)
        return {k: float(v) for k, v in metrics.items() if k != "n"}

    # ----- the halving ---------------------------------------------------------------------------------

    def segment_seconds(self, steps: int) -> float:
        """What a segment of ``steps`` steps and its validation is expected to take: the mean fixed part of the
        segments so far, their seconds per step (all their steps' time over all their steps) times ``steps``,
        and the mean validation time."""
        per_step = self.step_time / self.steps_timed if self.steps_timed else 0.0
        fixed = sum(self.overheads) / len(self.overheads) if self.overheads else 0.0
        evals = sum(self.eval_seconds) / len(self.eval_seconds) if self.eval_seconds else 0.0
        return fixed + per_step * steps + evals

    def affordable(self, trial: Trial, rung: int) -> str | None:
        """The budget flag that forbids running ``trial``'s segment of ``rung``, if any."""
        need = self.plan.rungs[rung] - trial.steps
        if self.tune.budget_steps is not None and self.steps_used + need > self.tune.budget_steps:
            return "--budget-steps"
        if self.tune.budget_minutes is not None and self.overheads:
            if time.perf_counter() - self.t0 + self.segment_seconds(need) > self.tune.budget_minutes * 60:
                return "--budget-minutes"
        return None

    def run(self) -> TuneResult:
        remove_stale_trials(self.out / "trials")
        log.info("tune: %d trials, rungs %s; ranked by validation %s", len(self.trials), self.plan.describe(),
                 self.metric)
        if len(self.plan.rungs) > 1 and self.plan.rungs[0] <= self.base.warmup_steps:
            self.notes.append(f"rung 0 ends at step {self.plan.rungs[0]}, within --warmup-steps "
                              f"{self.base.warmup_steps}: the first cut compares trials still warming up "
                              "(--min-steps sets rung 0's length)")
        for note in self.notes:
            log.info("tune: %s", note)
        alive = list(self.trials)
        for rung, n_keep in enumerate(self.plan.keep):
            if rung > 0:
                ranked = sorted((t for t in alive if t.status == "ok" and len(t.rungs) == rung),
                                key=lambda t: rank_key(t, self.higher))
                chosen = ranked[:n_keep]
                if self.default in ranked and self.default not in chosen:  # its slot (the plan counts it)
                    chosen = ranked[:n_keep - 1] + [self.default]
                    self.default.note = "the untuned run: continued at every rung whatever its rank"
                    log.info("rung %d  %s  the untuned run continues in its own slot", rung, self.default.id)
                for t in ranked:
                    if t not in chosen:
                        t.note = f"not promoted after rung {rung - 1}"
                alive = chosen
            for trial in alive:
                self.stopped_by = self.affordable(trial, rung)
                if self.stopped_by:
                    break
                self.run_segment(trial, rung)
                if self.progress:
                    self.progress(self.result())
            if self.stopped_by:
                self._stop(rung, alive)
                break
        for t in self.trials:
            if t.status == "pending":
                t.status = "not_run"
        took = time.perf_counter() - self.t0
        if self.tune.budget_minutes is not None and took > self.tune.budget_minutes * 60:
            self.notes.append(f"--budget-minutes {self.tune.budget_minutes:g} exceeded: the search took {took:.1f}s "
                              "(the first segment always runs, nothing being timed before it; a later one starts "
                              "when the earlier ones' times say it ends in time)")
            log.warning("tune: %s", self.notes[-1])
        return self.result()

    # ----- the winner's seed runs (--ensemble-seeds) -----------------------------------------------------

    def retrain_seeds(self, n: int) -> list[Trial]:
        """The winner's configuration trained with ``n`` seeds (``--seed``, ``--seed`` + 1, ...) for a whole run.

        The winner's own run is seed ``--seed`` and counts as the first when it trained the whole horizon
        (the search ended it at the last rung); when the budget stopped it earlier, every seed is a new run.
        Each new run is one segment from step 0 to the horizon in ``seeds/seed<S>/`` (the same loop, lr and
        schedule as a trial; the seed sets the prompt's init and the data order), evaluated on validation and
        saved like a trial. A run that diverges or fails is kept with that status and ranks nowhere: the
        caller ensembles the ``ok`` ones. These steps are not part of the search's budget.
        """
        best = self.result().best
        if best is None:
            return []
        seeds = [self.base.seed + i for i in range(n)]
        runs = []
        if best.steps == self.plan.horizon:
            runs.append(best)
            seeds = seeds[1:]
        else:
            self.notes.append(f"--ensemble-seeds: the winner {best.id} stopped at step {best.steps} of "
                              f"{self.plan.horizon}: all {n} seeds are new runs of {self.plan.horizon} steps")
        log.info("tune: retraining the winner %s (%s) with seeds %s, %d steps each", best.id, best.spec.label(),
                 ", ".join(map(str, seeds)), self.plan.horizon)
        config = best.spec.method_config
        for seed in seeds:
            spec = dataclasses.replace(best.spec, method_config={**config, "seed": seed} if "seed" in config
                                       else dict(config))
            trial = Trial(best.index, spec, self.out / "seeds" / f"seed{seed}", seed=seed)
            shutil.rmtree(trial.folder, ignore_errors=True)  # an earlier search's run of this seed
            self.run_segment(trial, len(self.plan.rungs) - 1)
            if trial.status == "pending":
                trial.status = "not_run"
            runs.append(trial)
        return runs

    def result(self) -> TuneResult:
        """The search as it stands (trials not yet run are ``pending`` until it ends)."""
        ranking = sorted(self.trials, key=lambda t: rank_key(t, self.higher))
        return TuneResult(list(self.trials), ranking, self.plan, self.metric, self.higher, self.steps_used,
                          time.perf_counter() - self.t0, self.stopped_by, list(self.notes), untuned=self.default)

    def _stop(self, rung: int, alive: list[Trial]) -> None:
        left = [t for t in alive if len(t.rungs) == rung and t.status in ("pending", "ok")]
        for t in left:
            t.note = f"{self.stopped_by} spent before rung {rung}"
        log.warning("tune: %s spent (%d steps used, %.0fs): rung %d not run for %s", self.stopped_by,
                    self.steps_used, time.perf_counter() - self.t0, rung, ", ".join(t.id for t in left))


def successive_halving(model, tokenizer, task: TaskData, prompt: PromptArgs, train_args: TrainArgs, tune: TuneArgs,
                       *, output_dir: str | Path | None = None, eval_batch_size: int = 32, max_length: int = 256,
                       task_meta: dict | None = None, train_config: dict | None = None,
                       progress: Callable[[TuneResult], None] | None = None,
                       ensemble_seeds: int | None = None, max_new_tokens: int = 16,
                       before_run: Callable[[], None] | None = None) -> TuneResult:
    """Search the learning rate (and the ``--search`` settings) by successive halving on the validation split.

    Args:
        model: the frozen base model, loaded.
        tokenizer: its tokenizer.
        task: the task; needs a non-empty ``validation`` split (the ``test`` split is not read).
        prompt: the prompt settings every trial starts from (``--search`` values replace some).
        train_args: the loop settings of every trial; ``lr`` is searched, ``max_steps`` (if set) is each
            trial's schedule length, ``resume``, ``eval_every`` and ``early_stopping_patience`` are the
            search's business and ignored.
        tune: the search space and budget.
        output_dir: where ``trials/`` goes (default ``train_args.output_dir``).
        eval_batch_size: validation batch size.
        max_length: token budget per example.
        task_meta: the ``task`` record saved with each trial's prompt (default: from the task's format).
        train_config: extra sections to record with each trial's prompt (the model and data flags).
        progress: called with the search as it stands after every trial segment (e.g. to rewrite
            ``trials.json`` so that a long search can be followed, and read if it is interrupted).
        ensemble_seeds: after the search, train the winner's configuration with this many seeds
            (:meth:`_Search.retrain_seeds`); they are ``result.seed_runs``.
        max_new_tokens: tokens a generation task's validation decodes (``--max-new-tokens``).
        before_run: called once every check passed, before anything in ``output_dir`` changes (the command
            clears an earlier search's saved prompts there: a refused search leaves them).

    Returns:
        Every trial with its steps and validation numbers per rung, and the final ranking.

    Raises:
        ConfigError: no validation split, an invalid search space, or a budget that cannot pay for rung 0.
        DataError: an example of the training or validation split cannot be encoded (the message names the
            split); all before ``before_run`` and before any trial trains.
    """
    from softprompt.store.task_record import TaskRecord

    out = Path(output_dir if output_dir is not None else train_args.output_dir)
    meta = {"task": task_meta if task_meta is not None else TaskRecord.from_format(task.format).to_dict(),
            "train_config": dict(train_config or {})}
    search = _Search(model, tokenizer, task, prompt, train_args, tune, out, eval_batch_size, max_length, meta,
                     progress, max_new_tokens)
    if before_run is not None:
        before_run()
    result = search.run()
    if ensemble_seeds:
        result.seed_runs = search.retrain_seeds(ensemble_seeds)
        result.notes = list(search.notes)
    return result
