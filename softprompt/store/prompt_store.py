"""PromptStore: one folder holding many named task prompts and ensembles of them.

::

    STORE/
      store.json              {"format": "softprompt-store", "version": 1}  marks the folder as a store
      <task>/                 a stored prompt (save_prompt's folder) or a plain PEFT prompt folder
      <task>/ensemble.json    an ensemble entry instead: {"kind": "ensemble", "members": [...], "combine": ...}

Entry names are task names (:func:`softprompt.store.names.safe_task_name`), so no name can reach outside
the store; hidden folders (``.x``, used for temporary writes and removals) are never entries. Entries are
written atomically (complete or not at all, see :mod:`softprompt.store.atomic`).
"""

from __future__ import annotations

import builtins
import contextlib
import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from softprompt.methods import PromptMethod
from softprompt.model import fingerprint
from softprompt.store.atomic import fsync_path, write_bytes, write_folder_atomically, write_json
from softprompt.store.entries import (
    COMBINES,
    ENSEMBLE_FILE,
    EnsembleSpec,
    StoreEntry,
    base_model_problem,
    label_problem,
    member_problem,
    prompt_labels,
    prompt_template,
    read_ensemble_file,
    task_labels,
)
from softprompt.store.errors import StoreError
from softprompt.store.format import (
    CONFIG_NAME,
    FILE_LIMITS,
    META_NAME,
    WEIGHTS_NAME,
    StoredPrompt,
    load_prompt,
    replaceable_folder,
    save_prompt,
)
from softprompt.store.membership import membership_lock, recover, rename_entry
from softprompt.store.names import safe_task_name
from softprompt.store.peft_interop import export_peft
from softprompt.store.snapshot import READ_TRIES, read_folder, read_json
from softprompt.store.swap import remove_leftovers, settle

STORE_FILE = "store.json"
STORE_FORMAT = "softprompt-store"
STORE_VERSION = 1
MARKER_TMP = f".{STORE_FILE}.tmp-"  # the marker being written, before it is renamed to STORE_FILE
PROMPT_FILES = (CONFIG_NAME, WEIGHTS_NAME, META_NAME)  # the only files add/export copy

__all__ = ["COMBINES", "ENSEMBLE_FILE", "STORE_FILE", "EnsembleSpec", "PromptStore", "StoreEntry"]


def _copy_prompt_files(src: Path, dst: Path) -> None:
    """Copy the known prompt files of ``src`` into ``dst`` (nothing else: no pickles, no stray files).

    The files are read as one version of ``src`` (it may be overwritten meanwhile); symlinks are refused.
    """
    for name, data in read_folder(src, PROMPT_FILES, FILE_LIMITS).files.items():
        write_bytes(dst / name, data)


class PromptStore:
    """A folder of named task prompts (and ensembles of them).

    Args:
        root: the store folder.
        create: create the store if ``root`` is missing or an empty folder.

    Raises:
        StoreError: ``root`` is not a store (and ``create`` is false, or it is a non-empty folder).
    """

    def __init__(self, root: str | os.PathLike, create: bool = False) -> None:
        self.root = Path(root).expanduser().absolute()
        marker = self.root / STORE_FILE
        if not marker.is_file():
            if not create:
                raise StoreError(f"{self.root}: not a prompt store (no {STORE_FILE}); create it with "
                                 "PromptStore(root, create=True) (CLI: softprompt store add ...)")
            self._create(marker)
        self._check_marker(marker)
        remove_leftovers(self.root)  # what crashed writers left: put back or deleted
        recover(self.root)  # and the ensembles a crashed rename left listing the old name

    def _create(self, marker: Path) -> None:
        """Write the marker into a new or empty folder. Another process creating the same store meanwhile is no
        obstacle: its temporary marker is not content, and the marker it placed makes the folder a store."""
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"{self.root}: exists and is not a folder; cannot create a prompt store there")
        tmp = self.root / f"{MARKER_TMP}{uuid.uuid4().hex[:8]}"
        if self.root.is_dir() and any(not p.name.startswith(MARKER_TMP) for p in self.root.iterdir()):
            if marker.is_file():  # placed by another process since this one looked
                return
            raise StoreError(f"{self.root}: a non-empty folder without {STORE_FILE} is not a prompt store; "
                             "refusing to turn it into one (use a new or empty folder)")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            write_json(tmp, {"format": STORE_FORMAT, "version": STORE_VERSION})
            os.replace(tmp, marker)  # the same content as another creator's: whichever lands last is the same
            fsync_path(self.root)
        except OSError as e:  # a file on the way, no permission, a read-only disk
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise StoreError(f"{self.root}: cannot create a prompt store there ({e.strerror or e}: "
                             f"{e.filename or self.root})") from None

    @staticmethod
    def _check_marker(marker: Path) -> None:
        data = read_json(marker)
        if not isinstance(data, dict) or data.get("format") != STORE_FORMAT:
            raise StoreError(f"{marker}: not a softprompt store marker (expected "
                             f'{{"format": "{STORE_FORMAT}", "version": {STORE_VERSION}}})')
        version = data.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise StoreError(f"{marker}: 'version' must be a positive integer, got {version!r}")
        if version > STORE_VERSION:
            raise StoreError(f"{marker}: store version {version} was written by a newer softprompt (this one "
                             f"reads up to {STORE_VERSION}); upgrade softprompt")

    def __repr__(self) -> str:
        return f"PromptStore({str(self.root)!r})"

    # ----- reading -------------------------------------------------------------------------------------

    def _dir(self, name: str) -> Path:
        return self.root / safe_task_name(name)

    def names(self) -> list[str]:
        """Entry names, sorted (hidden/temporary folders, symlinks and unsafe names are not entries)."""
        out = []
        for p in self.root.iterdir():
            if p.is_dir() and not p.is_symlink() and not p.name.startswith("."):
                try:
                    out.append(safe_task_name(p.name))
                except StoreError:
                    continue
        return sorted(out)

    def __contains__(self, name: object) -> bool:
        try:
            folder = self._dir(name)  # type: ignore[arg-type]
        except StoreError:
            return False
        return folder.is_dir() and not folder.is_symlink()

    def path(self, name: str) -> Path:
        """The folder of entry ``name``.

        Raises:
            StoreError: invalid name or no such entry (the message lists the entries).
        """
        folder = self._dir(name)
        for _ in range(READ_TRIES):
            if name in self:
                return folder
            # missing only while an overwrite renames (or a crashed one left it aside)? then look again
            if not settle(folder) and not folder.exists():
                break
        raise StoreError(f"{self.root}: no entry {name!r} (entries: {', '.join(self.names()) or 'none'})")

    def kind(self, name: str) -> str:
        """``"ensemble"`` or ``"prompt"`` (by the presence of ``ensemble.json``; not validated)."""
        return "ensemble" if os.path.lexists(self.path(name) / ENSEMBLE_FILE) else "prompt"

    def _read_ensemble(self, name: str) -> dict:
        return read_ensemble_file(self.path(name) / ENSEMBLE_FILE)

    def ensemble(self, name: str) -> EnsembleSpec:
        """The ensemble entry ``name``.

        Raises:
            StoreError: no such entry, it is a prompt, or its ensemble.json is invalid.
        """
        if self.kind(name) != "ensemble":
            raise StoreError(f"{self.path(name)}: {name!r} is a prompt, not an ensemble; use load({name!r})")
        data = self._read_ensemble(name)
        return EnsembleSpec(name=name, members=list(data["members"]), combine=data["combine"])

    def ensembles_with(self, member: str) -> list[str]:
        """Names of the ensembles listing ``member`` (unreadable ensembles are skipped)."""
        out = []
        for name in self.names():
            if self.kind(name) == "ensemble":
                try:
                    if member in self._read_ensemble(name)["members"]:
                        out.append(name)
                except StoreError:
                    continue
        return out

    def load(self, name: str, model=None, check_fingerprint: bool = True) -> StoredPrompt:
        """Read and validate the prompt ``name`` (see :func:`softprompt.store.load_prompt`).

        Args:
            name: entry name.
            model: when given, the prompt must fit it (hidden size, fingerprint).
            check_fingerprint: compare the recorded base-model fingerprint with ``model``'s.

        Raises:
            StoreError: no such entry, it is an ensemble, or the prompt is invalid / does not fit ``model``.
        """
        if self.kind(name) == "ensemble":
            raise StoreError(f"{self.path(name)}: {name!r} is an ensemble, not a prompt; use "
                             f"ensemble({name!r}) and load its members")
        return load_prompt(self.path(name), model=model, check_fingerprint=check_fingerprint)

    def entry(self, name: str) -> StoreEntry:
        """The :class:`StoreEntry` of ``name``; a broken entry raises (``list`` reports it instead)."""
        folder = self.path(name)
        if self.kind(name) == "ensemble":
            data = self._read_ensemble(name)
            members = list(data["members"])
            missing = [m for m in members if m not in self]
            if missing:
                raise StoreError(f"{folder / ENSEMBLE_FILE}: member(s) {', '.join(missing)} missing from the store")
            first = self.load(members[0])
            return StoreEntry(name=name, kind="ensemble", template=prompt_template(first),
                              labels=prompt_labels(first), members=members, combine=data["combine"],
                              created=data.get("created"), path=folder)
        stored = self.load(name)
        metrics = stored.meta.get("metrics")
        return StoreEntry(name=name, kind="prompt", method=stored.method,
                          num_virtual_tokens=stored.peft_config.get("num_virtual_tokens"),
                          template=prompt_template(stored), labels=prompt_labels(stored),
                          metrics=metrics if isinstance(metrics, dict) else {},
                          created=stored.meta.get("created"), path=folder)

    def list(self) -> builtins.list[StoreEntry]:
        """Every entry, sorted by name; an unreadable one is listed with kind ``"broken"`` and its error."""
        out = []
        for name in self.names():
            try:
                out.append(self.entry(name))
            except (StoreError, OSError) as e:
                out.append(StoreEntry(name=name, kind="broken", path=self.root / name, error=str(e)))
        return out

    def show(self, name: str) -> dict[str, Any]:
        """Full metadata of ``name``: softprompt.json plus ``adapter_config``, or ensemble.json.

        Raises:
            StoreError: no such entry or it is broken.
        """
        head = {"name": name, "path": str(self.path(name)), "kind": self.kind(name)}
        # the files' own keys never stand for the entry's name, path or kind (head first, then again over them)
        if head["kind"] == "ensemble":
            return {**head, **self._read_ensemble(name), **head}
        stored = self.load(name)
        return {**head, **stored.meta, **head, "bos": stored.bos, "method": stored.method,
                "method_config": stored.method_config, "adapter_config": stored.peft_config}

    # ----- writing -------------------------------------------------------------------------------------

    def _is_entry(self, folder: Path) -> bool:
        return (folder / ENSEMBLE_FILE).is_file() or replaceable_folder(folder)

    def _check_replace(self, name: str, kind: str, overwrite: bool, labels: list[str] | None = None,
                       fp: dict | None = None) -> None:
        """Refuse to replace an entry of another kind, or a member with a prompt of other labels or trained on
        another base model (fingerprint ``fp``) than the ensemble's other members."""
        if name not in self:
            return
        if not overwrite:
            raise StoreError(f"{self.root}: entry {name!r} already exists; pass overwrite=True "
                             "(CLI --overwrite) to replace it")
        if self.kind(name) != kind:
            raise StoreError(f"{self.root}: entry {name!r} is of kind {self.kind(name)!r}, not {kind!r}; "
                             "remove it first to replace it")
        problem = member_problem(self, name, labels, fp)
        if problem:
            raise StoreError(f"{self.root}: {problem}")

    def add(self, name: str, source: str | os.PathLike, overwrite: bool = False) -> Path:
        """Copy a prompt folder (ours or PEFT's) into the store as ``name``, after validating it.

        Only adapter_config.json, adapter_model.safetensors and softprompt.json are copied.

        Returns:
            The entry folder.

        Raises:
            StoreError: invalid name or source, or ``name`` exists (without ``overwrite``).
        """
        target = self._dir(name)
        src = Path(source).expanduser().absolute()
        stored = load_prompt(src)
        if src == target:
            raise StoreError(f"{src}: is already entry {name!r} of the store")

        def write(tmp: Path) -> None:
            _copy_prompt_files(src, tmp)
            load_prompt(tmp)  # validate what was copied, not only what was there before

        with membership_lock(self.root):  # the ensembles checked are the ones there when it is replaced
            self._check_replace(name, "prompt", overwrite, prompt_labels(stored), stored.fingerprint)
            return write_folder_atomically(target, write, overwrite, self._is_entry)

    def save(self, name: str, method: PromptMethod, model, task: dict | None = None,
             train_config: dict | None = None, metrics: dict | None = None, overwrite: bool = False,
             bos: bool = True) -> Path:
        """Save a trained method straight into the store and return its folder (:func:`save_prompt`; ``bos``
        false for a chat or ``--objective lm`` prompt, which otherwise was served with a BOS it never saw)."""
        target = self._dir(name)
        with membership_lock(self.root):
            self._check_replace(name, "prompt", overwrite, task_labels(task, target / META_NAME), fingerprint(model))
            return save_prompt(target, method, model, task=task, train_config=train_config, metrics=metrics,
                               overwrite=overwrite, bos=bos)

    def add_ensemble(self, name: str, members: builtins.list[str], combine: str = "mean",
                     overwrite: bool = False) -> Path:
        """Add an ensemble entry of existing prompts.

        Args:
            name: entry name.
            members: at least two distinct classification prompt entries (not ensembles) with equal label
                sets; prompts recording a base model must record the same one.
            combine: ``"mean"`` (average label scores) or ``"vote"`` (majority of predictions).
            overwrite: replace an existing ensemble ``name``.

        Raises:
            StoreError: listing every problem found.
        """
        with membership_lock(self.root):  # a member removed or renamed meanwhile was listed, missing, for good
            return self._add_ensemble(name, list(members), combine, overwrite)

    def _add_ensemble(self, name: str, members: builtins.list[str], combine: str, overwrite: bool) -> Path:
        target = self._dir(name)
        problems = []
        if combine not in COMBINES:
            problems.append(f"combine must be one of {', '.join(COMBINES)}, got {combine!r}")
        if len(members) < 2:
            problems.append(f"an ensemble needs at least 2 members, got {len(members)}")
        dups = sorted({m for m in members if members.count(m) > 1})
        if dups:
            problems.append(f"members repeated: {', '.join(map(str, dups))}")
        if name in members:
            problems.append(f"the ensemble {name!r} cannot be its own member")
        labels, fingerprints = {}, {}
        for m in dict.fromkeys(members):
            try:
                if self.kind(m) == "ensemble":
                    problems.append(f"member {m!r} is an ensemble; members must be prompts")
                    continue
                stored = self.load(m)
            except StoreError as e:
                problems.append(f"member {m!r}: {e}")
                continue
            labels[m] = prompt_labels(stored)
            if not labels[m]:  # what the engine refuses to load: an entry no command could use
                problems.append(f"member {m!r} has no labels (a generation, chat or --objective lm prompt): an "
                                f"ensemble combines the label scores of classification prompts")
            fingerprints[m] = stored.fingerprint
        problems += [p for p in (label_problem(labels) if len(labels) >= 2 else None,
                                 base_model_problem(fingerprints)) if p]
        if problems:
            raise StoreError(f"{target}: cannot add ensemble: " + "; ".join(problems))
        self._check_replace(name, "ensemble", overwrite)
        data = {"kind": "ensemble", "members": members, "combine": combine,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        return write_folder_atomically(target, lambda tmp: write_json(tmp / ENSEMBLE_FILE, data), overwrite,
                                       self._is_entry)

    def remove(self, name: str) -> None:
        """Delete entry ``name`` (renamed to a hidden folder first, so it disappears at once).

        Raises:
            StoreError: no such entry, or it is a member of an ensemble (named in the message).
        """
        with membership_lock(self.root):  # no ensemble listing it is being added meanwhile
            folder = self.path(name)
            users = self.ensembles_with(name)
            if users:
                raise StoreError(f"{self.root}: {name!r} is a member of ensemble(s) {', '.join(users)}; "
                                 "remove or change those first")
            trash = self.root / f".{name}.removed-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(folder, trash)
            except OSError as e:  # a read-only store, no permission: nothing changed
                raise StoreError(f"{self.root}: cannot remove {name!r} ({e.strerror or e})") from None
        fsync_path(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    def rename(self, old: str, new: str) -> Path:
        """Rename entry ``old`` to ``new`` and update every ensemble listing ``old`` (journalled: a crash is
        completed when the store next opens; an error puts everything back, see
        :mod:`softprompt.store.membership`).

        Returns:
            The new entry folder.

        Raises:
            StoreError: invalid names, no entry ``old``, or ``new`` exists.
        """
        with membership_lock(self.root):
            src, dst = self.path(old), self._dir(new)
            if dst.exists() or dst.is_symlink():
                raise StoreError(f"{self.root}: cannot rename {old!r} to {new!r}: {new!r} already exists")
            rename_entry(self.root, src.name, dst.name)
        return dst

    def export(self, name: str, dest: str | os.PathLike, peft: bool = False, overwrite: bool = False) -> Path:
        """Copy prompt ``name`` out of the store, atomically.

        Args:
            name: a prompt entry.
            dest: folder to create.
            peft: write a plain PEFT folder (no softprompt.json) instead of our full folder.
            overwrite: replace an existing stored prompt at ``dest``.

        Returns:
            The absolute ``dest``.

        Raises:
            StoreError: no such prompt (ensembles cannot be exported), it is invalid, ``dest`` exists, or
                ``dest`` lies inside the store (it would become an entry, or a stray folder in one, behind the
                store's back: ``--overwrite`` replaced another entry without the ensemble checks).
        """
        stored = self.load(name)
        target = Path(dest).expanduser().resolve()
        if target == self.root.resolve() or self.root.resolve() in target.parents:
            raise StoreError(f"{dest}: is inside the store {self.root}; export copies a prompt out of the store "
                             f"(to copy entry {name!r} under another name: softprompt store add --store "
                             f"{self.root} NEW_NAME {stored.path})")
        if peft:
            return export_peft(stored.path, dest, overwrite=overwrite)
        src = stored.path

        def write(tmp: Path) -> None:
            _copy_prompt_files(src, tmp)
            load_prompt(tmp)

        return write_folder_atomically(dest, write, overwrite, replaceable_folder)
