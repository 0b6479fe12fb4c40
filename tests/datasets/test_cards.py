"""The shipped dataset cards (datasets/*.yaml): they load, and their sources are checkable.

The raw-YAML checks run on the files themselves so that a card broken in a way the loader might
tolerate (a misspelt checksum, a stem that differs from the name) is still caught.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

CARDS_DIR = Path(__file__).resolve().parents[2] / "datasets"
CARD_PATHS = sorted(CARDS_DIR.glob("*.yaml"))
MD5 = re.compile(r"^[0-9a-f]{32}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")

EXPECTED = {
    "ixi", "ixi-tiny", "msd-brain-tumour", "msd-heart", "msd-hippocampus", "msd-prostate", "oasis1",
    "mni152", "mnist", "fashion-mnist", "cifar10", "brats", "adni", "ukbiobank", "fastmri", "phantom",
}


def _raw(path: Path) -> dict:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path.name}: not a mapping"
    return data


def _ids(paths):
    return [p.stem for p in paths]


def test_all_expected_cards_are_shipped():
    assert EXPECTED <= {p.stem for p in CARD_PATHS}


@pytest.mark.parametrize("path", CARD_PATHS, ids=_ids(CARD_PATHS))
def test_name_matches_file_stem(path):
    assert _raw(path)["name"] == path.stem


@pytest.mark.parametrize("path", CARD_PATHS, ids=_ids(CARD_PATHS))
def test_open_files_have_url_and_checksum_or_reason(path):
    card = _raw(path)
    files = card.get("files") or []
    if card["access"] != "open":
        assert card["access"] in ("manual", "builtin")
        if card["access"] == "manual":
            assert str(card.get("instructions", "")).strip(), "manual cards need instructions"
            assert "--from" in card["instructions"], "instructions must say what to pass to --from"
        return
    assert files, "open cards list at least one file"
    for f in files:
        assert str(f.get("url", "")).startswith(("http://", "https://", "ftp://")), f
        has_sum = bool(f.get("md5") or f.get("sha256"))
        reason = str(f.get("unverified") or "").strip()
        assert has_sum or reason, f"{f['url']}: needs md5/sha256 or `unverified: <why>`"
        assert not (has_sum and reason), f"{f['url']}: has a checksum, so it is not unverified"


@pytest.mark.parametrize("path", CARD_PATHS, ids=_ids(CARD_PATHS))
def test_checksums_are_well_formed(path):
    for f in _raw(path).get("files") or []:
        if "md5" in f:
            assert isinstance(f["md5"], str) and MD5.match(f["md5"]), f
        if "sha256" in f:
            assert isinstance(f["sha256"], str) and SHA256.match(f["sha256"]), f
        if "size" in f:
            assert isinstance(f["size"], int) and f["size"] > 0, f


@pytest.mark.parametrize("path", CARD_PATHS, ids=_ids(CARD_PATHS))
def test_every_checksum_names_its_source(path):
    """Each md5/sha256 line carries a comment saying where the value was published."""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if re.match(r"^\s*(md5|sha256):\s*[0-9a-fA-F]", line):
            assert "#" in line and "from" in line.split("#", 1)[1], f"{path.name}:{n}: {line.strip()}"


def test_ixi_has_the_published_md5s_and_sizes():
    files = {f["url"].rsplit("/", 1)[-1]: f for f in _raw(CARDS_DIR / "ixi.yaml")["files"]}
    want = {
        "IXI-T1.tar": ("34901a0593b41dd19c1a1f746eac2d58", 4840816640),
        "IXI-T2.tar": ("e3140d78730ecdd32ba92da48c0a9aaa", 3853445120),
        "IXI-PD.tar": ("88ecd9d1fa33cb4a2278183b42ffd749", 4068966400),
        "IXI-MRA.tar": ("29be7d2fee3998f978a55a9bdaf3407e", None),
        "IXI-DTI.tar": ("636573825b1c8b9e8c78f1877df3ee66", 4271247986),
    }
    for name, (md5, size) in want.items():
        assert files[name]["md5"] == md5, name
        assert files[name].get("size") == size, name
        assert files[name]["url"] == f"http://biomedic.doc.ic.ac.uk/brain-development/downloads/IXI/{name}"
    xls = files["IXI.xls"]
    assert xls["role"] == "metadata" and xls["size"] == 210432


def test_cards_load_through_the_catalogue():
    import mrivq.datasets.catalog as catalog
    cards = catalog.list_cards()
    by_name = {c.name: c for c in cards}
    assert EXPECTED <= set(by_name)
    for c in cards:
        assert c.source is not None and c.source.stem == c.name
        for f in c.files:
            if c.access == "open":
                assert f.url and (f.checksums or f.unverified), (c.name, f.filename)
            if f.modality is not None:
                assert f.modality in c.modalities, (c.name, f.filename)
    ixi = by_name["ixi"]
    assert ixi.modalities == ("t1", "t2", "pd", "mra", "dti")
    # choosing T1 fetches the T1 tar plus the shared demographics sheet, nothing else
    assert sorted(f.filename for f in ixi.select_files(["t1"])) == ["IXI-T1.tar", "IXI.xls"]
    assert by_name["ixi-tiny"].files[0].filename == "ixi_tiny.zip"
    assert by_name["phantom"].access == "builtin" and not by_name["phantom"].files
    assert {by_name[n].dims for n in ("mnist", "fashion-mnist", "cifar10")} == {2}
