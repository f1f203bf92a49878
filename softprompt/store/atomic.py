"""Atomic folder writes: a stored prompt appears complete or not at all, and never goes missing.

Files are written into a hidden temporary folder next to the target (same filesystem), flushed to disk,
then moved into place. Replacing an existing folder swaps the two in one step where the platform can
(Linux ``renameat2(RENAME_EXCHANGE)``, see :mod:`softprompt.store.swap`): a reader always finds either
the old or the new complete folder, and a crash at any point leaves one of them in place. Elsewhere the
old folder is renamed aside, the new one renamed in; a reader that finds the folder missing waits for the
swap to finish, and a crash between the two renames is undone by the next reader or store open
(:func:`~softprompt.store.swap.settle`). Leftover temporary folders are hidden, never entries, and are
removed once no writer holds them (:func:`~softprompt.store.swap.remove_leftovers`).
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from softprompt.store import swap
from softprompt.store.errors import StoreError
from softprompt.store.swap import exchange, exchange_supported

__all__ = ["exchange", "exchange_supported", "fsync_path", "write_bytes", "write_folder_atomically", "write_json",
           "write_safetensors"]


def fsync_path(path: Path) -> None:
    """Flush a file (or, where the OS allows it, a folder entry) to disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # folders cannot be opened on some platforms (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _jsonable(obj: Any) -> Any:
    """Strict-JSON form: non-finite floats -> null, tuples -> lists, scalars/paths via ``_default``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def _default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return _jsonable(obj.item())
    if hasattr(obj, "item"):  # numpy scalars
        return _jsonable(obj.item())
    return str(obj)  # Path, enum, ...


def write_json(path: Path, data: dict) -> None:
    """Write strict JSON (no NaN/Infinity) and fsync it."""
    text = json.dumps(_jsonable(data), indent=2, sort_keys=True, allow_nan=False, default=_default)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file and fsync it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _umask() -> int:
    """The process's umask, read without changing it where the OS tells it (Linux: ``/proc/self/status``;
    elsewhere set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors with PEFT's metadata (``{"format": "pt"}``) and fsync the file.

    The file gets the mode of any file the process creates (``0o666`` less the umask), as the JSON files
    beside it: safetensors writes it owner-only (``0o600``) whatever the umask, and another user or a
    container serving the folder (vLLM) could read the config but not the weights.
    """
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    # called through the module so tests can monkeypatch safetensors.torch.save_file
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~_umask())
    fsync_path(path)


def _swap_by_renames(tmp: Path, target: Path) -> None:
    """Replace ``target`` by ``tmp`` with two renames (where no atomic exchange exists)."""
    aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    # the old folder is locked before it moves aside: a reader finding the target missing waits for this
    # writer instead of putting the old folder back under it (settle())
    lock = swap.lock_folder(target)
    try:
        try:
            os.replace(target, aside)  # the old folder takes the place of the empty placeholder
        except BaseException:
            os.rmdir(aside)
            raise
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(aside, target)  # put the old folder back
            raise
        fsync_path(target.parent)
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        swap.unlock(lock)


def _place_new(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``, which must not exist: a folder with files another writer placed there
    since the check (two ``store add`` of one name without --overwrite) makes the rename fail, and that is
    "already exists", never a replacement of the other writer's folder. (An *empty* folder made there
    meanwhile is replaced, as POSIX rename does; no writer here places one.)"""
    try:
        os.rename(tmp, target)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise StoreError(f"{target} already exists (written meanwhile by another process); pass "
                             "overwrite=True (CLI --overwrite) to replace it") from None
        raise


def write_folder_atomically(target: str | os.PathLike, write: Callable[[Path], None], overwrite: bool,
                            replaceable: Callable[[Path], bool]) -> Path:
    """Create folder ``target`` with the files ``write(tmp_dir)`` puts into ``tmp_dir``, atomically.

    Args:
        target: folder to create.
        write: fills the temporary folder it is given.
        overwrite: replace an existing ``target``; otherwise an existing ``target`` is an error.
        replaceable: whether an existing folder may be replaced (guards against deleting a folder
            that is not a stored prompt, e.g. a mistyped home directory).

    Returns:
        The absolute target path.

    Raises:
        StoreError: the target exists and may not be replaced, or it cannot be written there (the error named).
    """
    target = Path(target).expanduser().absolute()
    swap.settle(target)  # a crashed overwrite's old folder is put back before deciding anything
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise StoreError(f"{target} already exists; pass overwrite=True (CLI --overwrite) to replace it")
        if target.is_symlink() or not target.is_dir():
            raise StoreError(f"{target} exists and is not a folder; refusing to replace it")
        if not replaceable(target):
            raise StoreError(f"{target} exists and does not look like a stored prompt (no "
                             "adapter_config.json or softprompt.json); refusing to delete it")
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}.tmp-"))
    except OSError as e:  # a file on the way, no permission, a read-only disk
        raise StoreError(f"{target}: cannot create it there ({e.strerror or e}: {e.filename or parent})") from None
    lock = swap.lock_folder(tmp)  # marks the temporary folder as in use (remove_leftovers() skips it)
    try:
        write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; a stored prompt is an ordinary folder
        fsync_path(tmp)
        if not overwrite:
            _place_new(tmp, target)
        elif not target.exists():
            os.replace(tmp, target)
        elif not exchange(tmp, target):  # after an exchange tmp holds the old folder
            _swap_by_renames(tmp, target)
        fsync_path(parent)
    except OSError as e:  # e.g. the disk filled up (the temporary folder is removed below)
        raise StoreError(f"{target}: writing it failed ({e.strerror or e})") from e
    finally:
        swap.unlock(lock)
        shutil.rmtree(tmp, ignore_errors=True)  # the new folder if it was not placed, or the old one
    return target
