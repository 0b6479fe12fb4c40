"""The results pages: ``benchmarks/report.py`` renders result files it has never seen, copies their
pictures, fills the README's block, and ``--check`` names a stale page."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest

from benchmarks.report import END, START, main

ROOT = Path(__file__).resolve().parents[2]


def _png(path: Path) -> None:
    """A 1x1 grey PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00\x80")) + chunk(b"IEND", b""))


@pytest.fixture()
def folders(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A results folder with a new kind of result, a picture and a file with no machine or date; a
    scripts folder whose ``cortex.py`` says what it measures."""
    results, scripts = tmp_path / "results", tmp_path / "scripts"
    results.mkdir()
    scripts.mkdir()
    (scripts / "cortex.py").write_text('"""Ventricles and cortex inside the samples.\n\nMore text."""\n')
    (results / "cortex_cpu_2cores.json").write_text(json.dumps({
        "machine": "x86_64, 2 cores", "date": "2026-12-01", "note": "24 samples per arm",
        "arms": {"small": {"dice": {"csf": 0.81234, "gm": 0.7}, "ventricles_ml": list(range(30)), "ok": True},
                 "large": {"dice": {"csf": 0.9, "gm": 0.75}, "ventricles_ml": [1.5, 2.5], "ok": False}},
        "rows": [{"method": "affine", "error_mm": 0.49}, {"method": "none", "error_mm": 21.3, "extra": None}],
        "halves": {"val": {"command": "python b.py --split val", "rows": {"a": {"x": 1}, "b": {"x": 2}}}},
        "seconds": 12.0, "shape": [96, 112, 96],
        "command": "python benchmarks/cortex.py --count 24",
    }))
    _png(results / "cortex_montage.png")
    (results / "speed.json").write_text(json.dumps({"device": "cpu", "results": [{"batch": 1, "s": 0.25}]}))
    return results, scripts, tmp_path / "out"


def test_renders_a_new_result_file_with_its_machine_command_date_and_picture(folders) -> None:
    results, scripts, out = folders
    readme = out.parent / "README.md"
    assert main(["--results", str(results), "--out", str(out), "--scripts", str(scripts),
                 "--readme", str(readme)]) == 0
    page = (out / "cortex.md").read_text()
    assert "Ventricles and cortex inside the samples." in page
    assert "- machine: x86_64, 2 cores" in page and "- date: 2026-12-01" in page
    assert "- command: `python benchmarks/cortex.py --count 24`" in page
    assert "- val, command: `python b.py --split val`" in page and "- note: 24 samples per arm" in page
    assert "| small | 0.8123 | 0.7 | median 14.5 (30 values, 0 to 29) | yes |" in page  # dict of records
    assert "| affine | 0.49 |  |" in page and "| none | 21.3 | — |" in page  # list of records
    assert "| shape | 96, 112, 96 |" in page and "| seconds | 12 |" in page
    assert "![cortex_montage](img/cortex_montage.png)" in page
    assert (out / "img" / "cortex_montage.png").read_bytes() == (results / "cortex_montage.png").read_bytes()
    speed = (out / "speed.md").read_text()  # no machine, no date, no command, outside git: said, not invented
    assert "- machine: not recorded (result file: device cpu)" in speed
    assert "- date: not recorded" in speed and "- command: not recorded" in speed
    index = (out / "index.md").read_text()
    assert "| [Cortex](cortex.md) | Ventricles and cortex inside the samples. | x86_64, 2 cores | 2026-12-01 |" \
        in index
    assert "[Speed](speed.md)" in index


def test_check_names_the_stale_page_and_the_unknown_one(folders, capsys) -> None:
    results, scripts, out = folders
    args = ["--results", str(results), "--out", str(out), "--scripts", str(scripts),
            "--readme", str(out.parent / "README.md")]
    assert main([*args, "--check"]) == 1  # nothing written yet
    main(args)
    capsys.readouterr()
    assert main([*args, "--check"]) == 0
    data = json.loads((results / "cortex_cpu_2cores.json").read_text())
    data["seconds"] = 13.0  # the benchmark is re-run: its page must change with it
    (results / "cortex_cpu_2cores.json").write_text(json.dumps(data))
    assert main([*args, "--check"]) == 1
    assert capsys.readouterr().out.strip() == f"report: {out / 'cortex.md'} is stale; run python benchmarks/report.py"
    main(args)
    assert main([*args, "--check"]) == 0
    (results / "speed.json").unlink()  # a page whose result file is gone
    assert main([*args, "--check"]) == 1
    assert "speed.md" in capsys.readouterr().out
    main(args)
    assert not (out / "speed.md").exists() and main([*args, "--check"]) == 0


def test_fills_only_the_readme_block_and_leaves_a_readme_without_markers(folders, capsys) -> None:
    results, scripts, out = folders
    from benchmarks.report import HOUR, QUICK

    arm = {"samples": {"c2st_accuracy": 0.8125}, "controls": {"real_as_samples": {"c2st_accuracy": 0.6}}}
    (results / "anatomy_cpu_2cores.json").write_text(json.dumps({
        "machine": "m1", "arms": {"quick": {**arm, "preset": QUICK, "sets": []},
                                  "hour": {**arm, "preset": HOUR, "sets": [], "samples": {"c2st_accuracy": 0.7}},
                                  "a lever": {**arm, "preset": QUICK, "sets": ["x=1"],
                                              "samples": {"c2st_accuracy": 0.1}}}}))
    readme = out.parent / "README.md"
    plain = "# Title\n\nNo block here.\n"
    readme.write_text(plain)
    args = ["--results", str(results), "--out", str(out), "--scripts", str(scripts), "--readme", str(readme)]
    main(args)
    assert readme.read_text() == plain and "has no" in capsys.readouterr().out
    readme.write_text(f"# Title\n\n{START}\nold table\n{END}\n\nAfter.\n")
    assert main([*args, "--check"]) == 1  # pages are fresh only after the write below
    main(args)
    text = readme.read_text()
    assert text.startswith(f"# Title\n\n{START}\n| figure | value | machine | page |")
    assert text.endswith(f"{END}\n\nAfter.\n")
    assert ("| 0.81 (quick start), 0.70 (one hour); real scans read as samples: 0.60 | m1 | "
            "[Anatomy of samples at a fixed CPU budget](out/anatomy.md) |") in text
    assert "old table" not in text and main([*args, "--check"]) == 0
    readme.write_text(text.replace("0.81", "0.99"))
    assert main([*args, "--check"]) == 1 and "results block" in capsys.readouterr().out


def test_the_repository_pages_are_current() -> None:
    """``docs/results/`` and the README block match ``benchmarks/results/`` (re-run the report after a
    benchmark)."""
    assert main(["--check"]) == 0
