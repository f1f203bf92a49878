"""Atomic folder writes: a stored prompt appears complete or not at all.

Files are written into a hidden temporary folder next to the target (same filesystem, so the final
rename is atomic), flushed to disk, then renamed into place. Replacing an existing folder renames the old
one aside first and deletes it only once the new one is in place; any failure restores the old folder and
removes every temporary folder.
"""

from __future__ import annotations

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

from softprompt.store.errors import StoreError


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


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors with PEFT's metadata (``{"format": "pt"}``) and fsync the file."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    # called through the module so tests can monkeypatch safetensors.torch.save_file
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    fsync_path(path)


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
        StoreError: the target exists and may not be replaced.
    """
    target = Path(target).expanduser().absolute()
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise StoreError(f"{target} already exists; pass overwrite=True (CLI --overwrite) to replace it")
        if target.is_symlink() or not target.is_dir():
            raise StoreError(f"{target} exists and is not a folder; refusing to replace it")
        if not replaceable(target):
            raise StoreError(f"{target} exists and does not look like a stored prompt (no "
                             "adapter_config.json or softprompt.json); refusing to delete it")
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}.tmp-"))
    aside: Path | None = None  # where the old folder waits while the new one moves in
    old_moved = placed = False
    try:
        write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; a stored prompt is an ordinary folder
        fsync_path(tmp)
        if target.exists():
            aside = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}.old-"))
            os.replace(target, aside)  # the old folder takes the place of the empty placeholder
            old_moved = True
        os.replace(tmp, target)
        placed = True
        fsync_path(parent)
    finally:
        if not placed:
            shutil.rmtree(tmp, ignore_errors=True)
            if old_moved:
                os.replace(aside, target)  # put the old folder back
            elif aside is not None:
                os.rmdir(aside)  # the unused empty placeholder
        elif aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    return target
