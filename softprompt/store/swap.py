"""Replacing a folder in one step, and undoing what a crashed replacement left behind.

:func:`exchange` swaps two folders atomically (Linux ``renameat2(RENAME_EXCHANGE)``), so a replaced
prompt folder is never missing. Where that is unavailable (other systems, or a filesystem without it)
:mod:`softprompt.store.atomic` renames the old folder aside to ``.<name>.old-*`` and the new one in; the
writer holds a lock (``flock``) on the old folder while it is aside and on its own temporary folder while
it writes, so that

- a reader finding a folder missing waits while a live writer holds its aside folder, and puts an unlocked
  one back (its writer died between the two renames): :func:`settle`;
- hidden ``.<name>.tmp-*`` / ``.old-*`` / ``.removed-*`` folders no writer holds any more are deleted
  when a store opens: :func:`remove_leftovers`.

Without ``fcntl`` (Windows) nothing is locked; a leftover then counts as abandoned once it is
:data:`STALE_SECONDS` old.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

STALE_SECONDS = 60.0  # a leftover younger than this may belong to a writer that has not locked it yet
SETTLE_TIMEOUT = 5.0
LISTING_RETRIES = 3  # longest wait for a live writer between its two renames (normally microseconds)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV}
# the suffix: 8 characters, as tempfile.mkdtemp and uuid hex give them (anything else is not ours: a folder
# ".x.old-1.tmp-k3j9abcd" is the temporary folder of entry "x.old-1", not an old copy of "x")
_SUFFIX = r"[a-z0-9_]{8}"
_LEFTOVER = re.compile(rf"\.(?P<name>.+)\.(?P<kind>tmp|old|removed)-{_SUFFIX}")

__all__ = ["exchange", "exchange_supported", "lock_folder", "remove_leftovers", "settle", "unlock"]


def _load_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):  # not glibc >= 2.28 / musl >= 1.2.3, or not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def exchange_supported() -> bool:
    """Whether this platform has an atomic exchange (a filesystem may still refuse it)."""
    return _renameat2 is not None


def exchange(a: Path, b: Path) -> bool:
    """Swap the existing paths ``a`` and ``b`` in one atomic step.

    Returns:
        False when the platform or filesystem cannot (nothing changed then).

    Raises:
        OSError: the exchange was possible but failed (e.g. permissions).
    """
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def lock_folder(folder: Path, wait: bool = True) -> int | None:
    """Hold an exclusive lock on ``folder`` (it moves with the folder) until :func:`unlock`; without ``wait``,
    raise :class:`BlockingIOError` at once when another holds it."""
    if fcntl is None:
        return None
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def unlock(fd: int | None) -> None:
    """Release a lock of :func:`lock_folder` (closing the descriptor releases it, even in a crash)."""
    if fd is not None:
        os.close(fd)


def _abandoned(folder: Path, min_age: float) -> int | None | bool:
    """A lock on ``folder`` if no writer holds it (and it is ``min_age`` old); False otherwise."""
    try:
        if time.time() - folder.lstat().st_mtime < min_age:
            return False
        if fcntl is None:
            return None
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    return fd


def _asides(target: Path) -> list[Path]:
    try:
        return sorted(p for p in target.parent.iterdir()
                      if re.fullmatch(rf"\.{re.escape(target.name)}\.old-{_SUFFIX}", p.name) and p.is_dir()
                      and not p.is_symlink())
    except OSError:
        return []


def settle(target: Path, timeout: float = SETTLE_TIMEOUT) -> bool:
    """Make sure a missing ``target`` is not missing only because of an unfinished two-rename overwrite.

    Waits while a live writer holds the old folder aside; puts an abandoned one back (its writer crashed
    between the renames).

    Returns:
        True when ``target`` was missing and an overwrite was involved (read it again), else False.
    """
    deadline = time.monotonic() + (STALE_SECONDS if fcntl is None else timeout)
    involved, misses = False, 0
    while not (target.exists() or target.is_symlink()):
        asides = _asides(target)
        if not asides:
            # a folder listing made during a rename may miss the renamed entry: look a few more times
            misses += 1
            if misses > LISTING_RETRIES:
                return involved
            time.sleep(0.001)
            continue
        involved = True
        for aside in asides:
            lock = _abandoned(aside, STALE_SECONDS if fcntl is None else 0.0)
            if lock is not False:
                try:
                    os.rename(aside, target)
                except OSError:  # another reader or writer was faster (look again), or it cannot be done
                    pass
                finally:
                    unlock(lock if isinstance(lock, int) else None)
                break
        if not (target.exists() or target.is_symlink()):
            # a rename that keeps failing (a read-only store) spun here at full speed, past any deadline
            if time.monotonic() > deadline:
                return involved
            time.sleep(0.001)
    return involved


def remove_leftovers(folder: Path, min_age: float = STALE_SECONDS) -> None:
    """Put back abandoned old folders whose target is missing, delete other abandoned hidden leftovers."""
    try:
        items = [p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:
        return
    for item in items:
        m = _LEFTOVER.fullmatch(item.name)
        if m is None:
            continue
        target = folder / m["name"]
        if m["kind"] == "old" and not (target.exists() or target.is_symlink()):
            settle(target)
            continue
        lock = _abandoned(item, min_age)
        if lock is not False:
            try:
                shutil.rmtree(item, ignore_errors=True)
            finally:
                unlock(lock if isinstance(lock, int) else None)
