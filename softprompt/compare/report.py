"""The comparison's verdicts and outputs: convergence of a validation curve, the table, and the two charts."""

from __future__ import annotations

from pathlib import Path

from softprompt.compare.ranking import search_edge
from softprompt.compare.specs import WEIGHT_KINDS
from softprompt.plateau import convergence  # noqa: F401  (re-exported: the column's rule)


def mean_curve(curves: list[list[dict]], metric: str) -> list[dict]:
    """Pointwise mean of several runs' curves (a step that only some runs reached averages those runs)."""
    by_step: dict[int, list[dict]] = {}
    for curve in curves:
        for p in curve:
            by_step.setdefault(p["step"], []).append(p)
    return [{"step": s, "loss": sum(p["loss"] for p in ps) / len(ps),
             metric: sum(p[metric] for p in ps) / len(ps), "n": len(ps)} for s, ps in sorted(by_step.items())]


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


HEAD = ("| method | trainable params | bytes per task | peak memory (RSS) | train time (s/step: fastest seed run; "
        "s: mean seed run) | lr | test accuracy | seeds "
        "| guard rollbacks | converged: steps each seed trained (val loss gain in its last third if still falling) |"
        "\n|---|---|---|---|---|---|---|---|---|---|\n")


ENSEMBLE_HEAD = " ensemble accuracy | gain over mean single prompt |"


def _ensemble_cells(row: dict) -> str:
    """The two ensemble cells (``compare --store``): the ensemble's test accuracy and its gain, or why none."""
    ens = row.get("ensemble")
    if "ensemble_accuracy" in row:
        return f" {row['ensemble_accuracy']:.4f} | {row['ensemble_gain']:+.4f} |"
    if ens is None:  # a weight method has no prompt; a prompt row run without --store has no ensemble
        if "error" in row:
            return " - | - |"
        return " - (no prompt) | - |" if row.get("kind") in WEIGHT_KINDS else " - (run without --store) | - |"
    why = "generation task" if "skipped" in ens else f"error: {ens.get('error')}"
    return f" n/a ({why}) | - |"


def _seed_note(run: dict) -> str:
    """After a seed's step count: why it is not converged (diverged, or its loss gain while still falling)."""
    if run.get("diverged"):
        return " (diverged)"
    if run.get("converged") is False and run.get("last_third_gain") is not None:
        return f" ({run['last_third_gain']:+.1%})"
    return ""


def _time_cell(row: dict) -> str:
    """Train time: seconds per step of the fastest seed run (a run slowed by other work on the machine is slower
    per step, never faster), then the mean seconds a seed run trained (they stop at different steps)."""
    per_step = [r["train_s"] / r.get("steps_run", row["steps"]) for r in row.get("seeds", [])
                if r.get("train_s") and r.get("steps_run", row["steps"])]
    total = f"{row['train_s']:.0f} s"
    return f"{min(per_step):.2f} s/step, {total}" if per_step else total


def format_row(row: dict, ensemble: bool = False) -> str:
    """One table line: means over the row's seeds, ``mean ± std`` accuracy, and its lr, rollbacks, convergence;
    with ``ensemble``, the seed ensemble's test accuracy and its gain over the mean single prompt."""
    tail = _ensemble_cells(row) if ensemble else ""
    if "error" in row:
        return f"| {row['method']} | - | - | - | - | - | n/a: {row['error']} | - | - | - |" + tail
    peak = f"{row['peak_mib']:.0f} MiB" if row.get("peak_mib") else "-"
    std = row.get("accuracy_std")
    acc = f"{row['accuracy']:.4f}" + (f" ± {std:.4f}" if std is not None else "")
    if row.get("macro_f1") is not None:  # selected by macro-F1 (one label dominates validation)
        f1_std = row.get("macro_f1_std")
        acc += f" (macro-F1 {row['macro_f1']:.4f}" + (f" ± {f1_std:.4f})" if f1_std is not None else ")")
    search = row.get("lr_search") or {}
    edge = search_edge(search.get("candidates") or [], search.get("metric"), search.get("metric") != "loss")
    lr = f"{row['lr']:.3g}" + ((f" (search; at its {edge} edge)" if edge else " (search)") if row.get("lr_search")
                               else " (fixed)")
    rollbacks = str(row["rollbacks"]) if row.get("guard", True) else "off"
    converged = {True: "yes", False: "no", None: "?"}[row.get("converged")] + ": " + ", ".join(
        str(r.get("steps_run", row["steps"])) + _seed_note(r) for r in row.get("seeds", [])) + (
        f" (at most {row['steps']})" if row.get("spec_def", {}).get("steps_scale", 1) != 1 else "")
    return (f"| {row['method']} | {row['trainable_params']:,} | {_size(row['bytes_per_task'])} | {peak} | "
            f"{_time_cell(row)} | {lr} | {acc} | {row['n_seeds']} | {rollbacks} | {converged} |" + tail)


def format_table(rows: list[dict]) -> str:
    """The markdown table of ``rows`` (:func:`softprompt.compare.run_compare`'s rows); the ensemble columns
    appear when a row has an ensemble (``compare --store``)."""
    ensemble = any("ensemble" in r for r in rows)
    head = HEAD
    if ensemble:
        first, rule = HEAD.splitlines()
        head = first + ENSEMBLE_HEAD + "\n" + rule + "---|---|\n"
    return head + "\n".join(format_row(r, ensemble) for r in rows) + "\n"


def format_failures(rows: list[dict], specs: list) -> str | None:
    """The failed methods of ``rows`` with their errors, then ``specs`` not run; ``None`` when all ran."""
    failed = [r for r in rows if "error" in r]
    if not failed:
        return None
    not_run = [s.label for s in specs[len(rows):]]
    lines = [f"  {r['method']}: {r['error']}" for r in failed]
    if not_run:
        lines.append(f"  not run (the first failure stops the comparison; --keep-going runs them): "
                     f"{', '.join(not_run)}")
    return f"{len(failed)} of {len(specs)} methods failed:\n" + "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _styles(rows: list[dict]) -> list[dict]:
    """One colour and marker per row, distinct for up to 20 rows (the default cycle repeats after 10: two rows
    shared a colour); weight methods drawn with squares and dashes, prompt methods with circles and lines."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return [{"color": cmap(i % 20), "marker": "s" if r.get("kind") in WEIGHT_KINDS else "o",
             "linestyle": "--" if r.get("kind") in WEIGHT_KINDS else "-"} for i, r in enumerate(rows)]


def plot_compare(rows: list[dict], path: Path) -> None:
    """Test accuracy (mean over seeds, ± std as error bars) against trainable parameters; a legend names the
    rows (labels written beside the points overlapped where two rows have similar sizes)."""
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 5))
    for r, st in zip(ok, _styles(ok), strict=True):
        ax.errorbar(r["trainable_params"], r["accuracy"], yerr=r.get("accuracy_std") or 0, fmt=st["marker"],
                    color=st["color"], ms=6, capsize=3, label=r["method"])
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel(f"test accuracy (mean ± std over {ok[0]['n_seeds']} seeds)")
    budgets = sorted({r["steps"] for r in ok})  # a row may have a larger budget (Spec.steps_scale)
    ax.set_title("same loop, at most " + " or ".join(str(b) for b in budgets) + " steps")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(rows: list[dict], path: Path) -> None:
    """Each row's validation loss and metric against the step (mean over seeds), one line per method."""
    ok = [r for r in rows if "error" not in r and r.get("curve")]
    if not ok:
        return
    plt = _pyplot()
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(13, 5))
    for r, st in zip(ok, _styles(ok), strict=True):
        steps = [p["step"] for p in r["curve"]]
        loss_ax.plot(steps, [p["loss"] for p in r["curve"]], ms=3, label=r["method"], **st)
        metric_ax.plot(steps, [p[r["metric"]] for p in r["curve"]], ms=3, label=r["method"], **st)
    loss_ax.set_yscale("log")  # the first evaluations' losses would flatten every later difference
    loss_ax.set_ylabel("validation loss (log)")
    metric_ax.set_ylabel(f"validation {ok[0]['metric']}")
    for ax in (loss_ax, metric_ax):
        ax.set_xlabel("step")
    metric_ax.legend(fontsize=7, loc="best")
    # seeds stop at their own plateaus: past the first stop, a point is the mean of the seeds still training
    fig.suptitle(f"validation during training (mean over the {ok[0]['n_seeds']} seeds, of those still training "
                 "at each step)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
