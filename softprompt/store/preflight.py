"""Checks a run makes before any work of the store it will write its prompt into once it ends (``train``,
``distill``): a problem found only after hours of training would lose nothing (the prompt is in the run's
folder) but wastes the run's purpose."""

from __future__ import annotations

import os
from pathlib import Path

from softprompt.store.entries import member_problem
from softprompt.store.errors import StoreError
from softprompt.store.format import replaceable_folder
from softprompt.store.prompt_store import STORE_FILE, PromptStore


def prompt_entry_problem(root: str | os.PathLike, name: str, labelled: bool = True) -> str | None:
    """Why a run could not store its prompt as entry ``name`` of store ``root`` (replacing a prompt of that
    name): ``root`` is a folder with files that is not a store (or has a damaged marker), or ``name`` is an
    ensemble, a file, or a folder that is not a stored prompt. ``None`` when fine: a missing or empty folder
    becomes a store. (Whether a replaced member keeps its ensembles' labels needs the task's data: checked
    when the prompt is stored.)

    ``labelled`` false: the run's prompt has no labels whatever its data (``distill``'s), so an entry that is a
    member of an ensemble (which combines classification prompts) is refused too, before any work."""
    folder = Path(root).expanduser()
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    if not (folder / STORE_FILE).exists():
        return (f"--store {root}: a non-empty folder without {STORE_FILE} is not a prompt store; use a new or "
                "empty folder, or an existing store")
    try:
        store = PromptStore(folder)
        entry = store.root / name
    except StoreError as e:
        return f"--store: {e}"
    where = f"--store {root} --task {name}"
    if not (entry.exists() or entry.is_symlink()):
        return None
    if entry.is_symlink() or not entry.is_dir():
        return f"{where}: {entry} exists and is not a folder; the run could not store its prompt there"
    if store.kind(name) == "ensemble":
        return (f"{where}: entry {name!r} is an ensemble, the run would store a prompt there; remove it "
                "(softprompt store remove) or choose another --task")
    if not replaceable_folder(entry):
        return f"{where}: {entry} is a folder that is not a stored prompt; the run would not replace it"
    users = [] if labelled else store.ensembles_with(name)
    if users:
        return (f"{where}: entry {name!r} is a member of ensemble(s) {', '.join(map(repr, users))}, which combine "
                "classification prompts, and this run's prompt has no labels; choose another --task, or remove "
                "those ensembles first (softprompt store remove)")
    return None


def stored_member_problem(root: str | os.PathLike, name: str, labels: list[str] | None, model) -> str | None:
    """Why a run's prompt (of ``labels``, trained on ``model``) could not replace entry ``name`` of store ``root``
    once trained: the entry is a member of an ensemble whose other members have other labels or another base
    model. Checked once the task and the model are loaded, before training (storing checks it again)."""
    from softprompt.model import fingerprint

    folder = Path(root).expanduser()
    if not (folder / STORE_FILE).exists():
        return None
    try:
        store = PromptStore(folder)
        if name not in store or store.kind(name) != "prompt" or not store.ensembles_with(name):
            return None  # no ensemble to break: the model's fingerprint (a hash of its embeddings) is not needed
        problem = member_problem(store, name, labels, fingerprint(model))
    except StoreError as e:
        return f"--store {root}: {e}"
    return None if problem is None else (f"--store {root} --task {name}: {problem}; choose another --task, or "
                                         "remove the ensemble first (softprompt store remove)")

