"""Write the runs of a compare.json's rows into a run journal that lacks them (rows run before the journal existed).

Each job is built as softprompt.compare.harness builds it; a job the journal holds already is left alone.

    python benchmarks/results/compare_ext/backfill_journal.py COMPARE_JSON RUNS_JSONL
"""
import json
import sys
from dataclasses import replace

from softprompt.compare import DEFAULT_SPECS, CompareSettings, Job
from softprompt.compare.journal import job_key

src, journal = sys.argv[1], sys.argv[2]
data = json.load(open(src))
st = {k: v for k, v in data["settings"].items() if k not in ("search_seed",)}
st["search_steps"] = 0 if st["search_steps"] == min(st["steps"], 60) else st["search_steps"]
settings = CompareSettings(**st)
have = set()
for line in open(journal):
    have.add(job_key(Job.from_json(json.dumps(json.loads(line)["job"]))))
specs = {s.label: s for s in DEFAULT_SPECS}
out = []
for row in data["rows"]:
    spec = specs[row["spec"]]
    assert spec.to_dict() == row["spec_def"], (spec.to_dict(), row["spec_def"])
    for c in row["lr_search"]["candidates"]:
        job = Job(replace(spec, steps_scale=1), settings.model, settings.dataset, settings.search_budget,
                  settings.batch_size, c["lr"], seed=settings.search_seed, val_samples=settings.val_samples,
                  eval_every=0, test_samples=0, schedule=settings.schedule, metric=settings.metric)
        run = {"curve": [{"step": settings.search_budget, "loss": c["val_loss"], "accuracy": c["val_accuracy"]}],
               "metric": "accuracy", "higher_is_better": True, "rollbacks": c["rollbacks"],
               "diverged": c["diverged"], "train_s": c["train_s"], "lr": c["lr"],
               "backfilled_from": "compare.json lr_search candidate"}
        out.append((job, run))
    for r in row["seeds"]:
        job = Job(spec, settings.model, settings.dataset, settings.steps * spec.steps_scale, settings.batch_size,
                  row["lr"], seed=r["seed"], val_samples=settings.val_samples, eval_every=settings.eval_every,
                  test_samples=settings.test_samples, schedule=settings.schedule, metric=settings.metric,
                  stop_when_flat=settings.converged_tol if settings.until_flat else 0.0)
        run = {k: v for k, v in r.items() if k not in ("converged", "last_third_gain")}
        run["backfilled_from"] = "compare.json seed run"
        out.append((job, run))
added = 0
with open(journal, "a") as f:
    for job, run in out:
        key = job_key(job)
        if key in have:
            continue
        f.write(json.dumps({"job": json.loads(key), "run": run}) + "\n")
        added += 1
        print("added", job.spec.label, job.lr, job.seed, job.steps)
print(added, "added")
