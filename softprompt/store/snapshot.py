"""Reading stored files safely: regular files only (never symlinks), a folder as one consistent snapshot.

A prompt folder is several files read one after the other while another process may replace the folder
(:mod:`softprompt.store.atomic`). :func:`read_folder` opens the folder once and reads its files through
that handle, then checks the path still names the same folder: an overwrite deletes a folder only after
swapping it out, so an unchanged folder means every file came from one complete version. Otherwise it
reads again. Files are opened with ``O_NOFOLLOW``: a symlink inside a prompt folder (to
``/etc/shadow`` or another user's file) is refused. Every failure is a :class:`StoreError` naming the path.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from softprompt.data.formats import json_value_problem
from softprompt.store.errors import StoreError
from softprompt.store.swap import settle

MAX_JSON_BYTES = 1 << 20  # a config/metadata file is a few KiB; refuse to parse anything huge
# a prompt's tensors: a 100-token prefix for a 70B model is 65 MiB; a sparse 100 GB file was read into memory
MAX_WEIGHTS_BYTES = 4 << 30
READ_TRIES = 100  # a folder replaced this many times during one read is reported instead of read again
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# opening a named pipe blocks until a writer comes (a FIFO named adapter_config.json hung list, load and serve);
# non-blocking it opens at once and is refused as not a regular file; regular files ignore the flag
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_DIR_FD = os.open in os.supports_dir_fd

__all__ = ["MAX_JSON_BYTES", "FolderSnapshot", "parse_json", "read_file", "read_folder", "read_json"]


@dataclass(frozen=True)
class FolderSnapshot:
    """The files of one version of a folder.

    Attributes:
        path: the folder.
        names: every name in the folder.
        files: the content of each wanted file that exists.
    """

    path: Path
    names: frozenset[str]
    files: dict[str, bytes]


class _Changed(Exception):
    """The folder was replaced while being read."""


def _refusal(path: Path, err: OSError) -> StoreError:
    if err.errno == errno.ELOOP or path.is_symlink():
        return StoreError(f"{path}: is a symbolic link; stored files must be regular files in the prompt folder "
                          "(refused: a link could point at any file on this machine)")
    return StoreError(f"{path}: cannot be read ({err.strerror or err})")


def _read_fd(fd: int, path: Path, limit: int | None) -> bytes:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise StoreError(f"{path}: not a regular file")
    if limit is not None and st.st_size > limit:
        raise StoreError(f"{path}: {st.st_size} bytes, larger than the {limit} allowed")
    chunks = []
    while chunk := os.read(fd, 1 << 22):
        chunks.append(chunk)
    return b"".join(chunks)


def read_file(path: Path, limit: int | None = None) -> bytes:
    """The bytes of one stored file.

    Raises:
        StoreError: missing, a symlink, not a regular file, larger than ``limit``, or unreadable.
    """
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK)
    except FileNotFoundError:
        raise StoreError(f"{path}: missing") from None
    except OSError as e:
        raise _refusal(path, e) from None
    try:
        return _read_fd(fd, path, limit)
    except OSError as e:
        raise _refusal(path, e) from None
    finally:
        os.close(fd)


def parse_json(data: bytes, path: Path) -> Any:
    """The JSON value in the bytes ``data`` read from ``path``.

    Raises:
        StoreError: naming ``path``, when ``data`` is not UTF-8 or not valid JSON.
    """
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{path}: not valid JSON ({e})") from e
    except (ValueError, RecursionError) as e:  # a 5000-digit integer, "[" * 100000
        raise StoreError(f"{path}: unreadable JSON ({json_value_problem(e)})") from None


def read_json(path: Path) -> Any:
    """The JSON value of one stored file (a regular file, not a symlink, at most :data:`MAX_JSON_BYTES`).

    Raises:
        StoreError: see :func:`read_file` and :func:`parse_json`.
    """
    return parse_json(read_file(path, MAX_JSON_BYTES), path)


def _read_once(folder: Path, wanted: tuple[str, ...], limits: dict[str, int]) -> FolderSnapshot:
    try:
        dfd = os.open(folder, os.O_RDONLY | _DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        if settle(folder) or folder.is_dir():  # an overwrite was under way, or a crashed one was undone
            raise _Changed from None
        if folder.exists():  # a file (no writer puts one there): it was retried until "replaced 100 times"
            raise StoreError(f"{folder}: not a folder; a prompt is the folder that holds adapter_config.json and "
                             f"adapter_model.safetensors{' (give its folder)' if folder.name in wanted else ''}"
                             ) from None
        raise StoreError(f"{folder}: no such prompt folder") from None
    except OSError as e:
        raise StoreError(f"{folder}: cannot be read ({e.strerror or e})") from None
    try:
        before = os.fstat(dfd)
        names = frozenset(os.listdir(dfd if _DIR_FD else folder))
        files = {}
        for name in wanted:
            if name not in names:
                continue
            try:
                fd = (os.open(name, os.O_RDONLY | _NOFOLLOW | _NONBLOCK, dir_fd=dfd) if _DIR_FD
                      else os.open(folder / name, os.O_RDONLY | _NOFOLLOW | _NONBLOCK))
            except FileNotFoundError:  # deleted after listing: the folder was replaced
                raise _Changed from None
            except OSError as e:
                raise _refusal(folder / name, e) from None
            try:
                files[name] = _read_fd(fd, folder / name, limits.get(name))
            finally:
                os.close(fd)
        try:
            after = os.stat(folder)
        except OSError:
            raise _Changed from None
        if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
            raise _Changed
        return FolderSnapshot(folder, names, files)
    except OSError as e:
        raise StoreError(f"{folder}: cannot be read ({e.strerror or e})") from None
    finally:
        os.close(dfd)


def read_folder(folder: Path, wanted: tuple[str, ...], limits: dict[str, int] | None = None) -> FolderSnapshot:
    """Read the ``wanted`` files of ``folder`` (those that exist) from one version of it.

    Args:
        folder: the folder (a symlinked folder given by the caller is followed; files inside it are not).
        wanted: file names to read.
        limits: largest size in bytes allowed per file name.

    Raises:
        StoreError: the folder is missing, a wanted file is a symlink or not a regular file or too large,
            or the folder kept being replaced during :data:`READ_TRIES` reads.
    """
    for attempt in range(READ_TRIES):
        try:
            return _read_once(folder, wanted, limits or {})
        except _Changed:
            time.sleep(min(0.0005 * (attempt + 1), 0.02))
    raise StoreError(f"{folder}: replaced {READ_TRIES} times while being read; try again")
