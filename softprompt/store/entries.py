"""Entries of a :class:`~softprompt.store.prompt_store.PromptStore`: listing rows, ensembles, label sets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from softprompt.model import fingerprint_mismatch
from softprompt.store.errors import StoreError
from softprompt.store.format import StoredPrompt
from softprompt.store.names import safe_task_name
from softprompt.store.snapshot import read_json
from softprompt.store.task_record import TaskRecord

ENSEMBLE_FILE = "ensemble.json"
COMBINES = ("mean", "vote")

__all__ = ["COMBINES", "ENSEMBLE_FILE", "EnsembleSpec", "StoreEntry", "base_model_problem", "label_problem",
           "prompt_labels", "prompt_template", "read_ensemble_file", "task_labels"]


@dataclass
class StoreEntry:
    """One row of :meth:`PromptStore.list`.

    Attributes:
        name: entry (task) name.
        kind: ``"prompt"``, ``"ensemble"`` or ``"broken"`` (see ``error``).
        method: the prompt's method (prompts only).
        num_virtual_tokens: prompt length (prompts only).
        template: the task template, if recorded.
        labels: label names of a classification task (verbalizer keys); ``None`` for generation.
        members: member names (ensembles only).
        combine: ``"mean"`` or ``"vote"`` (ensembles only).
        metrics: recorded evaluation metrics.
        created: ISO timestamp, if recorded.
        path: the entry folder.
        error: why the entry is broken.
    """

    name: str
    kind: str
    method: str | None = None
    num_virtual_tokens: int | None = None
    template: str | None = None
    labels: list[str] | None = None
    members: list[str] | None = None
    combine: str | None = None
    metrics: dict = field(default_factory=dict)
    created: str | None = None
    path: Path | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``path`` as a string)."""
        return {**asdict(self), "path": None if self.path is None else str(self.path)}


@dataclass(frozen=True)
class EnsembleSpec:
    """An ensemble entry: combine the members' predictions by ``"mean"`` (scores) or ``"vote"``."""

    name: str
    members: list[str]
    combine: str


def task_labels(task: Any, where: Path | str) -> list[str] | None:
    """Label names of a task dict about to be stored; ``None`` for a generation task.

    Raises:
        StoreError: the task is malformed (see :class:`~softprompt.store.task_record.TaskRecord`).
    """
    record = TaskRecord.parse(task, where)
    return None if record is None else record.label_names


def prompt_labels(stored: StoredPrompt) -> list[str] | None:
    """Label names of a loaded prompt's task in recorded order; ``None`` for a generation task."""
    return None if stored.task_record is None else stored.task_record.label_names


def prompt_template(stored: StoredPrompt) -> str | None:
    """The template a loaded prompt was trained with, if recorded."""
    return None if stored.task_record is None else stored.task_record.template


def label_problem(labels: dict[str, list[str] | None]) -> str | None:
    """A message naming the members whose label sets differ, or ``None`` when all agree."""
    groups: dict[frozenset | None, list[str]] = {}
    for name, lab in labels.items():
        groups.setdefault(None if lab is None else frozenset(lab), []).append(name)
    if len(groups) <= 1:
        return None
    parts = [f"{', '.join(names)}: " + ("generation (no verbalizer)" if key is None else str(sorted(key)))
             for key, names in groups.items()]
    return "members have different label sets (" + "; ".join(parts) + ")"


def base_model_problem(fingerprints: dict[str, dict | None]) -> str | None:
    """A message naming the members trained on another base model, or ``None`` when all recorded fingerprints
    belong to one (members recording none are not compared).

    Two fingerprints match as a prompt's matches the model it loads on (:func:`~softprompt.model.fingerprint_mismatch`,
    both ways): ``name_or_path`` is ignored and one shared embedding hash is enough, so the same checkpoint loaded
    from another path, in another dtype, or fingerprinted before the fp16 hash existed is one base model. A bf16
    and an fp16 load of an fp32 checkpoint share no hash but each matches its fp32 load: members form one base
    model when every one is linked to the others by such matches, whatever their order.
    """
    recorded = {name: fp for name, fp in fingerprints.items() if fp}

    def mismatch(a: str, b: str) -> list[str]:
        return fingerprint_mismatch(recorded[a], recorded[b]) or fingerprint_mismatch(recorded[b], recorded[a])

    joined, left = list(recorded)[:1], list(recorded)[1:]
    grew = True
    while left and grew:
        linked = [name for name in left if any(not mismatch(name, j) for j in joined)]
        joined, left, grew = joined + linked, [name for name in left if name not in linked], bool(linked)
    if not left:
        return None
    diffs = [f"{name}: {'; '.join(mismatch(name, joined[0]))}" for name in left]
    return f"members were trained on different base models than {joined[0]!r} ({' | '.join(diffs)})"


def member_problem(store: Any, name: str, labels: list[str] | None, fp: dict | None) -> str | None:
    """Why replacing entry ``name`` of ``store`` (a :class:`~softprompt.store.PromptStore`) with a prompt of
    ``labels`` trained on the base model of fingerprint ``fp`` would break an ensemble it is a member of: the
    other members' labels or base model differ; ``None`` when it would not."""
    for ens in store.ensembles_with(name):
        others = {m: store.load(m) for m in store.ensemble(ens).members if m != name}
        problem = label_problem({**{m: prompt_labels(s) for m, s in others.items()}, name: labels})
        problem = problem or base_model_problem({**{m: s.fingerprint for m, s in others.items()}, name: fp})
        if problem:
            return f"replacing {name!r} would break ensemble {ens!r}: {problem}"
    return None


def is_safe_task_name(name: str) -> bool:
    """Whether ``name`` passes :func:`~softprompt.store.names.safe_task_name`."""
    try:
        safe_task_name(name)
    except StoreError:
        return False
    return True


def read_ensemble_file(path: Path) -> dict:
    """Read and validate an ``ensemble.json`` (shape only; whether the members exist is the store's job).

    Raises:
        StoreError: naming the file and every problem found.
    """
    data = read_json(path)
    if not isinstance(data, dict):
        raise StoreError(f"{path}: expected a JSON object, got {type(data).__name__}")
    members, problems = data.get("members"), []
    if data.get("kind") != "ensemble":
        problems.append(f"'kind' must be 'ensemble', got {data.get('kind')!r}")
    if not isinstance(members, list) or len(members) < 2 or not all(isinstance(m, str) for m in members):
        problems.append(f"'members' must be a list of at least 2 names, got {members!r}")
    elif len(set(members)) != len(members):
        problems.append(f"'members' has repeated names: {members!r}")
    else:
        bad = [m for m in members if not is_safe_task_name(m)]
        if bad:
            problems.append(f"'members' has invalid task names: {bad!r}")
    if data.get("combine") not in COMBINES:
        problems.append(f"'combine' must be one of {', '.join(COMBINES)}, got {data.get('combine')!r}")
    if problems:
        raise StoreError(f"{path}: " + "; ".join(problems))
    return data
