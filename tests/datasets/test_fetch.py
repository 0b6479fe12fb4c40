"""fetch + safe extraction against a real HTTP server on 127.0.0.1 (tests/httpserver.py).

Most tests use TINY, a small stand-in layout (subject and modality from ``<subject>_<modality>.nii.gz``)
so that they exercise the transport and placement, not a real layout's parsing; the real ``ixi``,
``nifti-folder`` and ``phantom`` layouts have their own end-to-end tests at the bottom.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib
import io
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import yaml

import mrivq.datasets.layouts
from mrivq.datasets.archive import safe_extract
from mrivq.datasets.catalog import Card, get_card, load_card
from mrivq.datasets.fetch.job import fetch
from mrivq.datasets.fetch.state import FetchResult
from mrivq.utils.errors import ChecksumError, MrivqError, UnsafeArchiveError
from tests.httpserver import FileServer

REPO = Path(__file__).resolve().parents[2]
FAST = {"backoff": 0.001, "timeout": 5}


# ----------------------------------------------------------------------------- test data
def nifti_bytes(shape=(4, 4, 4), seed: int = 0, noise: bool = False) -> bytes:
    """A real .nii.gz; ``noise=True`` makes it incompressible (to have bytes to cut mid-transfer)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 30000, size=shape, dtype=np.int16) if noise else np.full(shape, seed, np.int16)
    img = nib.Nifti1Image(arr, np.diag([2.0, 2.0, 2.0, 1.0]))
    return gzip.compress(img.to_bytes(), mtime=0)


def tar_bytes(members: dict[str, bytes], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_card(tmp_path: Path, files: list[dict], *, name: str = "demo", layout: str = "nifti-folder",
              access: str = "open", modalities=("t1", "t2"), **extra) -> Card:
    data = {"name": name, "title": name, "access": access, "layout": layout,
            "modalities": list(modalities), "files": files, **extra}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_card(p)


def entry(srv: FileServer, name: str, data: bytes, *, modality: str | None = None, checksum: str = "md5",
          size: bool = True, **extra) -> dict:
    """Serve ``data`` as ``name`` and return its card entry."""
    url = srv.add(name, data)
    e: dict = {"url": url}
    if size:
        e["size"] = len(data)
    if checksum == "md5":
        e["md5"] = md5(data)
    elif checksum == "sha256":
        e["sha256"] = sha256(data)
    elif checksum == "both":
        e["md5"], e["sha256"] = md5(data), sha256(data)
    if modality:
        e["modality"] = modality
    e.update(extra)
    return e


def data_files(ddir: Path) -> list[str]:
    """Everything in a dataset folder except mrivq's own bookkeeping."""
    if not ddir.exists():
        return []
    return sorted(p.relative_to(ddir).as_posix() for p in ddir.rglob("*")
                  if p.is_file() and ".mrivq" not in p.relative_to(ddir).parts)


# ----------------------------------------------------------------------------- stand-in layout
def _tiny_scan(ddir: Path, card: Card) -> list[dict]:
    rows = []
    for p in sorted(ddir.rglob("*.nii.gz")):
        rel = p.relative_to(ddir)
        if any(part.startswith(".") for part in rel.parts):
            continue
        subject, _, mod = p.name[: -len(".nii.gz")].partition("_")
        rows.append({"subject": subject, "modality": mod, "path": rel.as_posix(),
                     **({"bytes": p.stat().st_size} if mod == "t2" else {})})
    return rows


PREPARED: list[tuple[Path, str | None]] = []


def _tiny_prepare(part_dir: Path, card: Card, file) -> None:
    assert part_dir.name.startswith(".staging-") and part_dir.parent.name == card.name
    PREPARED.append((part_dir, file.filename if file is not None else None))


TINY = SimpleNamespace(scan=_tiny_scan, prepare=_tiny_prepare)


def use_tiny_layout() -> None:
    """Make every layout name resolve to TINY (also called from the subprocess scripts below)."""
    mrivq.datasets.layouts.get_layout = lambda name: TINY


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    monkeypatch.setattr(mrivq.datasets.layouts, "get_layout", lambda name: TINY)
    PREPARED.clear()
    return TINY


@pytest.fixture
def two_tars(http_server: FileServer, tmp_path: Path):
    """A card with a T1 tar (incompressible, ~100 KB) and a T2 tar.gz, served by the test server."""
    t1 = tar_bytes({f"sub{i}_t1.nii.gz": nifti_bytes((24, 24, 24), seed=i, noise=True) for i in (1, 2, 3)})
    t2 = tar_bytes({f"t2/sub{i}_t2.nii.gz": nifti_bytes(seed=i) for i in (1, 2)}, mode="w:gz")
    card = make_card(tmp_path, [entry(http_server, "demo-t1.tar", t1, modality="t1", checksum="both"),
                                entry(http_server, "demo-t2.tar.gz", t2, modality="t2", checksum="sha256")])
    return card, t1, t2


# ----------------------------------------------------------------------------- whole fetch
def test_whole_fetch_extracts_verifies_and_writes_manifest(tiny, http_server, data_root, two_tars) -> None:
    card, t1, t2 = two_tars
    res = fetch(card, data_root, **FAST)
    ddir = data_root / "demo"
    assert isinstance(res, FetchResult) and res.dataset_dir == ddir and not res.already_complete
    assert res.bytes_downloaded == len(t1) + len(t2) == http_server.bytes_sent
    assert data_files(ddir) == ["manifest.csv", "sub1_t1.nii.gz", "sub2_t1.nii.gz", "sub3_t1.nii.gz",
                                "t2/sub1_t2.nii.gz", "t2/sub2_t2.nii.gz"]
    img = nib.load(ddir / "sub2_t1.nii.gz")
    assert img.shape == (24, 24, 24) and np.allclose(np.diag(img.affine), [2, 2, 2, 1])
    with open(res.manifest_path, newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["subject", "modality", "path", "bytes"]
        rows = list(reader)
    assert rows == res.rows and len(rows) == 5
    assert {(r["subject"], r["modality"]) for r in rows} == {("sub1", "t1"), ("sub2", "t1"), ("sub3", "t1"),
                                                             ("sub1", "t2"), ("sub2", "t2")}
    assert rows[0]["bytes"] == "" and rows[-1]["bytes"] != ""
    # archives are deleted once extracted; completion markers record the checksums
    assert list((ddir / ".mrivq" / "downloads").iterdir()) == []
    assert sorted(p.name for p in (ddir / ".mrivq" / "done").iterdir()) == ["demo-t1.tar.json",
                                                                            "demo-t2.tar.gz.json"]
    assert not list(ddir.glob(".staging-*"))
    # prepare() saw each part in its staging folder, before it was moved into place
    assert sorted(f for _, f in PREPARED) == ["demo-t1.tar", "demo-t2.tar.gz"]
    assert all(not d.exists() for d, _ in PREPARED)


def test_progress_gets_one_bar_per_download(tiny, http_server, data_root, two_tars) -> None:
    from mrivq.utils.progress import Progress

    card, t1, t2 = two_tars
    stream = io.StringIO()
    with Progress(enabled=True, stream=stream) as prog:
        fetch(card, data_root, progress=prog, **FAST)
    out = stream.getvalue()
    assert f"demo-t1.tar: {len(t1) / 1024:.1f} KB/{len(t1) / 1024:.1f} KB" in out, out


def test_rerun_of_complete_dataset_makes_no_request(tiny, http_server, data_root, two_tars) -> None:
    card, _, _ = two_tars
    first = fetch(card, data_root, **FAST)
    before = {p: p.stat().st_mtime_ns for p in (data_root / "demo").rglob("*") if p.is_file()}
    http_server.reset_counters()
    again = fetch(card, data_root, **FAST)
    assert again.already_complete and again.bytes_downloaded == 0
    assert http_server.count() == 0
    assert again.rows == first.rows
    after = {p: p.stat().st_mtime_ns for p in (data_root / "demo").rglob("*") if p.is_file()}
    assert {p: t for p, t in after.items() if p.name != "lock"} == \
        {p: t for p, t in before.items() if p.name != "lock"}


def test_extra_modality_later_adds_it_and_rewrites_manifest(tiny, http_server, data_root, two_tars) -> None:
    card, t1, t2 = two_tars
    res = fetch(card, data_root, modalities=["t1"], **FAST)
    assert {r["modality"] for r in res.rows} == {"t1"}
    assert http_server.count("demo-t2.tar.gz") == 0
    http_server.reset_counters()
    res = fetch(card, data_root, modalities=["T2"], **FAST)  # case-insensitive
    assert not res.already_complete
    assert [r[0] for r in http_server.requests] == ["demo-t2.tar.gz"]
    assert {r["modality"] for r in res.rows} == {"t1", "t2"} and len(res.rows) == 5
    assert fetch(card, data_root, **FAST).already_complete
    with pytest.raises(MrivqError, match="has no modality 'flair'; choose from t1, t2"):
        fetch(card, data_root, modalities=["flair"], **FAST)


# ----------------------------------------------------------------------------- resume / retry
def test_resume_after_connection_cut_fetches_only_missing_bytes(tiny, http_server, data_root, two_tars):
    card, t1, _ = two_tars
    cut = len(t1) // 3
    http_server.cut_after["demo-t1.tar"] = cut
    res = fetch(card, data_root, modalities=["t1"], **FAST)
    reqs = [r for r in http_server.requests if r[0] == "demo-t1.tar"]
    assert reqs == [("demo-t1.tar", None, 200), ("demo-t1.tar", f"bytes={cut}-", 206)]
    assert http_server.bytes_sent == len(t1)  # cut bytes + the rest, nothing twice
    assert res.bytes_downloaded == len(t1)
    assert len(res.rows) == 3


def test_rerun_after_killed_fetch_resumes_the_partial_file(tiny, http_server, data_root, two_tars) -> None:
    card, t1, _ = two_tars
    have = 40_000
    downloads = data_root / "demo" / ".mrivq" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / "demo-t1.tar.part").write_bytes(t1[:have])
    stale = data_root / "demo" / ".staging-abc123"  # a kill during extraction leaves one of these
    (stale / "junk").mkdir(parents=True)
    (stale / "junk" / "half_t1.nii.gz").write_bytes(b"half")
    res = fetch(card, data_root, modalities=["t1"], **FAST)
    assert http_server.requests == [("demo-t1.tar", f"bytes={have}-", 206)]
    assert http_server.bytes_sent == res.bytes_downloaded == len(t1) - have
    assert not stale.exists()
    assert {r["subject"] for r in res.rows} == {"sub1", "sub2", "sub3"}


def _kill_script(card_path: Path, root: Path) -> str:
    return textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from tests.datasets.test_fetch import use_tiny_layout
        use_tiny_layout()
        from mrivq.datasets.catalog import load_card
        from mrivq.datasets.fetch.job import fetch
        fetch(load_card({str(card_path)!r}), {str(root)!r}, modalities=["t1"], backoff=0.001)
        """)


def test_real_kill_mid_download_then_rerun(tiny, http_server, data_root, two_tars) -> None:
    card, t1, _ = two_tars
    http_server.delay = 0.01  # ~400 KB/s: the subprocess is still downloading when we kill it
    proc = subprocess.Popen([sys.executable, "-c", _kill_script(card.source, data_root)])
    try:
        deadline = time.monotonic() + 60
        while http_server.bytes_sent < 30_000 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        assert proc.poll() is None, "the fetch finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    settled = -1
    while settled != http_server.bytes_sent:  # let the server notice the dropped connection
        settled = http_server.bytes_sent
        time.sleep(0.2)
    ddir = data_root / "demo"
    part = ddir / ".mrivq" / "downloads" / "demo-t1.tar.part"
    have = part.stat().st_size
    assert 0 < have < len(t1)
    assert data_files(ddir) == []  # nothing a later run (or a user) could take for data
    http_server.delay = 0
    http_server.reset_counters()
    res = fetch(card, data_root, modalities=["t1"], **FAST)
    assert http_server.requests == [("demo-t1.tar", f"bytes={have}-", 206)]
    assert http_server.bytes_sent == len(t1) - have
    assert len(res.rows) == 3


def test_server_ignoring_range_restarts_whole_file(tiny, http_server, data_root, two_tars) -> None:
    card, t1, _ = two_tars
    http_server.range_support = False
    downloads = data_root / "demo" / ".mrivq" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / "demo-t1.tar.part").write_bytes(t1[:5000])
    http_server.cut_after["demo-t1.tar"] = 20_000  # and a cut: the retry must start over again
    res = fetch(card, data_root, modalities=["t1"], **FAST)
    assert [r[2] for r in http_server.requests] == [200, 200]
    assert http_server.bytes_sent == 20_000 + len(t1)
    assert len(res.rows) == 3


def test_stale_partial_from_other_version_is_caught(tiny, http_server, data_root, two_tars) -> None:
    card, t1, _ = two_tars
    downloads = data_root / "demo" / ".mrivq" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / "demo-t1.tar.part").write_bytes(b"x" * 1000)  # not a prefix of the real file
    with pytest.raises(ChecksumError, match="demo-t1.tar"):
        fetch(card, data_root, modalities=["t1"], **FAST)
    assert not (downloads / "demo-t1.tar.part").exists()
    res = fetch(card, data_root, modalities=["t1"], **FAST)  # a rerun gets it whole
    assert len(res.rows) == 3


def test_503_then_success(tiny, http_server, data_root, two_tars) -> None:
    card, _, _ = two_tars
    http_server.fail_first["demo-t1.tar"] = 2
    res = fetch(card, data_root, modalities=["t1"], retries=3, **FAST)
    assert [r[2] for r in http_server.requests] == [503, 503, 200]
    assert len(res.rows) == 3


def test_retries_used_up_is_one_line_naming_the_url(tiny, http_server, data_root, two_tars) -> None:
    card, _, _ = two_tars
    http_server.fail_first["demo-t1.tar"] = 100
    with pytest.raises(MrivqError) as ei:
        fetch(card, data_root, modalities=["t1"], retries=2, **FAST)
    msg = str(ei.value)
    assert "\n" not in msg and http_server.url("demo-t1.tar") in msg and "503" in msg and "3 tries" in msg
    assert http_server.count("demo-t1.tar") == 3
    assert data_files(data_root / "demo") == []


@pytest.mark.parametrize("code", [404, 403])
def test_client_error_is_not_retried(tiny, http_server, data_root, tmp_path, code) -> None:
    if code == 403:
        http_server.status["gone.tar"] = 403
    card = make_card(tmp_path, [{"url": http_server.url("gone.tar"), "md5": "0" * 32}])
    with pytest.raises(MrivqError) as ei:
        fetch(card, data_root, **FAST)
    msg = str(ei.value)
    assert msg == f"download failed: HTTP {code} {'Not Found' if code == 404 else 'Forbidden'} for " \
                  f"{http_server.url('gone.tar')}"
    assert http_server.count() == 1
    assert data_files(data_root / "demo") == []


def test_unreachable_host_names_host_and_suggests_mirror_or_from(tiny, data_root, tmp_path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    card = make_card(tmp_path, [{"url": f"http://127.0.0.1:{port}/x.tar", "md5": "0" * 32}])
    with pytest.raises(MrivqError) as ei:
        fetch(card, data_root, retries=1, **FAST)
    msg = str(ei.value)
    assert msg.startswith("cannot reach 127.0.0.1") and "--mirror" in msg and "--from" in msg
    assert "\n" not in msg


# ----------------------------------------------------------------------------- verification
@pytest.mark.parametrize("what", ["md5", "sha256", "size"])
def test_checksum_mismatch_removes_file_and_leaves_no_data(tiny, http_server, data_root, tmp_path, what):
    data = tar_bytes({"sub1_t1.nii.gz": nifti_bytes()})
    e = entry(http_server, "bad.tar", data, checksum="both")
    if what == "size":
        e["size"] += 1
    else:
        e[what] = "f" * len(e[what])
    card = make_card(tmp_path, [e])
    with pytest.raises(ChecksumError) as ei:
        fetch(card, data_root, **FAST)
    msg = str(ei.value)
    assert "\n" not in msg and "bad.tar" in msg and "expected" in msg
    if what != "size":
        assert f"{what} is {md5(data) if what == 'md5' else sha256(data)}, expected {'f' * len(e[what])}" in msg
        assert "run the fetch again" in msg
    ddir = data_root / "demo"
    assert data_files(ddir) == []
    assert not any(p.is_file() for p in (ddir / ".mrivq" / "downloads").iterdir())
    assert not (ddir / ".mrivq" / "done").exists()


def test_failure_on_new_part_keeps_what_was_complete(tiny, http_server, data_root, two_tars, tmp_path):
    card, t1, t2 = two_tars
    fetch(card, data_root, modalities=["t1"], **FAST)
    before = data_files(data_root / "demo")
    manifest = (data_root / "demo" / "manifest.csv").read_text()
    http_server.files["demo-t2.tar.gz"] = t2[:-10] + b"0123456789"  # corrupted on the server
    with pytest.raises(ChecksumError):
        fetch(card, data_root, **FAST)
    assert data_files(data_root / "demo") == before
    assert (data_root / "demo" / "manifest.csv").read_text() == manifest


def test_unverified_file_warns(tiny, http_server, data_root, tmp_path) -> None:
    data = tar_bytes({"sub1_t1.nii.gz": nifti_bytes()})
    e = entry(http_server, "x.tar", data, checksum="none", unverified="the site publishes none")
    res = fetch(make_card(tmp_path, [e]), data_root, **FAST)
    assert len(res.warnings) == 1
    assert "x.tar" in res.warnings[0] and "the site publishes none" in res.warnings[0]


def test_plain_files_are_moved_into_place_not_extracted(tiny, http_server, data_root, tmp_path) -> None:
    img, meta = nifti_bytes(seed=3), b"subject,age\nsub1,30\n"
    card = make_card(tmp_path, [entry(http_server, "sub1_t1.nii.gz", img, modality="t1"),
                                entry(http_server, "meta.csv", meta, role="metadata")])
    res = fetch(card, data_root, **FAST)
    ddir = data_root / "demo"
    assert data_files(ddir) == ["manifest.csv", "meta.csv", "sub1_t1.nii.gz"]
    assert (ddir / "sub1_t1.nii.gz").read_bytes() == img  # copied as is (layouts read gzip)
    assert list((ddir / ".mrivq" / "downloads").iterdir()) == []
    assert [r["path"] for r in res.rows] == ["sub1_t1.nii.gz"]


def test_verified_download_not_yet_placed_is_reused(tiny, http_server, data_root, two_tars) -> None:
    card, t1, _ = two_tars
    downloads = data_root / "demo" / ".mrivq" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / "demo-t1.tar").write_bytes(t1)  # a kill between download and extraction
    res = fetch(card, data_root, modalities=["t1"], **FAST)
    assert http_server.count() == 0 and res.bytes_downloaded == 0 and len(res.rows) == 3


def test_layout_finding_nothing_is_an_error(tiny, http_server, data_root, tmp_path) -> None:
    card = make_card(tmp_path, [entry(http_server, "empty.tar", tar_bytes({"README": b"hi"}))])
    with pytest.raises(MrivqError, match=r"no images found in .*demo"):
        fetch(card, data_root, **FAST)
    assert not (data_root / "demo" / "manifest.csv").exists()


# ----------------------------------------------------------------------------- archive safety
def _evil_tar(kind: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        good = tarfile.TarInfo("ok/sub1_t1.nii.gz")
        payload = nifti_bytes()
        good.size = len(payload)
        tf.addfile(good, io.BytesIO(payload))
        if kind == "dotdot":
            bad = tarfile.TarInfo("ok/../../escaped.txt")
            bad.size = 4
            tf.addfile(bad, io.BytesIO(b"evil"))
        elif kind == "absolute":
            bad = tarfile.TarInfo("/tmp/mrivq-escaped.txt")
            bad.size = 4
            tf.addfile(bad, io.BytesIO(b"evil"))
        elif kind == "symlink":
            bad = tarfile.TarInfo("link")
            bad.type, bad.linkname = tarfile.SYMTYPE, "../../outside"
            tf.addfile(bad)
        elif kind == "abs-symlink":
            bad = tarfile.TarInfo("link")
            bad.type, bad.linkname = tarfile.SYMTYPE, "/etc"
            tf.addfile(bad)
        elif kind == "hardlink":
            bad = tarfile.TarInfo("hard")
            bad.type, bad.linkname = tarfile.LNKTYPE, "../outside.txt"
            tf.addfile(bad)
        elif kind == "through-link":  # an in-bounds link, then a member written through it
            link = tarfile.TarInfo("ok/up")
            link.type, link.linkname = tarfile.SYMTYPE, ".."
            tf.addfile(link)
            bad = tarfile.TarInfo("ok/up/escaped.txt")
            bad.size = 4
            tf.addfile(bad, io.BytesIO(b"evil"))
        elif kind == "device":
            bad = tarfile.TarInfo("dev")
            bad.type, bad.devmajor, bad.devminor = tarfile.CHRTYPE, 1, 3
            tf.addfile(bad)
        elif kind == "fifo":
            bad = tarfile.TarInfo("pipe")
            bad.type = tarfile.FIFOTYPE
            tf.addfile(bad)
    return buf.getvalue()


EVIL = ["dotdot", "absolute", "symlink", "abs-symlink", "hardlink", "through-link", "device", "fifo"]
MEMBER = {"dotdot": "ok/../../escaped.txt", "absolute": "/tmp/mrivq-escaped.txt", "symlink": "link",
          "abs-symlink": "link", "hardlink": "hard", "through-link": "ok/up/escaped.txt", "device": "dev",
          "fifo": "pipe"}


@pytest.mark.parametrize("kind", EVIL)
def test_safe_extract_rejects_whole_archive(tmp_path: Path, kind: str) -> None:
    arc = tmp_path / "evil.tar"
    arc.write_bytes(_evil_tar(kind))
    dest = tmp_path / "a" / "b" / "dest"
    with pytest.raises(UnsafeArchiveError) as ei:
        safe_extract(arc, dest)
    msg = str(ei.value)
    assert "evil.tar" in msg and repr(MEMBER[kind]) in msg and "\n" not in msg
    assert not dest.exists() or list(dest.rglob("*")) == []  # not even the good member
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["evil.tar"]


def test_safe_extract_rejects_zip_traversal(tmp_path: Path) -> None:
    arc = tmp_path / "evil.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        zf.writestr("fine.txt", "ok")
        zf.writestr("../escaped.txt", "evil")
    with pytest.raises(UnsafeArchiveError, match=r"evil\.zip: member '\.\./escaped\.txt'"):
        safe_extract(arc, tmp_path / "dest")
    assert not (tmp_path / "escaped.txt").exists()
    assert not (tmp_path / "dest").exists() or list((tmp_path / "dest").iterdir()) == []


def test_safe_extract_allows_inside_links_and_zip_and_plain_gz(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:bz2") as tf:
        f = tarfile.TarInfo("d/a.txt")
        f.size = 1
        tf.addfile(f, io.BytesIO(b"a"))
        ln = tarfile.TarInfo("d/b.txt")
        ln.type, ln.linkname = tarfile.SYMTYPE, "a.txt"
        tf.addfile(ln)
    (tmp_path / "ok.tar.bz2").write_bytes(buf.getvalue())
    assert safe_extract(tmp_path / "ok.tar.bz2", tmp_path / "t") == ["d"]
    assert (tmp_path / "t" / "d" / "b.txt").read_text() == "a"
    with zipfile.ZipFile(tmp_path / "ok.zip", "w") as zf:
        zf.writestr("z/one.txt", "1")
    assert safe_extract(tmp_path / "ok.zip", tmp_path / "z") == ["z"]
    assert (tmp_path / "z" / "z" / "one.txt").read_text() == "1"
    gz = tmp_path / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(b"\x00\x00\x08\x03"))
    safe_extract(gz, tmp_path / "g")
    assert (tmp_path / "g" / gz.name).read_bytes() == gz.read_bytes()


def test_damaged_archive_is_one_line(tmp_path: Path) -> None:
    arc = tmp_path / "cut.tar.gz"
    arc.write_bytes(gzip.compress(tar_bytes({"a": b"x" * 5000}))[:-40])
    with pytest.raises(MrivqError, match=r"cut\.tar\.gz is damaged or incomplete"):
        safe_extract(arc, tmp_path / "d")


@pytest.mark.parametrize("kind", ["dotdot", "symlink"])
def test_fetch_of_unsafe_archive_writes_nothing(tiny, http_server, data_root, tmp_path, kind) -> None:
    card = make_card(tmp_path, [entry(http_server, "evil.tar", _evil_tar(kind))])
    with pytest.raises(UnsafeArchiveError):
        fetch(card, data_root, **FAST)
    assert data_files(data_root / "demo") == []
    assert not list((data_root / "demo").glob(".staging-*"))
    assert not (data_root / "escaped.txt").exists() and not (data_root / "outside").exists()


def test_archive_cannot_overwrite_bookkeeping(tiny, http_server, data_root, tmp_path) -> None:
    data = tar_bytes({"sub1_t1.nii.gz": nifti_bytes(), ".mrivq/done/other.json": b"{}"})
    card = make_card(tmp_path, [entry(http_server, "sneaky.tar", data)])
    with pytest.raises(UnsafeArchiveError, match="'.mrivq'"):
        fetch(card, data_root, **FAST)
    assert data_files(data_root / "demo") == []


# ----------------------------------------------------------------------------- --from / --mirror
def test_from_folder_uses_local_files_without_network(tiny, http_server, data_root, two_tars, tmp_path):
    card, t1, t2 = two_tars
    have = tmp_path / "mine"
    have.mkdir()
    (have / "demo-t1.tar").write_bytes(t1)
    (have / "demo-t2.tar.gz").write_bytes(t2)
    (have / "unrelated.txt").write_text("x")
    res = fetch(card, data_root, from_path=have, **FAST)
    assert http_server.count() == 0 and res.bytes_downloaded == 0
    assert len(res.rows) == 5
    assert (have / "demo-t1.tar").read_bytes() == t1  # the user's files are left alone
    assert fetch(card, data_root, from_path=have, **FAST).already_complete


def test_from_archive_fetches_only_what_it_supplies(tiny, http_server, data_root, two_tars, tmp_path):
    card, t1, _ = two_tars
    arc = tmp_path / "demo-t1.tar"
    arc.write_bytes(t1)
    res = fetch(card, data_root, from_path=arc, **FAST)
    assert http_server.count() == 0
    assert {r["modality"] for r in res.rows} == {"t1"}
    assert arc.read_bytes() == t1


def test_from_file_with_wrong_checksum_is_left_alone(tiny, http_server, data_root, two_tars, tmp_path):
    card, t1, _ = two_tars
    arc = tmp_path / "demo-t1.tar"
    arc.write_bytes(t1[:-1] + b"!")
    with pytest.raises(ChecksumError, match="left as it is"):
        fetch(card, data_root, from_path=arc, **FAST)
    assert arc.read_bytes() == t1[:-1] + b"!"
    assert data_files(data_root / "demo") == []


def test_from_bad_paths_say_what_is_expected(tiny, http_server, data_root, two_tars, tmp_path) -> None:
    card, _, _ = two_tars
    with pytest.raises(MrivqError, match=r"--from .*nowhere does not exist; expected one of the card's "
                                         r"files \(demo-t1.tar, demo-t2.tar.gz\)"):
        fetch(card, data_root, from_path=tmp_path / "nowhere", **FAST)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(MrivqError, match="is not one of the files of dataset 'demo'"):
        fetch(card, data_root, from_path=notes, **FAST)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MrivqError, match="holds none of the card's files"):
        fetch(card, data_root, from_path=empty, **FAST)
    assert http_server.count() == 0


def test_mirror_serves_files_by_name_and_checksums_still_apply(tiny, http_server, data_root, tmp_path):
    data = tar_bytes({"sub1_t1.nii.gz": nifti_bytes()})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/orig/x y.tar"
    card = make_card(tmp_path, [{"url": dead, "size": len(data), "md5": md5(data)}])
    http_server.add("mirror/x y.tar", data)
    res = fetch(card, data_root, mirror=http_server.base_url + "/mirror/", **FAST)
    assert http_server.requests == [("mirror/x y.tar", None, 200)] and len(res.rows) == 1
    http_server.add("mirror2/x y.tar", data[:-3] + b"xyz")
    with pytest.raises(ChecksumError):
        fetch(card, data_root / "other", mirror=http_server.base_url + "/mirror2", **FAST)


def test_users_own_card_file(tiny, http_server, data_root, tmp_path) -> None:
    data = tar_bytes({"sub9_t1.nii.gz": nifti_bytes()})
    p = tmp_path / "my-scans.yaml"
    p.write_text(yaml.safe_dump({"name": "my-scans", "access": "open", "layout": "nifti-folder",
                                 "modalities": ["t1"],
                                 "files": [entry(http_server, "scans.tar", data)]}))
    card = get_card(str(p))
    res = fetch(card, data_root, **FAST)
    assert res.dataset_dir == data_root / "my-scans" and res.rows[0]["subject"] == "sub9"


# ----------------------------------------------------------------------------- manual access
@pytest.fixture
def manual_card(tmp_path: Path) -> Card:
    return make_card(tmp_path, [], name="secret", access="manual", modalities=["t1"],
                     instructions="Register at https://example.org/apply and download scans.zip.\n\n"
                                  "Then pass scans.zip (or the folder it unpacks to) with --from.")


def test_manual_without_from_explains_how(tiny, data_root, manual_card) -> None:
    with pytest.raises(MrivqError) as ei:
        fetch(manual_card, data_root)
    msg = str(ei.value)
    assert "Register at https://example.org/apply and download scans.zip." in msg
    assert "pass the downloaded file with --from" in msg and "\n" not in msg
    assert not (data_root / "secret").exists()  # nothing created for a fetch that cannot start


def test_manual_from_archive_and_folder(tiny, data_root, manual_card, tmp_path) -> None:
    arc = tmp_path / "scans.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        zf.writestr("scans/subA_t1.nii.gz", nifti_bytes(seed=1))
    res = fetch(manual_card, data_root, from_path=arc)
    assert [r["path"] for r in res.rows] == ["scans/subA_t1.nii.gz"]
    assert fetch(manual_card, data_root, from_path=arc).already_complete
    assert fetch(manual_card, data_root).already_complete  # no --from needed once there
    folder = tmp_path / "more"
    (folder / "deep").mkdir(parents=True)
    (folder / "deep" / "subB_t1.nii.gz").write_bytes(nifti_bytes(seed=2))
    res = fetch(manual_card, data_root, from_path=folder)
    assert sorted(r["path"] for r in res.rows) == ["more/deep/subB_t1.nii.gz", "scans/subA_t1.nii.gz"]
    assert (folder / "deep" / "subB_t1.nii.gz").exists()
    wrong = tmp_path / "readme.txt"
    wrong.write_text("x")
    with pytest.raises(MrivqError, match=r"readme.txt is not a folder or an archive; expected the archive"):
        fetch(manual_card, data_root, from_path=wrong)


# ----------------------------------------------------------------------------- concurrency
def _concurrent_script(card_path: Path, root: Path, out: Path) -> str:
    return textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(REPO)!r})
        from tests.datasets.test_fetch import use_tiny_layout
        use_tiny_layout()
        from mrivq.datasets.catalog import load_card
        from mrivq.datasets.fetch.job import fetch
        res = fetch(load_card({str(card_path)!r}), {str(root)!r}, backoff=0.001)
        open({str(out)!r}, "w").write(json.dumps({{"complete": res.already_complete, "rows": res.rows}}))
        """)


def test_two_processes_fetching_one_dataset(tiny, http_server, data_root, two_tars, tmp_path) -> None:
    import json

    card, t1, t2 = two_tars
    http_server.delay = 0.002
    outs = [tmp_path / "a.json", tmp_path / "b.json"]
    procs = [subprocess.Popen([sys.executable, "-c", _concurrent_script(card.source, data_root, o)])
             for o in outs]
    for p in procs:
        assert p.wait(timeout=120) == 0
    results = [json.loads(o.read_text()) for o in outs]
    assert sorted(r["complete"] for r in results) == [False, True]
    assert results[0]["rows"] == results[1]["rows"] and len(results[0]["rows"]) == 5
    assert http_server.count("demo-t1.tar") == 1 and http_server.count("demo-t2.tar.gz") == 1
    assert http_server.bytes_sent == len(t1) + len(t2)


def test_two_threads_fetching_one_dataset(tiny, http_server, data_root, two_tars) -> None:
    card, _, _ = two_tars
    http_server.delay = 0.001
    results: list = [None, None]

    def run(i: int) -> None:
        results[i] = fetch(card, data_root, **FAST)

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(r.already_complete for r in results) == [False, True]
    assert results[0].rows == results[1].rows
    assert http_server.count() == 2


# ----------------------------------------------------------------------------- real layouts
def _import_or_skip(mod: str):
    """Import a layout module; these tests must fail, never skip, when it is missing."""
    return importlib.import_module(mod)


def test_ixi_named_tar_with_real_ixi_layout(http_server, data_root, tmp_path) -> None:
    _import_or_skip("mrivq.datasets.layouts.ixi")
    names = {"t1": ["IXI002-Guys-0828-T1.nii.gz", "IXI012-HH-1211-T1.nii.gz"],
             "t2": ["IXI002-Guys-0828-T2.nii.gz"]}
    files = []
    for mod, members in names.items():
        data = tar_bytes({n: nifti_bytes(seed=i) for i, n in enumerate(members)})
        files.append(entry(http_server, f"IXI-{mod.upper()}.tar", data, modality=mod))
    shipped = yaml.safe_load((REPO / "datasets" / "ixi.yaml").read_text())["options"]
    options = {k: v for k, v in shipped.items() if k != "demographics"}
    card = make_card(tmp_path, files, name="ixi", layout="ixi", options=options)
    res = fetch(card, data_root, **FAST)
    got = sorted((r["subject"][:6], r["modality"]) for r in res.rows)
    assert got == [("IXI002", "t1"), ("IXI002", "t2"), ("IXI012", "t1")]
    assert all((data_root / "ixi" / r["path"]).is_file() for r in res.rows)


def test_nifti_folder_layout(http_server, data_root, tmp_path) -> None:
    _import_or_skip("mrivq.datasets.layouts.nifti_folder")
    data = tar_bytes({f"scans/s{i}.nii.gz": nifti_bytes(seed=i) for i in range(3)})
    card = make_card(tmp_path, [entry(http_server, "scans.tar", data)], modalities=["t1"],
                     options={"modality": "t1"})
    res = fetch(card, data_root, **FAST)
    assert len(res.rows) == 3
    assert all((data_root / "demo" / r["path"]).is_file() for r in res.rows)


def test_phantom_builtin(data_root) -> None:
    phantom = _import_or_skip("mrivq.datasets.phantom")
    assert hasattr(phantom, "write_dataset")
    card = get_card("phantom")
    opts = {"count": 2, "shape": (32, 32, 32), "spacing": 4.0, "seed": 1}
    res = fetch(card, data_root, builtin_options=opts, modalities=["t1"])
    assert not res.already_complete and res.bytes_downloaded == 0
    assert len({r["subject"] for r in res.rows}) == 2 and {r["modality"] for r in res.rows} == {"t1"}
    first = res.rows[0]
    assert nib.load(data_root / "phantom" / first["path"]).shape == (32, 32, 32)
    assert fetch(card, data_root, builtin_options=opts, modalities=["t1"]).already_complete
    with pytest.raises(MrivqError, match="already exists at .* with other options .*count=2"):
        fetch(card, data_root, builtin_options={**opts, "count": 3}, modalities=["t1"])
    assert len(fetch(card, data_root, builtin_options=opts, modalities=["t1"]).rows) == len(res.rows)


def test_builtin_defaults_come_from_the_card_then_the_caller(data_root, tmp_path) -> None:
    card = make_card(tmp_path, [], name="mini", access="builtin", layout="phantom", modalities=["t1"],
                     options={"count": 2, "shape": [16, 16, 16], "spacing": 8.0})
    res = fetch(card, data_root, builtin_options={"count": None, "shape": None, "spacing": None, "seed": None})
    assert len(res.rows) == 2  # the card's count, not the built-in default of 160
    assert nib.load(data_root / "mini" / res.rows[0]["path"]).shape == (16, 16, 16)
    res = fetch(card, tmp_path / "other", builtin_options={"count": 3, "shape": None})
    assert len(res.rows) == 3  # an explicit option wins over the card


def test_builtin_rejects_from(data_root, tmp_path) -> None:
    card = make_card(tmp_path, [], name="phantom", access="builtin", layout="phantom")
    with pytest.raises(MrivqError, match="generated on your machine; --from does not apply"):
        fetch(card, data_root, from_path=tmp_path)
