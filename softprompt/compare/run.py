"""One training run of the comparison (one row, one lr, one seed), in this process or in a fresh child process.

A run trains with :func:`softprompt.train.train`, which measures the validation split every ``eval_every``
steps (the row's curve). A run of the lr search has ``test_samples == 0``: the test split is dropped as soon
as the data is loaded, so a search can neither score on it nor leak it into the choice.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from softprompt.compare.specs import WEIGHT_KINDS, Spec
from softprompt.compare.weights import WeightTuning, weight_method
from softprompt.data.dataset import example_key
from softprompt.data.splits import carve

HOLDOUT_SEED = 0  # every run of every row holds out the same train examples as validation
WARMUP_STEPS = 10  # every run's warmup (at most its steps)
CURVE_METRICS = ("accuracy", "macro_f1", "exact_match", "f1")  # what a run's validation curve records, with loss


@dataclass
class Job:
    """One run: what to train (``spec`` at ``lr`` with ``seed``), on what, for how long, and what to score.

    ``eval_every`` 0 measures validation once, after the last step. ``test_samples`` 0: no test split at all.
    ``stop_when_flat`` > 0 stops the run once its validation loss has flattened (``TrainArgs.stop_when_flat``);
    its row then has the step in ``flat_step``, and ``steps_run`` is the steps it trained. ``schedule``: its
    lr schedule (``TrainArgs.schedule``).
    ``save_prompt_to``: a prompt method's run saves its trained prompt there (``save_prompt``'s folder, with
    the task's template and verbalizer), so that the parent can add it to a store; weight methods save none.
    ``metric``: the validation metric of its curve (and so of the lr search's ranking): the comparison's,
    resolved (:func:`selection_metric`); ``auto`` resolves it in the run, on its own validation split. It is
    not part of the run's identity in the journal (:func:`~softprompt.compare.journal.job_key`): the run keeps
    its last state, so its training and test score do not depend on it; the journal checks the run's recorded
    metric instead.
    """

    spec: Spec
    model: str
    dataset: str
    steps: int
    batch_size: int
    lr: float
    seed: int = 0
    val_samples: int = 200
    eval_every: int = 0
    test_samples: int = 0
    save_prompt_to: str | None = None
    stop_when_flat: float = 0.0
    schedule: str = "linear"
    metric: str = "auto"

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "spec": self.spec.to_dict()})

    @classmethod
    def from_json(cls, text: str) -> Job:
        data = json.loads(text)
        return cls(**{**data, "spec": Spec(**data["spec"])})


def _peak_rss_mib() -> float | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def ensure_validation(task, n: int) -> str:
    """Make sure ``task`` has a validation split; say where it came from.

    An existing split is kept (the caller caps it, with ``load_task``'s ``max_samples``). A dataset without one
    (a user's train/test files) gets ``min(n, len(train) // 5)`` train examples held out, chosen with a fixed
    seed so that every run of every row holds out the same ones.
    """
    valid = task.splits.get("validation")
    if valid:
        return f"validation split ({len(valid)} examples)"
    train = task.splits["train"]
    k = min(n, len(train) // 5)
    if k < 1:
        raise ValueError(f"no validation split, and {len(train)} train examples are too few to hold some out")
    # by content (copies of one example on one side: a split by position put them on both) and by label
    labels = [ex.label for ex in train] if task.format.is_classification else None
    held, rest = carve([example_key(ex) for ex in train], [k], f"{HOLDOUT_SEED}:compare-validation", labels)
    task.splits["validation"] = [train[i] for i in held]
    task.splits["train"] = [train[i] for i in rest]
    return f"{len(held)} train examples held out (the dataset has no validation split)"


def load_run_task(dataset: str, val_samples: int, test_samples: int):
    """The task as every run of the comparison sees it: validation capped (or held out of train, see
    :func:`ensure_validation`), test capped to ``test_samples`` (a seeded subset: the same examples in every
    run), or dropped when ``test_samples`` is 0. Returns the task and where its validation split came from."""
    from softprompt.data import load_task

    caps = {"validation": val_samples, **({"test": test_samples} if test_samples else {})}
    task = load_task(dataset, max_samples=caps)
    if not test_samples:
        task.splits.pop("test", None)
    return task, ensure_validation(task, val_samples)


def selection_metric(settings) -> tuple[str, str | None]:
    """The validation metric a comparison's rows rank by (``settings.metric`` resolved on the validation split
    every run sees: :func:`softprompt.selection.primary_metric`) and the console line saying why ``auto`` chose
    macro-F1, if it did. Loads the data, not the model.

    Raises:
        ConfigError: a metric the task does not measure.
    """
    from softprompt.selection import metric_note, primary_metric

    task, _ = load_run_task(settings.dataset, settings.val_samples, 0)
    examples = task.splits["validation"]
    return (primary_metric(task.format, settings.metric, examples)[0],
            metric_note(task.format, examples, settings.metric))


def train_args(job: Job, output_dir: str, metric: str = "auto"):
    """The ``TrainArgs`` a run of ``job`` trains with (``metric``: the validation metric it selects by)."""
    from softprompt.config import TrainArgs

    return TrainArgs(output_dir=output_dir, max_steps=job.steps, batch_size=job.batch_size,
                     optimizer=job.spec.optimizer, lr=job.lr, warmup_steps=min(WARMUP_STEPS, job.steps),
                     eval_every=job.eval_every or job.steps, checkpoint_every=10**9, seed=job.seed,
                     weight_decay=0.0, divergence_guard=job.spec.kind != "full", metric=metric,
                     stop_when_flat=job.stop_when_flat, schedule=job.schedule)


def run_one(job: Job) -> dict:
    """Train and evaluate one run in this process; return its numbers (see :func:`softprompt.compare.run_compare`)."""
    from softprompt.data import token_counts
    from softprompt.evaluate import evaluate_prompt
    from softprompt.forward import family_of
    from softprompt.methods import build_method
    from softprompt.model import load_base_model
    from softprompt.selection import primary_metric
    from softprompt.store import load_prompt, save_prompt
    from softprompt.train import train

    spec = job.spec
    # fp32 on every device: weight methods train the model's own weights, whose small AdamW steps bf16 (the
    # CUDA default) rounds away (a norm gain of 1.0 moves in steps of 0.0039); every row alike, for fairness
    model, tok = load_base_model(job.model, dtype="float32")
    task, validation = load_run_task(job.dataset, job.val_samples, job.test_samples)
    # the comparison's metric (auto: macro-F1 where one label dominates this validation split, as train's)
    metric, higher = primary_metric(task.format, job.metric, examples=task.splits["validation"])
    torch.manual_seed(job.seed)  # the random init of LoRA and of the adapters
    if spec.kind in WEIGHT_KINDS:
        method = weight_method(model, spec, seed=job.seed)
    else:
        # as softprompt train builds it: sample_vocab draws from the training data's tokens, class_labels
        # starts from the label texts
        method = build_method(spec.kind, {**spec.config, "seed": job.seed}, model, tok,
                              label_texts=task.format.label_texts if task.format.is_classification else None,
                              token_counts=token_counts(tok, task.examples("train"))
                              if spec.config.get("init") == "sample_vocab" else None)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        # the divergence guard keeps two in-memory copies of the trained tensors and their optimizer state:
        # a few KiB for a prompt, about 3 GiB for full fine-tuning, which would swamp its peak-memory column
        result = train(model, tok, method, task, train_args(job, d, metric),
                       keep_best=False, checkpoints=False)  # the last state is scored: no copies, no checkpoint
        train_s = time.perf_counter() - t0 - sum(r.get("val_s", 0.0) for r in result.history)
        events = guard_events(Path(d) / "metrics.jsonl")
        # bytes per task: the fp32 tensors a task stores, measured alike for every row (no file headers or JSON);
        # a prompt method's are what save_prompt writes (P-tuning: its (P, H) output, not its encoder)
        if isinstance(method, WeightTuning):
            disk = sum(p.numel() * 4 for p in method.params)
        else:
            stored = load_prompt(save_prompt(Path(d) / "saved", method, model)).tensors
            disk = sum(t.numel() * 4 for t in stored.values())
    # every validation metric the task measures, not only the comparison's: a journalled run then serves a
    # comparison ranked by another (see softprompt.compare.journal)
    curve = [{"step": r["step"], "loss": r["val_loss"], **{k: r[f"val_{k}"] for k in CURVE_METRICS if f"val_{k}" in r}}
             for r in result.history if f"val_{metric}" in r]
    row = {"method": getattr(method, "label", None) or spec.label, "kind": spec.kind, "seed": job.seed,
           "lr": job.lr, "steps": job.steps, "steps_run": result.steps, "flat_step": result.flat_step,
           "trainable_params": method.num_trainable(), "bytes_per_task": disk,
           "train_s": round(train_s, 1), "metric": metric, "higher_is_better": higher, "validation": validation,
           "curve": curve, "rollbacks": result.rollbacks, "diverged": result.diverged,
           "lr_scale": result.lr_scale, "guard": spec.kind != "full", "events": events}
    if job.test_samples:
        model.eval()
        method.eval()
        with torch.no_grad():
            kv = family_of(model).inference_prompt(model, method()) if not isinstance(method, WeightTuning) else None
            metrics, _ = evaluate_prompt(model, tok, kv, task.examples("test"), task.format, with_loss=False)
        row["accuracy"] = metrics.get("accuracy", metrics.get("exact_match"))
        if "macro_f1" in metrics:  # reported beside accuracy where the runs selected by it (summarise)
            row["macro_f1"] = metrics["macro_f1"]
    if job.save_prompt_to and not isinstance(method, WeightTuning):
        from softprompt.store.task_record import TaskRecord

        folder = save_prompt(job.save_prompt_to, method, model,
                             task=TaskRecord.from_format(task.format, job.dataset).to_dict(),
                             train_config={"compare": {"method": row["method"], "seed": job.seed, "lr": job.lr,
                                                       "steps": job.steps, "steps_run": result.steps,
                                                       "schedule": job.schedule, "optimizer": spec.optimizer}},
                             metrics={"test_accuracy": row["accuracy"]} if "accuracy" in row else {}, overwrite=True)
        row["prompt_dir"] = str(folder)
    row["peak_mib"] = _peak_rss_mib()
    return row


def in_child(payload: str) -> dict:
    """Run ``python -m softprompt.compare PAYLOAD`` in a fresh process: the dict it printed last, or
    ``{"error": ...}`` with the child's last stderr line (its exit status when it left none: killed by a signal)."""
    proc = subprocess.run([sys.executable, "-m", "softprompt.compare", payload], capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode < 0:  # its last stderr line is whatever it logged before the kill (an OOM killer's -9)
        return {"error": f"the run was killed by signal {-proc.returncode}"}
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or [f"the run exited with status {proc.returncode}"])[-1]}
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:  # a stray print after the result: this run fails, not the whole comparison
        return {"error": f"the run's last output line is not its result: {lines[-1][:200]!r}"}


def guard_events(log: Path) -> list[dict]:
    """The divergence guard's decisions in a run's ``metrics.jsonl``: ``[{"step", "event", "reason"}]`` (a
    rollback, or the alarm that ended the run), so a row says when and why, not only how often."""
    from softprompt.train import log_rows

    return [{"step": r["step"], "event": r["event"], "reason": r.get("reason")} for r in log_rows(log) if "event" in r]


def run_in_subprocess(job: Job) -> dict:
    """:func:`run_one` in a fresh Python process (its peak memory is its own); a failure is a row with ``error``."""
    row = in_child(job.to_json())
    if "error" in row:
        return {"method": job.spec.label, "kind": job.spec.kind, "seed": job.seed, "lr": job.lr, **row}
    return row


def child_main(argv: list[str]) -> None:
    """One run in a child process (or, for ``{"ensemble": ...}``, a store ensemble's test evaluation): print its
    result as the last stdout line."""
    data = json.loads(argv[0])
    if "ensemble" in data:
        from softprompt.compare.ensemble import EnsembleEval, evaluate_ensemble

        print(json.dumps(evaluate_ensemble(EnsembleEval(**data["ensemble"]))))
        return
    print(json.dumps(run_one(Job.from_json(argv[0]))))
