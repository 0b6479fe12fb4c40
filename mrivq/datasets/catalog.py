"""The dataset catalogue: one YAML card per dataset (``datasets/*.yaml``), loaded and validated here.

A card says where a dataset comes from (``files`` with URLs and checksums, or ``instructions`` for
datasets behind a registration), how it is laid out once fetched (``layout``) and what it holds
(``dims``, ``modalities``). :mod:`mrivq.datasets.fetch` turns a card into ``<root>/<name>/`` + ``manifest.csv``.

Card fields (see CONTRIBUTING.md for a worked example):

- ``name`` (slug, required), ``title``, ``description``, ``licence``, ``citation``, ``homepage``
- ``access``: ``open`` (downloaded), ``manual`` (registration; only ``--from``), ``builtin`` (generated)
- ``layout``: one of :data:`mrivq.datasets.layouts.KNOWN`; ``dims``: 2 or 3 (default 3); ``modalities``: list
- ``files``: each with ``url`` (required for open), ``filename`` (default: the URL's basename),
  ``size``, ``md5`` / ``sha256`` (at least one for open access unless ``unverified: <reason>``),
  ``modality`` (files without one are fetched for every selection), ``role`` (data|metadata),
  ``extract`` (default true for tar/zip archives)
- ``instructions`` (required for manual), ``options`` (free-form, read by the layout)

Every problem is reported as one :class:`~mrivq.utils.errors.CardError` line naming the card and the field.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from mrivq.utils.errors import CardError, MrivqError
from mrivq.utils.paths import cards_dir

ACCESS = ("open", "manual", "builtin")
ROLES = ("data", "metadata")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")

_SLUG = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_HEX = {"md5": re.compile(r"^[0-9a-f]{32}$"), "sha256": re.compile(r"^[0-9a-f]{64}$")}
_CARD_KEYS = {"name", "title", "description", "licence", "citation", "homepage", "access", "layout",
              "dims", "modalities", "files", "instructions", "options"}
_FILE_KEYS = {"url", "filename", "size", "md5", "sha256", "unverified", "modality", "role", "extract"}


def is_archive(filename: str) -> bool:
    """True for names that :func:`mrivq.datasets.archive.safe_extract` unpacks (tar of any compression, zip)."""
    low = filename.lower()
    return low.endswith(ARCHIVE_SUFFIXES)


@dataclass(frozen=True)
class CardFile:
    """One file a card lists: where to get it and how to check it."""

    filename: str
    url: str | None = None
    size: int | None = None
    md5: str | None = None
    sha256: str | None = None
    unverified: str | None = None  # why no checksum is published (fetch warns)
    modality: str | None = None  # None: needed for every modality selection
    role: str = "data"
    extract: bool = False

    @property
    def checksums(self) -> dict[str, str]:
        """``{"md5": ..., "sha256": ...}`` for the checksums the card publishes."""
        return {k: v for k, v in (("md5", self.md5), ("sha256", self.sha256)) if v}


@dataclass(frozen=True)
class Card:
    """A validated dataset card. ``source`` is the YAML file it came from."""

    name: str
    access: str
    layout: str
    title: str = ""
    description: str = ""
    licence: str = ""
    citation: str = ""
    homepage: str = ""
    dims: int = 3
    modalities: tuple[str, ...] = ()
    files: tuple[CardFile, ...] = ()
    instructions: str = ""
    options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    source: Path | None = None

    def select_files(self, modalities: list[str] | tuple[str, ...] | None = None) -> list[CardFile]:
        """Files needed for ``modalities`` (None: all): those of a chosen modality plus shared ones."""
        if modalities is None:
            return list(self.files)
        wanted = set(modalities)
        return [f for f in self.files if f.modality is None or f.modality in wanted]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (``mrivq datasets --json``)."""
        d = asdict(self)
        d["modalities"] = list(self.modalities)
        d["files"] = [asdict(f) for f in self.files]
        d["source"] = str(self.source) if self.source else None
        return d


# --------------------------------------------------------------------------------------- loading

def _display(path: Path) -> str:
    """How a card file is named in messages: ``datasets/x.yaml`` for shipped ones, else a short path."""
    try:
        if path.resolve().parent == cards_dir().resolve():
            return f"datasets/{path.name}"
    except OSError:
        pass
    try:
        rel = os.path.relpath(path)
        if not rel.startswith(".."):
            return rel
    except ValueError:
        pass
    return str(path)


class _Checker:
    def __init__(self, path: Path) -> None:
        self.where = f"card {_display(path)}"

    def fail(self, fieldname: str, problem: str) -> CardError:
        return CardError(f"{self.where}: field '{fieldname}' {problem}")

    def text(self, data: dict, key: str, *, required: bool = False, default: str = "") -> str:
        v = data.get(key)
        if v is None:
            if required:
                raise self.fail(key, "is required")
            return default
        if not isinstance(v, (str, int, float)) or isinstance(v, bool):
            raise self.fail(key, "must be text")
        return " ".join(str(v).split()) if key not in ("description", "instructions", "citation") \
            else str(v).strip()


def _filename_from_url(url: str) -> str:
    return unquote(urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1])


def _check_file(c: _Checker, i: int, raw: Any, access: str, modalities: tuple[str, ...]) -> CardFile:
    where = f"files[{i}]"
    if not isinstance(raw, dict):
        raise c.fail(where, "must be a mapping with at least 'url' or 'filename'")
    unknown = sorted(set(raw) - _FILE_KEYS)
    if unknown:
        raise c.fail(f"{where}.{unknown[0]}", f"is not a file field (known: {', '.join(sorted(_FILE_KEYS))})")
    url = raw.get("url")
    if url is not None:
        if not isinstance(url, str) or not re.match(r"^(https?|ftp)://[^/]+", url):
            raise c.fail(f"{where}.url", "must be an http(s):// or ftp:// URL")
    elif access == "open":
        raise c.fail(f"{where}.url", "is required for open-access datasets")
    filename = raw.get("filename")
    if filename is None:
        if url is None:
            raise c.fail(f"{where}.filename", "is required when no url is given")
        filename = _filename_from_url(url)
    if (not isinstance(filename, str) or not filename or "/" in filename or "\\" in filename
            or filename in (".", "..") or filename.startswith(".") or "\0" in filename):
        raise c.fail(f"{where}.filename", "must be a plain file name (no folders, not hidden)")
    size = raw.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise c.fail(f"{where}.size", "must be a whole number of bytes")
    sums: dict[str, str | None] = {}
    for algo in ("md5", "sha256"):
        v = raw.get(algo)
        if v is not None:
            if not isinstance(v, str) or not _HEX[algo].match(v.strip().lower()):
                n = 32 if algo == "md5" else 64
                raise c.fail(f"{where}.{algo}", f"must be {n} hexadecimal digits")
            v = v.strip().lower()
        sums[algo] = v
    unverified = raw.get("unverified")
    if unverified is not None and (not isinstance(unverified, str) or not unverified.strip()):
        raise c.fail(f"{where}.unverified", "must say why no checksum is published")
    if access == "open" and not any(sums.values()) and not unverified:
        raise c.fail(f"{where}.md5", "or sha256 is required for open-access files "
                     "(or give `unverified: <why no checksum is published>`)")
    modality = raw.get("modality")
    if modality is not None:
        if not isinstance(modality, str) or not modality:
            raise c.fail(f"{where}.modality", "must be text")
        if modalities and modality not in modalities:
            raise c.fail(f"{where}.modality", f"must be one of the card's modalities: {', '.join(modalities)}")
    role = raw.get("role", "data")
    if role not in ROLES:
        raise c.fail(f"{where}.role", f"must be one of {', '.join(ROLES)}")
    extract = raw.get("extract")
    if extract is None:
        extract = is_archive(filename)
    elif not isinstance(extract, bool):
        raise c.fail(f"{where}.extract", "must be true or false")
    elif extract and not is_archive(filename):
        raise c.fail(f"{where}.extract", f"can only be true for archives ({', '.join(ARCHIVE_SUFFIXES)})")
    return CardFile(filename=filename, url=url, size=size, md5=sums["md5"], sha256=sums["sha256"],
                    unverified=unverified.strip() if unverified else None, modality=modality, role=role,
                    extract=extract)


def card_from_dict(data: Any, path: Path) -> Card:
    """Validate a parsed card; ``path`` is used in messages and kept as ``Card.source``."""
    from mrivq.datasets.layouts import KNOWN

    c = _Checker(path)
    if not isinstance(data, dict):
        raise CardError(f"{c.where}: must be a YAML mapping of fields (name, access, layout, files, ...)")
    unknown = sorted(str(k) for k in set(data) - _CARD_KEYS)
    if unknown:
        raise c.fail(unknown[0], f"is not a card field (known: {', '.join(sorted(_CARD_KEYS))})")
    name = c.text(data, "name", required=True)
    if not _SLUG.match(name):
        raise c.fail("name", "must be a slug: lower-case letters, digits, '.', '_' or '-'")
    access = data.get("access")
    if access not in ACCESS:
        raise c.fail("access", f"must be one of {', '.join(ACCESS)}")
    layout = data.get("layout")
    if layout not in KNOWN:
        raise c.fail("layout", f"must be one of {', '.join(KNOWN)}")
    dims = data.get("dims", 3)
    if dims not in (2, 3) or isinstance(dims, bool):
        raise c.fail("dims", "must be 2 or 3")
    mods = data.get("modalities", [])
    if mods is None:
        mods = []
    if not isinstance(mods, list) or not all(isinstance(m, str) and m for m in mods):
        raise c.fail("modalities", "must be a list of names")
    if len(set(mods)) != len(mods):
        raise c.fail("modalities", "lists a name twice")
    modalities = tuple(mods)
    raw_files = data.get("files", [])
    if raw_files is None:
        raw_files = []
    if not isinstance(raw_files, list):
        raise c.fail("files", "must be a list")
    if access == "open" and not raw_files:
        raise c.fail("files", "must list at least one file for open-access datasets")
    files = tuple(_check_file(c, i, f, access, modalities) for i, f in enumerate(raw_files))
    seen: set[str] = set()
    for i, f in enumerate(files):
        if f.filename in seen:
            raise c.fail(f"files[{i}].filename", f"{f.filename!r} is listed twice")
        seen.add(f.filename)
    if not modalities:  # derive from the files (a card may leave them implicit)
        modalities = tuple(dict.fromkeys(f.modality for f in files if f.modality))
    instructions = c.text(data, "instructions")
    if access == "manual" and not instructions:
        raise c.fail("instructions", "is required for manual datasets (where to register, what to pass "
                     "to --from)")
    options = data.get("options", {})
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise c.fail("options", "must be a mapping")
    return Card(
        name=name, access=access, layout=layout, title=c.text(data, "title", default=name),
        description=c.text(data, "description"), licence=c.text(data, "licence"),
        citation=c.text(data, "citation"), homepage=c.text(data, "homepage"), dims=dims,
        modalities=modalities, files=files, instructions=instructions, options=dict(options),
        source=path,
    )


def load_card(path: str | os.PathLike) -> Card:
    """Read and validate one card file."""

    p = Path(path).expanduser()
    where = f"card {_display(p)}"
    if not p.is_file():
        raise CardError(f"{where}: no such file")
    from mrivq.utils.limits import read_yaml_file

    try:
        data = read_yaml_file(p, where)
    except MrivqError as e:
        raise CardError(str(e)) from None
    return card_from_dict(data, p)


def list_cards() -> list[Card]:
    """Every shipped card, sorted by name (a bad card raises :class:`CardError`)."""
    cards = [load_card(p) for p in sorted(cards_dir().glob("*.yaml"))]
    by_name: dict[str, Card] = {}
    for card in cards:
        if card.name in by_name:
            raise CardError(f"card {_display(card.source)}: field 'name' {card.name!r} is also used by "
                            f"{_display(by_name[card.name].source)}")
        by_name[card.name] = card
    return sorted(cards, key=lambda cd: cd.name)


def get_card(name_or_path: str | os.PathLike) -> Card:
    """A catalogue card by name, or a user's own card file by path (``*.yaml`` / ``*.yml``)."""
    s = str(name_or_path)
    p = Path(s).expanduser()
    if s.endswith((".yaml", ".yml")) or os.sep in s or "/" in s or (p.is_file() and not _SLUG.match(s)):
        return load_card(p)
    direct = cards_dir() / f"{s}.yaml"
    if direct.is_file():
        card = load_card(direct)
        if card.name == s:
            return card
    for card in list_cards():
        if card.name == s:
            return card
    raise CardError(f"unknown dataset '{s}'; run `mrivq datasets` to list them or pass a card file")


def rename_card(card: Card, name: str) -> Card:
    """``card`` fetched into another folder name (``fetch --name``, ``phantom --lesions``)."""
    if not _SLUG.match(name):
        raise CardError(f"dataset name {name!r} must be lowercase letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit")
    return replace(card, name=name)


# ----------------------------------------------------------------------------------- on disk

def dataset_dir(root: str | os.PathLike, name: str) -> Path:
    """Where a dataset lives under the data root: ``<root>/<name>``."""
    return Path(root).expanduser() / name


def download_size(card: Card, modalities: list[str] | None = None) -> int | None:
    """Bytes to download for ``modalities`` (None: all); None if unknown or nothing is downloaded."""
    if card.access != "open":
        return None
    files = card.select_files(modalities)
    if not files or any(f.size is None for f in files):
        return None
    return sum(f.size for f in files)  # type: ignore[misc]


def fetch_status(card: Card, root: str | os.PathLike) -> dict[str, Any]:
    """What of ``card`` is on disk under ``root`` (for ``mrivq datasets``).

    ``fetched`` is true once a fetch finished (``manifest.csv`` written); ``modalities`` lists those
    present in the manifest, ``n_subjects`` / ``n_images`` count its rows.
    """
    ddir = dataset_dir(root, card.name)
    manifest = ddir / "manifest.csv"
    status: dict[str, Any] = {"name": card.name, "path": str(ddir), "fetched": False, "modalities": [],
                              "n_subjects": 0, "n_images": 0}
    if not manifest.is_file():
        return status
    try:
        with open(manifest, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, csv.Error, UnicodeDecodeError):
        return status
    status["fetched"] = bool(rows)
    status["modalities"] = list(dict.fromkeys(r.get("modality", "") for r in rows if r.get("modality")))
    status["n_subjects"] = len({r.get("subject") for r in rows})
    status["n_images"] = len(rows)
    return status
