"""PNG of training/validation curves from a run's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def plot_curves(metrics_jsonl: str | Path, out_png: str | Path) -> Path:
    """Plot training loss (and a smoothed copy), validation loss and validation metrics per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in Path(metrics_jsonl).read_text().splitlines() if ln.strip()]
    if not rows:
        raise ValueError(f"{metrics_jsonl}: no steps logged")
    steps = [r["step"] for r in rows]
    loss = [r["loss"] for r in rows]
    window = max(1, len(loss) // 20)
    smooth = [sum(loss[max(0, i - window + 1):i + 1]) / len(loss[max(0, i - window + 1):i + 1])
              for i in range(len(loss))]
    val = [r for r in rows if "val_loss" in r]
    val_keys = [k for k in ("val_accuracy", "val_macro_f1", "val_exact_match", "val_f1") if val and k in val[0]]
    fig, axes = plt.subplots(1, 2 if val_keys else 1, figsize=(11 if val_keys else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot(steps, loss, alpha=0.3, label="train loss")
    ax.plot(steps, smooth, label=f"train loss (mean of {window})")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (target tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    if val_keys:
        ax2 = axes[0][1]
        for k in val_keys:
            ax2.plot([r["step"] for r in val], [r[k] for r in val], "o-", label=k.removeprefix("val_"))
        ax2.set_xlabel("step")
        ax2.set_ylabel("validation metric")
        ax2.legend()
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png
