"""What keeps a store's ensembles pointing at its prompts when several processes change it.

- **One writer of membership at a time.** Adding, saving, removing or renaming an entry and adding an ensemble
  each check the ensembles and then change the store; two processes interleaving those steps (``store
  remove a`` while ``store ensemble add e a b`` validates ``a``) left an ensemble listing a missing member.
  :func:`membership_lock` holds an exclusive ``flock`` on the store folder for the whole operation (readers
  take no lock: every write they may see is atomic).
- **A rename survives a crash.** Renaming entry ``old`` renames its folder, then rewrites every ensemble
  listing it. A process killed in between left those ensembles listing ``old``, a missing member, for good.
  :func:`rename_entry` first writes a journal (``.rename.json``: the two names); :func:`finish_rename`, run
  before every membership change and when a store opens while no writer holds the lock (:func:`recover`),
  completes the rewrite a crashed rename left (or drops the journal when the folder was never renamed).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from softprompt.store.atomic import fsync_path, write_json
from softprompt.store.entries import ENSEMBLE_FILE, read_ensemble_file
from softprompt.store.errors import StoreError
from softprompt.store.snapshot import read_json
from softprompt.store.swap import lock_folder, unlock

JOURNAL = ".rename.json"

__all__ = ["JOURNAL", "finish_rename", "membership_lock", "recover", "rename_entry", "replace_json"]


@contextlib.contextmanager
def membership_lock(root: Path) -> Iterator[None]:
    """Hold the store's membership lock (an exclusive ``flock`` on ``root``) and finish a crashed rename first.
    Not reentrant: an operation that holds it must not call another that takes it."""
    try:
        fd = lock_folder(root)
    except OSError as e:
        raise StoreError(f"{root}: cannot lock the store ({e.strerror or e})") from None
    try:
        finish_rename(root)
        yield
    finally:
        unlock(fd)


def recover(root: Path) -> None:
    """Finish a crashed rename when a store opens, unless a writer holds the lock (it finishes it first)."""
    if not (root / JOURNAL).is_file():
        return
    try:
        fd = lock_folder(root, wait=False)
    except OSError:  # BlockingIOError: a live writer; or the folder cannot be opened
        return
    try:
        finish_rename(root)
    finally:
        unlock(fd)


def replace_json(path: Path, data: dict) -> None:
    """Replace the JSON file ``path`` atomically (a reader sees the old or the new file, never a part)."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write_json(tmp, data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _ensembles_listing(root: Path, member: str) -> list[Path]:
    """The ensemble files of ``root`` that list ``member`` (unreadable ones are skipped)."""
    out = []
    for folder in sorted(root.iterdir()):
        path = folder / ENSEMBLE_FILE
        if folder.name.startswith(".") or folder.is_symlink() or not path.is_file():
            continue
        try:
            if member in read_ensemble_file(path)["members"]:
                out.append(path)
        except StoreError:
            continue
    return out


def _relist(path: Path, old: str, new: str) -> dict:
    """Rewrite the ensemble file ``path`` with member ``old`` renamed ``new``; returns what it held before."""
    data = read_ensemble_file(path)
    replace_json(path, {**data, "members": [new if m == old else m for m in data["members"]]})
    return data


def finish_rename(root: Path) -> None:
    """Complete the rename a crashed process left in ``root``'s journal, if any (see the module).

    A store that cannot be written (read-only) keeps its journal: reading it is still consistent with the
    journal's folder state, and the next writer finishes it."""
    journal = root / JOURNAL
    if not journal.is_file():
        return
    try:
        names = read_json(journal)
        old, new = names["old"], names["new"]
        if not (isinstance(old, str) and isinstance(new, str)):
            raise TypeError("names must be strings")
    except (StoreError, KeyError, TypeError):  # a journal torn by the crash itself: its rename never began
        old = new = None
    try:
        if old is not None and (root / new).is_dir() and not (root / old).exists():  # the folder moved
            for path in _ensembles_listing(root, old):
                _relist(path, old, new)
        journal.unlink()
        fsync_path(root)
    except OSError:
        return


def rename_entry(root: Path, old: str, new: str) -> None:
    """Rename entry folder ``old`` to ``new`` and every ensemble's member ``old`` to ``new``, journalled so that a
    crash at any point is completed by :func:`finish_rename`; an error puts everything back. The caller holds
    :func:`membership_lock` and has checked the names.

    Raises:
        StoreError: the OS refused the rename (nothing changed).
        OSError: rewriting an ensemble failed (everything was put back).
    """
    src, dst = root / old, root / new
    users = _ensembles_listing(root, old)
    journal = root / JOURNAL
    try:
        replace_json(journal, {"old": old, "new": new})
        fsync_path(root)
        os.rename(src, dst)
    except OSError as e:  # a read-only store, no permission, a name taken meanwhile: nothing changed
        journal.unlink(missing_ok=True)
        raise StoreError(f"{root}: cannot rename {old!r} to {new!r} ({e.strerror or e})") from None
    done: list[tuple[Path, dict]] = []
    try:
        for path in users:
            done.append((path, _relist(path, old, new)))
    except BaseException:
        for path, data in reversed(done):
            replace_json(path, data)
        os.rename(dst, src)
        journal.unlink(missing_ok=True)
        raise
    journal.unlink()
    fsync_path(root)
