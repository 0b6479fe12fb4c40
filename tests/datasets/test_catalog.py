"""Dataset cards: loading, validation messages, lookup, sizes and on-disk status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import mrivq.datasets.catalog as catalog
from mrivq.datasets.catalog import (
    Card,
    dataset_dir,
    download_size,
    fetch_status,
    get_card,
    list_cards,
    load_card,
)
from mrivq.utils.errors import CardError
from mrivq.utils.paths import cards_dir

MD5 = "0" * 32
SHA = "a" * 64


def base_card(**over) -> dict:
    card = {
        "name": "demo",
        "title": "Demo",
        "access": "open",
        "layout": "nifti-folder",
        "modalities": ["t1", "t2"],
        "files": [
            {"url": "https://example.org/data/demo-t1.tar.gz", "size": 100, "md5": MD5, "modality": "t1"},
            {"url": "https://example.org/data/demo-t2.tar", "size": 50, "sha256": SHA, "modality": "t2"},
            {"url": "https://example.org/data/meta.csv?raw=1", "filename": "meta.csv", "size": 7,
             "md5": MD5, "role": "metadata"},
        ],
    }
    card.update(over)
    return card


def write(tmp_path: Path, data, name: str = "demo.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return p


def test_valid_card_loads_with_defaults(tmp_path: Path) -> None:
    card = load_card(write(tmp_path, base_card()))
    assert isinstance(card, Card)
    assert card.name == "demo" and card.access == "open" and card.dims == 3
    assert card.modalities == ("t1", "t2")
    t1, t2, meta = card.files
    assert t1.filename == "demo-t1.tar.gz" and t1.extract is True and t1.role == "data"
    assert t2.filename == "demo-t2.tar" and t2.extract is True and t2.sha256 == SHA
    assert meta.filename == "meta.csv" and meta.extract is False and meta.role == "metadata"
    assert meta.modality is None
    assert card.source == tmp_path / "demo.yaml"
    json.dumps(card.to_dict())  # --json must serialise
    assert card.to_dict()["files"][0]["md5"] == MD5


def test_filename_defaults_to_url_basename_without_query(tmp_path: Path) -> None:
    data = base_card(files=[{"url": "https://h.org/a/b/train-images-idx3-ubyte.gz?x=1", "md5": MD5}])
    card = load_card(write(tmp_path, data))
    assert card.files[0].filename == "train-images-idx3-ubyte.gz"
    assert card.files[0].extract is False  # a plain .gz is not an archive


def test_select_files_keeps_shared_files(tmp_path: Path) -> None:
    card = load_card(write(tmp_path, base_card()))
    assert [f.filename for f in card.select_files(["t2"])] == ["demo-t2.tar", "meta.csv"]
    assert len(card.select_files(None)) == 3


def _bad(tmp_path: Path, data, field: str, words: str) -> None:
    p = write(tmp_path, data)
    with pytest.raises(CardError) as ei:
        load_card(p)
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith("card ") and "demo.yaml" in msg, msg
    assert f"field '{field}'" in msg, msg
    assert words in msg, msg


@pytest.mark.parametrize("over, field, words", [
    ({"access": "public"}, "access", "must be one of open, manual, builtin"),
    ({"layout": "bids"}, "layout", "must be one of ixi"),
    ({"name": "Demo Set"}, "name", "slug"),
    ({"name": None}, "name", "is required"),
    ({"dims": 4}, "dims", "must be 2 or 3"),
    ({"modalities": "t1"}, "modalities", "list"),
    ({"options": [1, 2]}, "options", "mapping"),
    ({"acess": "open"}, "acess", "is not a card field"),
    ({"files": []}, "files", "at least one file"),
    ({"files": [{"url": "https://h.org/x.tar"}]}, "files[0].md5", "or sha256 is required"),
    ({"files": [{"url": "https://h.org/x.tar", "md5": "xyz"}]}, "files[0].md5", "32 hexadecimal"),
    ({"files": [{"url": "https://h.org/x.tar", "sha256": MD5}]}, "files[0].sha256", "64 hexadecimal"),
    ({"files": [{"url": "ftp:/nohost", "md5": MD5}]}, "files[0].url", "URL"),
    ({"files": [{"filename": "x.tar", "md5": MD5}]}, "files[0].url", "required for open"),
    ({"files": [{"url": "https://h.org/x.tar", "md5": MD5, "size": -1}]}, "files[0].size", "bytes"),
    ({"files": [{"url": "https://h.org/x.tar", "md5": MD5, "modality": "flair"}]}, "files[0].modality",
     "one of the card's modalities"),
    ({"files": [{"url": "https://h.org/x.tar", "md5": MD5, "role": "labels"}]}, "files[0].role",
     "data, metadata"),
    ({"files": [{"url": "https://h.org/x.nii", "md5": MD5, "extract": True}]}, "files[0].extract",
     "only be true for archives"),
    ({"files": [{"url": "https://h.org/x.tar", "md5": MD5, "filename": "../x.tar"}]},
     "files[0].filename", "plain file name"),
    ({"files": [{"url": "https://h.org/x.tar", "md5": MD5, "colour": 1}]}, "files[0].colour",
     "is not a file field"),
    ({"files": [{"url": "https://h.org/x.tar", "md5": MD5}, {"url": "https://g.org/x.tar", "md5": MD5}]},
     "files[1].filename", "listed twice"),
    ({"files": [{"url": "https://h.org/x.tar", "unverified": ""}]}, "files[0].unverified", "why"),
    ({"access": "manual", "files": []}, "instructions", "required for manual"),
])
def test_bad_cards_name_file_and_field(tmp_path: Path, over: dict, field: str, words: str) -> None:
    _bad(tmp_path, base_card(**over), field, words)


def test_unverified_reason_allows_no_checksum(tmp_path: Path) -> None:
    data = base_card(files=[{"url": "https://h.org/x.zip", "unverified": "the site publishes none"}])
    card = load_card(write(tmp_path, data))
    assert card.files[0].unverified == "the site publishes none" and card.files[0].checksums == {}


def test_manual_and_builtin_cards_need_no_files(tmp_path: Path) -> None:
    manual = load_card(write(tmp_path, base_card(access="manual", files=None,
                                                 instructions="Register at https://x.org, download a.zip")))
    assert manual.files == () and "Register" in manual.instructions
    builtin = load_card(write(tmp_path, base_card(access="builtin", layout="phantom", files=[]), "b.yaml"))
    assert builtin.access == "builtin"


def test_invalid_yaml_and_non_mapping_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(CardError, match=r"^card .*demo\.yaml: not valid YAML at line \d+"):
        load_card(write(tmp_path, "name: [unclosed\naccess: open\n"))
    with pytest.raises(CardError, match="must be a YAML mapping"):
        load_card(write(tmp_path, "- just\n- a list\n"))
    with pytest.raises(CardError, match="no such file"):
        load_card(tmp_path / "missing.yaml")


@pytest.fixture
def catalogue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cards"
    d.mkdir()
    write(d, base_card(name="zeta"), "zeta.yaml")
    write(d, base_card(name="alpha"), "alpha.yaml")
    monkeypatch.setattr(catalog, "cards_dir", lambda: d)
    return d


def test_list_and_get_cards(catalogue: Path) -> None:
    assert [c.name for c in list_cards()] == ["alpha", "zeta"]
    assert get_card("zeta").name == "zeta"


def test_unknown_dataset_message(catalogue: Path) -> None:
    with pytest.raises(CardError) as ei:
        get_card("nope")
    assert str(ei.value) == ("unknown dataset 'nope'; run `mrivq datasets` to list them or pass a card file")


def test_get_card_accepts_a_users_card_file(catalogue: Path, tmp_path: Path) -> None:
    p = write(tmp_path, base_card(name="mine"), "mine.yml")
    assert get_card(str(p)).name == "mine"
    assert get_card(p).source == p


def test_duplicate_names_in_catalogue(catalogue: Path) -> None:
    write(catalogue, base_card(name="alpha"), "alpha2.yaml")
    with pytest.raises(CardError, match="'alpha' is also used by"):
        list_cards()


def test_download_size(tmp_path: Path) -> None:
    card = load_card(write(tmp_path, base_card()))
    assert download_size(card) == 157
    assert download_size(card, ["t1"]) == 107
    files = base_card()["files"]
    del files[1]["size"]
    card = load_card(write(tmp_path, base_card(files=files)))
    assert download_size(card, ["t1"]) == 107
    assert download_size(card) is None  # t2 size unknown
    manual = load_card(write(tmp_path, base_card(access="manual", files=[], instructions="x")))
    assert download_size(manual) is None


def test_dataset_dir_and_fetch_status(tmp_path: Path) -> None:
    card = load_card(write(tmp_path, base_card()))
    root = tmp_path / "root"
    assert dataset_dir(root, "demo") == root / "demo"
    st = fetch_status(card, root)
    assert st["fetched"] is False and st["n_subjects"] == 0 and st["modalities"] == []
    (root / "demo" / ".mrivq").mkdir(parents=True)  # a failed fetch leaves only bookkeeping
    assert fetch_status(card, root)["fetched"] is False
    (root / "demo" / "manifest.csv").write_text(
        "subject,modality,path\ns1,t1,a.nii.gz\ns1,t2,b.nii.gz\ns2,t1,c.nii.gz\n")
    st = fetch_status(card, root)
    assert st["fetched"] is True and st["modalities"] == ["t1", "t2"]
    assert st["n_subjects"] == 2 and st["n_images"] == 3


@pytest.mark.parametrize("path", sorted(cards_dir().glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_card_validates(path: Path) -> None:
    card = load_card(path)
    assert card.name == path.stem


def test_shipped_catalogue_lists(tmp_path: Path) -> None:
    cards = list_cards()
    assert cards, "no cards shipped in datasets/"
    assert [c.name for c in cards] == sorted(c.name for c in cards)
