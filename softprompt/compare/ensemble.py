"""``softprompt compare --store DIR``: each prompt method's seed prompts and their ensemble, scored on test.

Each seed run of a prompt method saves its prompt (``Job.save_prompt_to``); the parent adds them to the
store as ``<slug>-seed<k>`` (``k``: the run's seed) and their ``mean`` ensemble as ``<slug>`` (the slug of
the method's label, e.g. ``prompt-tuning-text-init-p-20``). The ensemble and its members are then scored on
the test examples the seed runs were scored on (the same capped, seeded subset; :func:`load_run_task`), by
an engine loaded from the store, as the store serves them, in a fresh process like every run. The row gets
``ensemble_accuracy`` and ``ensemble_gain`` (ensemble minus the mean of its members' accuracies).

Weight methods (LoRA, adapters, BitFit, full fine-tuning) have no prompt: nothing is stored for them.
Ensembles combine label probabilities, so a generation task gets its seed prompts stored and no ensemble,
with a message saying so.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from softprompt.compare.run import in_child, load_run_task
from softprompt.compare.specs import WEIGHT_KINDS, Spec, method_slug

COMBINE = "mean"
EVAL_MAX_LENGTH = 256  # the token budget run_one's test evaluation uses (evaluate_prompt's default)


def member_name(slug: str, seed: int) -> str:
    return f"{slug}-seed{seed}"


def planned_entries(specs: list[Spec], seeds: int) -> dict[str, str]:
    """Store entry name -> kind (prompt or ensemble) that ``compare --store`` writes for ``specs``."""
    out: dict[str, str] = {}
    for spec in specs:
        if spec.kind in WEIGHT_KINDS:
            continue
        slug = method_slug(spec.label)
        out.update({member_name(slug, s): "prompt" for s in range(seeds)})
        out[slug] = "ensemble"
    return out


def store_problems(specs: list[Spec], seeds: int, store: str) -> list[str]:
    """What would stop ``--store`` after the training: too few seeds, a folder that is not a store, or
    entries of the other kind where the prompts or ensembles go."""
    from softprompt.store import PromptStore, StoreError

    problems = []
    if seeds < 2:
        problems.append(f"--store adds each prompt method's seed prompts and their ensemble: an ensemble needs "
                        f"--seeds >= 2, got {seeds}")
    root = Path(store).expanduser()
    if not root.is_dir() or not any(root.iterdir()):
        return problems
    try:
        existing = PromptStore(root)
    except StoreError as e:
        return problems + [f"--store {store}: {e}"]
    a = {"prompt": "a prompt", "ensemble": "an ensemble"}
    clash = [f"{name!r} is {a[existing.kind(name)]}, compare writes {a[kind]} there"
             for name, kind in planned_entries(specs, seeds).items()
             if name in existing and existing.kind(name) != kind]
    if clash:
        problems.append(f"--store {store}: {'; '.join(clash)}; remove those entries (softprompt store remove) or "
                        "use another store")
    return problems


@dataclass
class EnsembleEval:
    """Score the ensemble entry ``name`` of ``store`` and its members on the runs' test examples."""

    model: str
    dataset: str
    val_samples: int
    test_samples: int
    store: str
    name: str
    batch_size: int = 32

    def to_json(self) -> str:
        return json.dumps({"ensemble": asdict(self)})


def evaluate_ensemble(ev: EnsembleEval) -> dict:
    """In this process: ``{"members": {name: accuracy}, "ensemble": accuracy, "n": test examples}``."""
    from softprompt.engine import Engine
    from softprompt.evaluate import evaluate_on_engine
    from softprompt.model import load_base_model
    from softprompt.store import PromptStore

    # fp32, as every row of the comparison was trained and scored (compare.run.run_one): bf16, the CUDA
    # default, scored the members otherwise than their seed runs did
    model, tok = load_base_model(ev.model, dtype="float32")
    task, _ = load_run_task(ev.dataset, ev.val_samples, ev.test_samples)
    store = PromptStore(ev.store)
    members = store.ensemble(ev.name).members
    engine = Engine.from_store(store, model, tok, names=[*members, ev.name], max_batch_rows=ev.batch_size,
                               max_input_tokens=EVAL_MAX_LENGTH, truncate=True)
    examples = task.examples("test")
    report = evaluate_on_engine(engine, {m: m for m in [*members, ev.name]}, examples, task.format)
    return {"members": {m: report[m]["accuracy"] for m in members}, "ensemble": report[ev.name]["accuracy"],
            "n": len(examples)}


def evaluate_in_subprocess(ev: EnsembleEval) -> dict:
    """:func:`evaluate_ensemble` in a fresh process (as every run of the comparison); ``{"error"}`` on failure."""
    return in_child(ev.to_json())


Evaluator = Callable[[EnsembleEval], dict]


def store_seed_ensemble(spec: Spec, row: dict, settings, store_dir: str, evaluate: Evaluator | None = None,
                        log=print) -> dict:
    """Add a finished row's seed prompts and their ensemble to the store; score them on test.

    Returns:
        What the row gets: ``{}`` for a weight method; else ``ensemble`` (the entries, each member's test
        accuracy through the engine, their mean, the ensemble's, or why none was built) and, when built,
        ``ensemble_accuracy`` and ``ensemble_gain``.
    """
    from softprompt.store import PromptStore, load_prompt

    if spec.kind in WEIGHT_KINDS:
        return {}
    slug = method_slug(spec.label)
    store = PromptStore(store_dir, create=not Path(store_dir).exists())
    members = {member_name(slug, r["seed"]): r["prompt_dir"] for r in row["seeds"]}
    for name, folder in members.items():
        store.add(name, folder, overwrite=True)
    record = {"name": slug, "members": list(members), "store": str(store.root), "split": "test"}
    task = load_prompt(next(iter(members.values()))).task_record
    if task is None or task.verbalizer is None:
        why = ("a generation task: ensembles combine the members' label probabilities (classification tasks "
               "only)")
        log(f"  {spec.label}: seed prompts stored as {', '.join(members)}; no ensemble: {why}")
        return {"ensemble": {**record, "name": None, "skipped": why}}
    store.add_ensemble(slug, list(members), COMBINE, overwrite=True)
    scored = (evaluate or evaluate_in_subprocess)(EnsembleEval(settings.model, settings.dataset, settings.val_samples,
                                                               settings.test_samples, str(store.root), slug))
    if "error" in scored:
        log(f"  {spec.label}: ensemble {slug!r} stored; its test evaluation failed: {scored['error']}")
        return {"ensemble": {**record, "error": scored["error"]}}
    singles = [scored["members"][m] for m in members]
    mean = statistics.fmean(singles)
    record.update(combine=COMBINE, n=scored["n"], member_accuracy=singles, mean_single=mean,
                  accuracy=scored["ensemble"], gain=scored["ensemble"] - mean)
    runs = [r["accuracy"] for r in row["seeds"]]
    if singles != runs:  # the same prompts on the same examples: only a numerical near-tie could differ
        record["note"] = (f"the engine's member accuracies {singles} differ from the seed runs' {runs}; the gain "
                          "uses the engine's, measured with the ensemble")
        log(f"  {spec.label}: note: {record['note']}")
    log(f"  {spec.label}: ensemble {slug!r} of {len(members)} seeds: test accuracy {record['accuracy']:.4f}, mean "
        f"single prompt {mean:.4f}, gain {record['gain']:+.4f}")
    return {"ensemble": record, "ensemble_accuracy": record["accuracy"], "ensemble_gain": record["gain"]}
