"""The search's files: ``trials.json`` (everything), ``trials.md`` (a table) and ``trials.png`` (curves)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from softprompt.tune.ensemble import format_ensembles
from softprompt.tune.trials import TuneResult
from softprompt.tune.versus import versus_line


def _json_safe(value):
    """``value`` with non-finite floats as null (JSON has no NaN or infinity; e.g. the perplexity of a huge loss)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _write_text(path: Path, text: str) -> None:
    """Replace ``path`` whole (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def format_table(result: TuneResult) -> str:
    """A Markdown table of the trials in ranking order: settings, the metric at every rung, status."""
    rungs = result.plan.rungs
    head = ["rank", "trial", "method", "P", "init", "lr"] + [f"{result.metric} @{r}" for r in rungs[:-1]] + [
        f"{result.metric} @{rungs[-1]} (kept state)", "val loss", "steps", "status"]  # last rung: its best state
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rank, t in enumerate(result.ranking, 1):
        by_rung = {r.rung: r for r in t.rungs}
        cells = [str(rank), t.id, t.spec.method, str(t.spec.num_virtual_tokens), t.spec.init_shown, f"{t.spec.lr:.3g}"]
        cells += [f"{by_rung[k].metric:.4f}" if k in by_rung else "" for k in range(len(rungs))]
        best_at = t.last.best_step if t.last else None  # the last rung keeps the best validated state
        cells += [f"{t.last.val_loss:.4f}" if t.last and t.last.val_loss is not None else "",
                  str(t.steps) + (f" (best @{best_at})" if best_at not in (None, t.steps) else "")]
        status = t.status + (" (best)" if result.best is t else "")
        cells.append(status + (f": {t.note}" if t.note else ""))
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    foot = (f"\n{len(result.trials)} trials, rungs {result.plan.describe()}; {result.steps_used} steps used in "
            f"{result.seconds:.0f}s; ranked by validation {result.metric} "
            f"({'higher' if result.higher_is_better else 'lower'} is better)"
            + ("" if result.metric == "loss" else ", ties by validation loss")
            + "; the last rung keeps each trial's best validated state (every --eval-every steps)")
    if result.stopped_by:
        foot += f"; stopped early: {result.stopped_by} spent"
    notes = "".join(f"\n- {n}" for n in result.notes)
    table = "\n".join(lines) + "\n" + foot + "\n" + (notes + "\n" if notes else "")
    if result.versus_untuned and result.untuned is not None:
        table += "\n" + versus_line(result.versus_untuned, result.untuned.spec.lr) + "\n"
    return table + format_ensembles(result.ensembles) if result.ensembles else table


def plot_trials(result: TuneResult, out_png: str | Path) -> Path:
    """Validation metric (and loss) against steps, one line per trial; diverged trials end in a cross."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f"validation {result.metric}", "metric")] + ([] if result.metric == "loss" else [
        ("validation loss", "val_loss")])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    best = result.best
    for t in result.trials:
        if not t.rungs:  # never run, or diverged in rung 0: named in the title instead
            continue
        steps = [r.steps for r in t.rungs]
        style = {"lw": 2.5, "zorder": 3} if t is best else {"lw": 1, "alpha": 0.7}
        tag = " (best)" if t is best else " (diverged)" if t.status == "diverged" else ""
        label = f"{t.id} {t.spec.label()}{tag}"
        for ax, (_, key) in zip(axes[0], panels, strict=True):
            values = [getattr(r, key) for r in t.rungs]
            (line,) = ax.plot(steps, values, "o-", label=label, **style)
            if t.status == "diverged":  # it went on training past its last evaluated rung, then diverged
                ax.plot([steps[-1]], [values[-1]], "x", ms=12, mew=2, color=line.get_color())
    for ax, (ylabel, _) in zip(axes[0], panels, strict=True):
        ax.set_xlabel("optimizer steps")
        if result.plan.rungs[-1] >= 9 * result.plan.rungs[0]:  # geometric rungs: evenly spaced on a log axis
            ax.set_xscale("log")
            ax.set_xticks(result.plan.rungs, [str(r) for r in result.plan.rungs])
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        for r in result.plan.rungs:
            ax.axvline(r, color="grey", lw=0.5, ls=":")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    title = f"successive halving: {len(result.trials)} trials, rungs {result.plan.rungs}"
    early = [f"{t.id} (step {t.steps})" for t in result.trials if t.status == "diverged" and not t.rungs]
    if early:
        title += "\ndiverged before their first evaluation: " + ", ".join(early)
    fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png


def write_reports(result: TuneResult, out: str | Path, png: bool = True) -> dict[str, Path]:
    """Write ``trials.json``, ``trials.md`` and (with ``png``) ``trials.png`` into ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "trials.json", "md": out / "trials.md", "png": out / "trials.png"}
    _write_text(paths["json"], json.dumps(_json_safe(result.to_dict()), indent=2, allow_nan=False))
    _write_text(paths["md"], format_table(result))
    if png:
        plot_trials(result, paths["png"])
    return paths
