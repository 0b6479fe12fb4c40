"""`mrivq datasets`, `mrivq fetch` and `mrivq presets`: the catalogue and its datasets."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from mrivq.cli.common import RootOpt, err, human_size, out
from mrivq.utils.errors import MrivqError
from mrivq.utils.paths import resolve_root
from mrivq.utils.progress import Progress

datasets_app = typer.Typer(help="List the dataset catalogue, or show one card.")


@datasets_app.callback(invoke_without_command=True)
def datasets_list(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print the cards as JSON."),
    root: Path | None = RootOpt,
) -> None:
    """Table of catalogued datasets: modalities, download size, access, licence, fetched or not."""
    if ctx.invoked_subcommand:
        return
    from mrivq.datasets.catalog import download_size, fetch_status, list_cards

    cards = list_cards()
    if as_json:
        print(json.dumps([c.to_dict() for c in cards], indent=2))
        return
    r = resolve_root(root)
    t = Table(title=f"mrivq datasets (root: {r})")
    for col in ("name", "modalities", "download", "access"):
        t.add_column(col, no_wrap=col == "name")
    t.add_column("licence", max_width=24, no_wrap=True, overflow="ellipsis")
    t.add_column("fetched")
    for c in cards:
        size = download_size(c)
        known = sum(f.size or 0 for f in c.files) if c.access == "open" else 0
        shown = human_size(size) if size else (f">= {human_size(known)}" if known else "-")
        st = fetch_status(c, r)
        fetched = ", ".join(st.get("modalities", [])) or "yes" if st.get("fetched") else "-"
        t.add_row(c.name, ", ".join(c.modalities), shown, c.access, c.licence, fetched)
    out.print(t)


@datasets_app.command("show")
def datasets_show(name: str = typer.Argument(..., help="Dataset name or card file.")) -> None:
    """Print one card in full."""
    import yaml

    from mrivq.datasets.catalog import get_card

    print(yaml.safe_dump(get_card(name).to_dict(), sort_keys=False, allow_unicode=True, width=100))



def presets() -> None:
    """List the shipped presets."""
    from mrivq.config.presets import list_presets

    for p in list_presets():
        out.print(p)


def fetch(
    name: str = typer.Argument(..., help="Dataset name (see `mrivq datasets`) or a card file (.yaml)."),
    modality: list[str] = typer.Option(None, "--modality", "-m", help="Modality to fetch (repeatable; default all)."),
    root: Path | None = RootOpt,
    mirror: str | None = typer.Option(None, "--mirror", help="Fetch every file by name from this base URL."),
    from_path: Path | None = typer.Option(None, "--from", help="An archive or folder you already have."),
    count: int | None = typer.Option(None, "--count", help="phantom: number of subjects (default 160)."),
    shape: tuple[int, int, int] | None = typer.Option(
        None, "--shape", help="phantom: volume shape X Y Z (default 64 64 64)."),
    spacing: float | None = typer.Option(None, "--spacing", help="phantom: voxel size in mm (default 3)."),
    seed: int | None = typer.Option(None, "--seed", help="phantom: random seed (default 0)."),
    lesions: bool = typer.Option(False, "--lesions", help="phantom: insert one lesion per subject (tumour, "
                                 "white-matter hyperintensities, artefact) with its mask; into phantom-lesions."),
    varied: bool = typer.Option(False, "--varied", help="phantom: each head at its own pose (up to 15 degrees "
                                "and 25 mm) in one of three sites' fields of view, one with the neck; the true "
                                "transform per subject in phantom.json; into phantom-varied."),
    as_name: str | None = typer.Option(None, "--name", help="Folder name under the root (default: the "
                                       "dataset's name; phantom-lesions with --lesions, phantom-varied with "
                                       "--varied)."),
) -> None:
    """Download (or copy with --from), verify and lay out a dataset; writes manifest.csv."""
    from mrivq.datasets.catalog import get_card, rename_card
    from mrivq.datasets.fetch.job import fetch as do_fetch

    card = get_card(name)
    for flag, on in (("--lesions", lesions), ("--varied", varied)):
        if on and card.access != "builtin":
            raise MrivqError(f"{flag} is for generated datasets such as phantom, not {card.name}")
    if as_name or lesions or varied:
        card = rename_card(card, as_name or card.name + ("-varied" if varied else "") + ("-lesions" if lesions else ""))
    r = resolve_root(root)
    opts = {"count": count, "shape": tuple(shape) if shape else None, "spacing": spacing, "seed": seed,
            "lesions": lesions, "varied": varied}
    with Progress() as prog:
        res = do_fetch(card, r, modalities=modality or None, mirror=mirror, from_path=from_path,
                       progress=prog, builtin_options=opts if card.access == "builtin" else None)
    for w in res.warnings:
        err.print(f"[yellow]warning:[/] {w}")
    subjects = len({row["subject"] for row in res.rows})
    if res.already_complete:
        out.print(f"{card.name} is already complete in {res.dataset_dir}: nothing to do")
    else:
        out.print(f"fetched {card.name}: {subjects} subjects, {len(res.rows)} images "
                  f"({human_size(res.bytes_downloaded)} downloaded)")
    out.print(f"data:     {res.dataset_dir}")
    out.print(f"manifest: {res.manifest_path}")
