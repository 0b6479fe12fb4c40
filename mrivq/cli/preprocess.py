"""`mrivq preprocess`: what the model sees, written for a person to check (volumes, transforms, QC pictures)."""

from __future__ import annotations

from pathlib import Path

import typer

from mrivq.cli.common import RootOpt, err, out
from mrivq.utils.errors import MrivqError
from mrivq.utils.progress import Progress


def _preprocessing(run: Path | None, preset: str | None, overrides: list[str] | None):
    """The Preprocess of a run (as it trained) or of a preset (with --set overrides), one channel."""
    import math
    from dataclasses import replace

    from mrivq.config.presets import apply_overrides, load_preset
    from mrivq.config.schema import validate
    from mrivq.data.preprocess import Preprocess

    if (run is None) == (preset is None):
        raise MrivqError("give --run RUN or --preset PRESET (the preprocessing to show)")
    if run is not None:
        if overrides:
            raise MrivqError("--set applies to --preset; a run keeps the preprocessing it trained with")
        from mrivq.runs.folder import RunFolder, resolve_run

        info = RunFolder(resolve_run(run)).info
        if "preprocess" not in info:
            raise MrivqError(f"run {run} has not finished preparing its data yet; train it first")
        pre = Preprocess.from_dict(info["preprocess"])
    else:
        cfg = apply_overrides(load_preset(preset), list(overrides or []))
        validate(cfg)
        pre = Preprocess.from_dict(cfg.get("data", {}))
        levels = len(cfg.get("model", {}).get("channels") or ())
        if levels:
            pre.divisible_by = math.lcm(int(pre.divisible_by), 2 ** levels)
    return replace(pre, modalities=[pre.modalities[0]], pool_modalities=False)


def preprocess(
    inputs: list[Path] = typer.Argument(None, help="NIfTI files or DICOM series folders."),
    output: Path = typer.Option(..., "-o", "--out", help="Folder for NAME.nii.gz, NAME.json and NAME.png."),
    run: Path | None = typer.Option(None, "--run", help="A run folder: its preprocessing, as it trained."),
    preset: str | None = typer.Option(None, "--preset", help="A preset (see `mrivq presets`)."),
    labels: list[Path] = typer.Option(None, "--labels", help="A label map per input, in the same order "
                                      "(repeatable); each follows its scan by nearest neighbour."),
    dataset: str | None = typer.Option(None, "--dataset", help="Every subject of a fetched dataset instead of "
                                       "INPUTS (its first modality of the preprocessing)."),
    root: Path | None = RootOpt,
    set_: list[str] = typer.Option(None, "--set", help="--preset: override a key, e.g. data.template=icbm152."),
    workers: int | None = typer.Option(None, "--workers", help="Scans processed at once (default: every core)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
) -> None:
    """Preprocess scans as a model would (bias field, registration with the template, its box, masks,
    scaling) and write each with its transform and a QC picture."""
    from mrivq.data.review import preprocess_inputs

    pre = _preprocessing(run, preset, set_)
    if dataset is not None:
        if inputs or labels:
            raise MrivqError("--dataset takes the dataset's scans; give no INPUTS or --labels with it")
        from mrivq.data.manifest import load_manifest, select_rows
        from mrivq.datasets.catalog import dataset_dir
        from mrivq.utils.paths import resolve_root

        ddir = dataset_dir(resolve_root(root), dataset)
        items = select_rows(load_manifest(ddir), pre.modalities)
        inputs = [Path(it["sources"][0]["path"]) if Path(it["sources"][0]["path"]).is_absolute()
                  else ddir / it["sources"][0]["path"] for it in items]
    if workers is not None and workers < 1:
        raise MrivqError(f"--workers must be at least 1, not {workers}")
    with Progress() as prog:
        res = preprocess_inputs(list(inputs or []), output, pre, labels=list(labels) if labels else None,
                                workers=workers, progress=prog, overwrite=overwrite)
    failed = [r for r in res if not r["passed"]]
    for r in res:
        sim = "" if r["similarity"] is None else f"  similarity {r['similarity']:.2f}  {r['seconds']:.1f} s"
        out.print(f"{r['name']}{sim}  {'ok' if r['passed'] else 'FAILS the check: ' + r['why']}", highlight=False)
    out.print(f"wrote {len(res)} preprocessed scan(s) to {output}")
    if failed:
        err.print(f"[yellow]warning:[/] {len(failed)} of {len(res)} fail the registration check: "
                  f"{', '.join(r['name'] for r in failed)}; look at their PNGs (data.qc decides what training does "
                  "with them)", highlight=False)
