"""The product describes itself as it is: no tracked file but the changelog names the numbered work
periods it was made in ("session 6"), the work items ("issue 12") or their titles. What changed between
versions belongs in ``CHANGELOG.md``."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: the titles of the project's work items; a title whose head (before its first ':' or '?') has four or
#: more words is matched by that head, a shorter one by its head and colon ("Real scans in:", so that
#: "real scans in their own geometry" stays plain English)
TITLES = (
    "Installable package, dataset catalogue, and `mrivq fetch`",
    "Quantized autoencoders in 2D and 3D: `mrivq train`, stage 1",
    "Volumetric masked-convolution PixelCNN prior, fast sampling, and `mrivq synth`",
    "How real are the samples? `mrivq eval --samples`, a realism benchmark, and what the prior adds",
    "Anatomically coherent samples: a prior that knows where it is and sees the whole volume",
    "From one CPU to many GPUs: correct on CUDA, `torchrun` training, IXI-scale data, 1 mm volumes",
    "Hardening: no bad input crashes, destroys a file, or exhausts memory",
    "Unsupervised anomaly detection that is measured: lesion phantoms, healing, and `mrivq eval --anomaly`",
    "Fit the ecosystem: a MONAI bundle, DICOM series out, and a synthetic-data source for training",
    "Metrics you can trust: a C2ST that sees anatomy rather than padding, controls on every table",
    "The house in one move: packages by stage, one run-folder object, a fast test lane",
    "Real scans in: align, correct and mask every volume as the field does, and map results back",
    "Anatomy inside the samples: ventricles, cortex and cerebellum, at a CPU hour and on a GPU",
    "Docs a newcomer reads in five minutes: a short README, a documentation site, results generated",
)
#: the shorter names these items went by in prose
ALSO = ("anomaly detection that is measured", "metrics that cannot be fooled")


def _phrase(title: str) -> str:
    head = re.split(r"[:?]", title.replace("`", ""))[0].strip()
    return head if len(head.split()) >= 4 else head + ":"


PATTERNS = [re.compile(r"\bsession #?\d", re.I), re.compile(r"\bissue #?\d", re.I)] + [
    re.compile(re.escape(p).replace(r"\ ", r"\s+"), re.I) for p in sorted({*map(_phrase, TITLES), *ALSO})]

#: where a hit is a term of the world, not of how mrivq was made: OASIS names each visit an "MR session"
#: (OAS1_0001_MR1 is subject 0001's MR session 1); allowed only in the dataset cards and layouts
ALLOWED = ((re.compile(r"^(datasets/|mrivq/datasets/layouts/|tests/datasets/)"),
            re.compile(r"\bMR session #?\d", re.I)),)
#: files that may name the history: the changelog, and this test (it lists the titles it looks for)
EXEMPT = {"CHANGELOG.md", "tests/test_no_process_words.py"}


def hits(path: str, text: str) -> list[str]:
    """``path:line: match`` for every process word in ``text`` (a title may run over two lines) that no
    allow-list entry covers."""
    out = []
    for pat in PATTERNS:
        for m in pat.finditer(text):
            start = text.rfind("\n", 0, m.start()) + 1
            line = text[start:text.find("\n", m.start()) % (len(text) + 1)]
            at = m.start() - start
            if not any(where.search(path) and any(a.start() <= at < a.end() for a in what.finditer(line))
                       for where, what in ALLOWED):
                out.append(f"{path}:{text.count(chr(10), 0, m.start()) + 1}: {' '.join(m.group(0).split())!r}")
    return out


def tracked() -> list[str]:
    """Every file git tracks in the repository."""
    try:
        res = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [p for p in res.stdout.decode().split("\0") if p]


def test_no_tracked_file_names_work_periods_items_or_their_titles() -> None:
    found = []
    for path in tracked():
        f = ROOT / path
        if path in EXEMPT or not f.is_file():
            continue
        data = f.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary: checkpoints, NIfTI, pictures
        found += hits(path, data.decode("utf-8", errors="replace"))
    assert not found, "process words (describe the product as it is; history goes in CHANGELOG.md):\n" + \
        "\n".join(found)


@pytest.mark.parametrize("text", ["measured in session 6", "see Issue #12", "as in issue 3",
                                  "The House in One Move moved it", "Real scans in: align them",
                                  "after anomaly detection that is\nmeasured"])
def test_each_kind_of_process_word_is_found(text: str) -> None:
    assert hits("mrivq/x.py", text)


@pytest.mark.parametrize(("path", "text"), [
    ("datasets/oasis1.yaml", "OAS1_0001_MR1 is the subject's MR session 1"),
    ("mrivq/data/x.py", "real scans in their own geometry"),
    ("mrivq/x.py", "a pytest session fixture; issues of format"),
])
def test_dataset_terms_and_plain_english_pass(path: str, text: str) -> None:
    assert hits(path, text) == []


def test_the_dataset_term_is_allowed_only_in_the_dataset_cards_and_layouts() -> None:
    assert hits("mrivq/training/loop.py", "MR session 1")
