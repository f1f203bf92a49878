"""Paired, on `conventions`: the default train's prompt kept by accuracy (what --metric auto chose before) against
the one kept by macro-F1 (auto now). Run from the repository root after
`python benchmarks/tune_vs_train.py --tasks conventions --output-dir runs/tune_vs_train_auto`."""

import json
import sys
from pathlib import Path

sys.path.insert(0, "benchmarks")
import tune_vs_train as t  # noqa: E402 - the benchmark's own data flags, runner and paired scoring

out = Path("runs/tune_vs_train_auto/conventions")
flags = t.task_flags("conventions", out)
acc_dir = out / "default_accuracy"
if not (acc_dir / "prompt").is_dir():
    t.run(["softprompt", "train", *flags, "--max-steps", "100", "--baselines", "no_prompt", "--split", "validation",
           "--metric", "accuracy", "--output-dir", str(acc_dir)], out / "default_accuracy.log")
scored = t.score({"default": acc_dir / "prompt", "tune": out / "default" / "prompt"}, flags)
Path("runs/tune_vs_train_auto/accuracy_vs_auto.json").write_text(json.dumps(scored, indent=2))
for g in t.GROUPS:
    s = scored[g]
    print(g, s["n"], "accuracy-selected", round(s["default"]["accuracy"], 4), round(s["default"]["macro_f1"], 4),
          "| auto (macro-F1)", round(s["tune"]["accuracy"], 4), round(s["tune"]["macro_f1"], 4),
          "| McNemar p", round(s["mcnemar_p"], 4), "| F1 diff", s["macro_f1_diff_ci"])
