"""Prompt ensembles of ``softprompt tune`` and their gain over the mean single prompt, on the validation split.

Two ensembles can come out of a search:

- ``seeds`` (``--ensemble-seeds N``): the winning configuration trained with ``N`` seeds (the winner's own
  run is the first when it trained the whole schedule; see :meth:`softprompt.tune.halving._Search.retrain_seeds`).
  Lester et al. (2021) report about +0.8 points on SuperGLUE for such an ensemble of five prompts.
- ``top_k`` (``--top-k K``, K > 1): the K best trials of the search (different learning rates or settings).

Each is measured as the store serves it: the members and the ``mean`` ensemble (the average of the
members' label probabilities) are put in a prompt store (``--store``, or a temporary one) and scored by an
:class:`~softprompt.engine.Engine` loaded from it, in shared batches, with
:func:`~softprompt.evaluate.evaluate_on_engine`. Only the validation split is read. For accuracy and
macro-F1 (the metrics of the predicted labels) and the loss (see :data:`METRICS`) the report holds each
member's value, their mean and sample standard deviation, the ensemble's value and the gain: ensemble minus
mean single prompt (for the loss, lower is better: a gain below 0 is an improvement). The console line
leads with the search's metric if it is accuracy or macro-F1, else with accuracy.

Ensembles combine label probabilities, so they are built for classification tasks only; a generation task,
or a model the engine does not serve (an encoder-decoder), gets a message saying why none is built.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from softprompt.data import Example, TaskFormat
from softprompt.forward import family_of

COMBINE = "mean"
# the predicted labels' metrics, and the loss: the engine scores an ensemble's label with the log of its members'
# mean likelihood (a mixture), whose loss is at most the members' mean loss (a gain below 0 is an improvement)
METRICS = ("accuracy", "macro_f1", "loss")
LEAD = ("accuracy", "macro_f1")  # the metrics a report's headline line can lead with (its search's, if one)


def not_built_reason(fmt: TaskFormat, model) -> str | None:
    """Why no ensemble can be built and served for this task and model, or None when one can."""
    if not fmt.is_classification:
        return ("this is a generation task, and ensembles combine the members' label probabilities "
                "(classification tasks only)")
    family = family_of(model)
    if not family.served:
        return f"the engine, which serves ensembles, does not serve {family.description} models"
    return None


def add_to_store(store, name: str, members: dict[str, Path]) -> None:
    """Add ``members`` (entry name -> prompt folder) and their mean ensemble ``name`` to ``store``, replacing
    entries of those names."""
    for member, folder in members.items():
        store.add(member, folder, overwrite=True)
    store.add_ensemble(name, list(members), COMBINE, overwrite=True)


def evaluate_stored(store, name: str, model, tokenizer, examples: list[Example], fmt: TaskFormat,
                    batch_size: int, max_length: int) -> dict:
    """Score the ensemble entry ``name`` of ``store`` and each of its members on ``examples``, through one engine.

    Returns:
        ``{"members": [{"name", "metrics"}], "ensemble", "mean_single", "std_single", "gain", "n"}``; metrics
        are :data:`METRICS`, as :func:`~softprompt.evaluate.evaluate_on_engine` gives them.
    """
    from softprompt.engine import Engine
    from softprompt.evaluate import evaluate_on_engine

    members = store.ensemble(name).members
    engine = Engine.from_store(store, model, tokenizer, names=[*members, name], max_batch_rows=batch_size,
                               max_input_tokens=max_length, truncate=True)
    scored = evaluate_on_engine(engine, {m: m for m in [*members, name]}, examples, fmt)
    n = int(scored[name]["n"])
    report = {row: {k: v for k, v in metrics.items() if k in METRICS} for row, metrics in scored.items()}
    singles = {k: [report[m][k] for m in members] for k in report[name]}
    mean = {k: statistics.fmean(v) for k, v in singles.items()}
    return {"members": [{"name": m, "metrics": report[m]} for m in members], "ensemble": report[name],
            "mean_single": mean, "std_single": {k: statistics.stdev(v) for k, v in singles.items()},
            "gain": {k: report[name][k] - mean[k] for k in mean}, "n": n}


def measure(kind: str, name: str, members: list[dict], model, tokenizer, examples: list[Example], fmt: TaskFormat,
            metric: str, higher: bool, batch_size: int, max_length: int, store_dir: str | None) -> dict:
    """Put ``members`` and their ensemble ``name`` in the store (``store_dir``, or a temporary one) and score them.

    Args:
        kind: ``"seeds"`` or ``"top_k"``.
        members: ``{"name", "prompt_dir", ...}`` each (the other keys, e.g. ``trial`` and ``seed``, are kept).
        metric: the metric the lines lead with (the search's, when the engine reports it; else accuracy).

    Returns:
        The report (see :func:`evaluate_stored`) with ``kind``, ``name``, ``combine``, ``split``, ``metric``,
        ``higher_is_better`` and ``store`` (``None``: a temporary store, gone).
    """
    from softprompt.store import PromptStore

    def run(root: str) -> dict:
        store = PromptStore(root, create=True)  # an existing store, or a new one in a missing or empty folder
        add_to_store(store, name, {m["name"]: Path(m["prompt_dir"]) for m in members})
        return evaluate_stored(store, name, model, tokenizer, examples, fmt, batch_size, max_length)

    if store_dir:
        scores = run(store_dir)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            scores = run(str(Path(tmp) / "store"))
    by_name = {m["name"]: m for m in scores.pop("members")}
    rows = [{**{k: (str(v) if isinstance(v, Path) else v) for k, v in m.items()}, "metrics": by_name[m["name"]]
             ["metrics"]} for m in members]
    if metric not in LEAD:  # a search ranked by the loss (or another metric): its headline stays accuracy
        metric, higher = "accuracy", True
    return {"kind": kind, "name": name, "combine": COMBINE, "split": "validation", "metric": metric,
            "higher_is_better": higher, "store": str(Path(store_dir).expanduser().absolute()) if store_dir else None,
            "members": rows, **scores}


def summary_line(report: dict) -> str:
    """One console line: the members' values, their mean ± std, the ensemble's, and the gain, in the lead metric."""
    m = report["metric"]
    if report["kind"] == "seeds":
        what = (f"seed ensemble of {report.get('winner', report['members'][0]['trial'])} (seeds "
                f"{', '.join(str(x['seed']) for x in report['members'])})")
    else:
        what = f"top-{len(report['members'])} ensemble ({', '.join(x['trial'] for x in report['members'])})"
    where = f" = store entry {report['name']!r}" if report["store"] else ""
    values = ", ".join(f"{x['metrics'][m]:.4f}" for x in report["members"])
    sense = "" if report["higher_is_better"] else "; lower is better"
    return (f"{what}{where}: validation {m} (n={report['n']}) of the members {values}; mean single "
            f"{report['mean_single'][m]:.4f} ± {report['std_single'][m]:.4f}; ensemble ({report['combine']}) "
            f"{report['ensemble'][m]:.4f}; gain {report['gain'][m]:+.4f} (ensemble - mean single{sense})")


def format_ensembles(ensembles: dict[str, dict]) -> str:
    """Markdown: one table per ensemble, a row per member, then mean ± std, the ensemble and the gain."""
    out = []
    for report in ensembles.values():
        if "skipped" in report:
            out.append(f"\n## {report['kind']} ensemble\n\nnot built: {report['skipped']}\n")
            continue
        keys = list(report["ensemble"])
        head = ["", "trial", "seed"] + keys
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for x in report["members"]:
            lines.append("| " + " | ".join([x["name"], x["trial"], str(x.get("seed", "")),
                                            *(f"{x['metrics'][k]:.4f}" for k in keys)]) + " |")
        lines.append("| mean ± std of the members | | | " + " | ".join(
            f"{report['mean_single'][k]:.4f} ± {report['std_single'][k]:.4f}" for k in keys) + " |")
        lines.append(f"| ensemble {report['name']} ({report['combine']}) | | | " + " | ".join(
            f"{report['ensemble'][k]:.4f}" for k in keys) + " |")
        lines.append("| gain (ensemble - mean single) | | | " + " | ".join(
            f"{report['gain'][k]:+.4f}" for k in keys) + " |")
        title = {"seeds": "seed ensemble (--ensemble-seeds)", "top_k": "top-k ensemble (--top-k)"}[report["kind"]]
        out.append(f"\n## {title}: validation split, n={report['n']}, through the engine as the store serves it"
                   "\n\n" + "\n".join(lines) + "\n")
    return "".join(out)
