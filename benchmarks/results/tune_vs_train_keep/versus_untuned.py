"""`softprompt.tune.versus` (tune's own winner-vs-untuned comparison, added after this search ran) on a finished
search folder: `python versus_untuned.py runs/tune_vs_train_keep/rotten_tomatoes/tune OUT.json` (Rotten Tomatoes'
data flags: the default dataset)."""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

from softprompt import load_base_model
from softprompt.config import DataArgs
from softprompt.tune.versus import versus_line, versus_untuned
from softprompt.workflows.loading import load_task_from_args
from softprompt.workflows.tuning import unread_validation

root = Path(sys.argv[1])
trials = json.loads((root / "trials.json").read_text())
by_id = {t["id"]: t for t in trials["trials"]}
untuned_id = next(t["id"] for t in trials["trials"] if "untuned" in t["note"])

def trial(tid):
    return SimpleNamespace(id=tid, status=by_id[tid]["status"], prompt_dir=root / "trials" / tid / "prompt",
                           spec=SimpleNamespace(lr=by_id[tid]["config"]["lr"]))

result = SimpleNamespace(best=trial(trials["best"]), untuned=trial(untuned_id), metric=trials["metric"])
data = DataArgs(dataset="rotten_tomatoes")
task = load_task_from_args(data)
unread = unread_validation(data, task)
model, tok = load_base_model()
report = versus_untuned(result, model, tok, task.splits["validation"], task.format, 32, data.max_length, unread)
print(versus_line(report, result.untuned.spec.lr))
Path(sys.argv[2]).write_text(json.dumps(report, indent=2))
