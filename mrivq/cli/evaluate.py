"""`mrivq eval`: reconstruction, `--samples` (realism) and `--anomaly`, one function per mode."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from mrivq.cli.common import (
    HealCalibrateOpt,
    HealNormalizeOpt,
    HealResamplesOpt,
    HealSmoothOpt,
    HealThresholdOpt,
    HealZscoreOpt,
    RootOpt,
    RunOpt,
    err,
    out,
)
from mrivq.utils.errors import MrivqError
from mrivq.utils.progress import Progress

_HEAL_PARAMS = ("threshold", "resamples", "zscore", "smooth", "calibrate", "normalize")
#: the options each mode of `eval` takes besides --run and --device; any other given is refused
_EVAL_OPTIONS = {
    None: ("split",),
    "--samples": ("samples", "real", "train_set", "features", "json_out", "root", "overwrite", "controls"),
    "--anomaly": ("anomaly", "dataset", "json_out", "root", "overwrite", "allow_overlap", *_HEAL_PARAMS),
}


def _refuse_options(ctx: typer.Context, allowed: tuple[str, ...], what: str) -> None:
    """A one-line error for the first option given on the command line that ``what`` does not use
    (silently ignoring it would let a user believe it applied)."""
    for p in ctx.command.params:
        if p.name in (*allowed, "run", "device") or not p.opts:
            continue
        source = ctx.get_parameter_source(p.name)
        if getattr(source, "name", None) in ("COMMANDLINE", "ENVIRONMENT"):
            flag = next((o for o in p.opts if o.startswith("--")), p.opts[0])
            flag += "".join(f"/{o}" for o in getattr(p, "secondary_opts", [])[:1])  # --calibrate/--no-calibrate
            raise MrivqError(f"{flag} does not apply to {what}; leave it out (see `mrivq eval --help`)")


def eval_(
    ctx: typer.Context,
    run: Path | None = RunOpt,
    split: str = typer.Option("val", "--split", help="Reconstruction: val or train."),
    samples: Path | None = typer.Option(None, "--samples", help="Realism: a folder of samples from `mrivq synth`."),
    real: str | None = typer.Option(None, "--real", help="Realism: real scans, NAME[:train|val|all] of a fetched "
                                    "dataset, a NIfTI folder or a DICOM folder (default: the run's dataset:val)."),
    train_set: str | None = typer.Option(None, "--train", help="Realism: training scans for the memorization "
                                         "test (same forms as --real, e.g. phantom:train)."),
    features: str | None = typer.Option(None, "--features", help="Realism: add an FID on named features, "
                                        "medicalnet:PATH (MedicalNet ResNet weights you supply)."),
    json_out: Path | None = typer.Option(None, "--json", help="Realism: where to write the JSON "
                                         "(default: realism.json in the samples folder)."),
    anomaly: bool = typer.Option(False, "--anomaly", help="Anomaly detection: heal every subject of --dataset "
                                 "and measure the maps against its lesion masks."),
    dataset: str | None = typer.Option(None, "--dataset", help="Anomaly: NAME[:val|train|all] of a dataset "
                                       "with lesion masks (default phantom-lesions:val)."),
    threshold: float = HealThresholdOpt,
    resamples: int = HealResamplesOpt,
    zscore: float = HealZscoreOpt,
    smooth: float = HealSmoothOpt,
    calibrate: bool | None = HealCalibrateOpt,
    normalize: bool | None = HealNormalizeOpt,
    root: Path | None = RootOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="Realism/anomaly: replace an existing --json file."),
    controls: bool = typer.Option(True, "--controls/--no-controls", help="Realism: measure the control rows (real "
                                  "scans through the samples' path, reconstructions, the mean volume repeated)."),
    allow_overlap: bool = typer.Option(False, "--allow-overlap", help="Anomaly: measure subjects whose id or "
                                       "healthy anatomy is in the run's training or validation split."),
    device: str = typer.Option("auto", "--device"),
) -> None:
    """Reconstruction metrics on a split (eval_<split>.json); with --samples how real the samples are;
    with --anomaly how well healing finds lesions."""
    if samples is not None and anomaly:
        raise MrivqError("--samples and --anomaly are separate evaluations; pass one")
    mode = "--samples" if samples is not None else "--anomaly" if anomaly else None
    _refuse_options(ctx, _EVAL_OPTIONS[mode], f"eval {mode}" if mode else "eval (reconstruction)")
    if samples is not None:
        return _eval_realism(run, samples, real, train_set, features, json_out, root, device, overwrite, controls)
    if anomaly:
        from mrivq.inference.heal import HealOptions

        return _eval_anomaly(run, dataset or "phantom-lesions:val", HealOptions(
            threshold=threshold, resamples=resamples, zscore=zscore, smooth=smooth, calibrate=calibrate,
            normalize=normalize).validate(),
            json_out, root, device, overwrite, allow_overlap)
    return _eval_reconstruction(run, split, device)


def _eval_reconstruction(run: Path | None, split: str, device: str) -> None:
    from mrivq.evaluate.reconstruction import evaluate_reconstruction

    res = evaluate_reconstruction(run, split=split, device=device)
    t = Table(title=f"eval ({split}) {res['run']}")
    t.add_column("metric")
    t.add_column("value")
    for k, v in res["metrics"].items():
        if k != "by_class":
            t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    out.print(t)
    by_class = res["metrics"].get("by_class")
    if by_class:
        cols = [k for k in next(iter(by_class.values())) if k != "n_images"]
        t = Table(title="per class")
        for c in ("class", "n_images", *cols):
            t.add_column(c)
        for name, m in by_class.items():
            t.add_row(name, str(m["n_images"]), *(f"{m[c]:.4f}" for c in cols))
        out.print(t)
    out.print(f"wrote {res['path']}")


# metric key, what it means, the reference key shown beside it and what that reference is
_REALISM_ROWS = [
    ("c2st_accuracy", "C2ST, anatomy (block means); 0.5 = indistinguishable", "c2st_null_q95", "null 95%"),
    ("c2st_texture_accuracy", "C2ST, texture (random 3D convolutions)", "c2st_texture_null_q95", "null 95%"),
    ("mmd", "MMD², multi-bandwidth Gaussian kernel", "mmd_floor", "null 95%"),
    ("mmd_linear_monai", "MONAI MMDMetric (linear)", "mmd_linear_monai_floor", "real halves"),
    ("ms_ssim_synth", "pairwise MS-SSIM; lower = more varied", "ms_ssim_real", "real"),
    ("memorization", "NN distance to train / real's; 0 = copies", None, ""),
    ("mask_dice_synth", "median head-mask Dice, real mean mask", "mask_dice_real", "real, LOO"),
    ("head_shaped_fraction", "share with mask Dice >= 0.85", None, ""),
    ("tissue_in_range", "share with tissue fractions in real range", None, ""),
    ("tissue_z", "largest |mean tissue fraction - real| / real SD", None, ""),
    ("tissue_dice_gap", "largest |real - set| median Dice of CSF/GM/WM maps with the real mean map", None, ""),
    ("ventricles_present", "share with ventricles in the real volume range", None, ""),
    ("fid", "FID", None, ""),
]
#: the control rows' column titles
_CONTROLS = {"real_as_samples": "real", "reconstructions": "recon", "mean_volume": "mean"}
#: the checks shown in the goals line, by the metric key they judge
_CHECK_OF = {"c2st_accuracy": "c2st", "c2st_texture_accuracy": "c2st_texture", "mmd": "mmd",
             "ms_ssim_synth": "diversity", "mask_dice_synth": "head_shape", "tissue_in_range": "tissue"}


def _eval_anomaly(run: Path | None, dataset: str, opts, json_out: Path | None, root: Path | None,  # noqa: ANN001
                  device: str, overwrite: bool, allow_overlap: bool) -> None:
    from mrivq.evaluate.anomaly import METHODS, evaluate_anomaly

    with Progress() as prog:
        res = evaluate_anomaly(run, dataset, root=root, opts=opts, json_out=json_out, device=device,
                               progress=prog, overwrite=overwrite, allow_overlap=allow_overlap)
    m = res["metrics"]

    def num(v: float | None) -> str:
        return "-" if v is None or v != v else f"{v:.3f}"

    t = Table(title=f"anomaly: {m['n_subjects']} subjects of {m['dataset']}:{m['split']} "
                    f"(threshold from {m['n_calibration']} others)")
    for c in ("method", "AUPRC", "AUROC", "best Dice", "Dice at threshold"):
        t.add_column(c)
    for meth in (k for k in METHODS if k in m["methods"]):
        p = m["methods"][meth]["pooled"]
        t.add_row(meth, num(p["auprc"]), num(p["auroc"]), num(p["best_dice"]), num(p.get("dice")))
    out.print(t)
    for group in ("kinds", "sizes"):
        t = Table(title=f"healed, per lesion {group[:-1]}")
        for c in (group[:-1], "subjects", "AUPRC", "best Dice", "residual AUPRC"):
            t.add_column(c)
        for k, p in m["methods"]["healed"][group].items():
            base = m["methods"]["residual"][group][k]
            t.add_row(k, str(p["n_subjects"]), num(p["auprc"]), num(p["best_dice"]), num(base["auprc"]))
        out.print(t)
    out.print(f"wrote {res['path']} and pictures in {res['pictures']}")


def _eval_realism(run: Path | None, samples: Path, real: str | None, train_set: str | None,
                  features: str | None, json_out: Path | None, root: Path | None, device: str,
                  overwrite: bool, controls: bool) -> None:
    from mrivq.evaluate.realism import evaluate_realism

    with Progress() as prog:
        res = evaluate_realism(run, samples, real, train_set, features=features, json_out=json_out, root=root,
                               progress=prog, device=device, overwrite=overwrite, controls=controls)
    m = res["metrics"]
    ctrl = m.get("controls") or {}
    t = Table(title=f"realism: {m['n_synth']} samples vs {m['real']} ({m['n_real']})",
              caption="goal: the samples' check (see the docs' Measuring realism page). Controls, measured "
                      "the same way: real = real scans written and read as samples are; recon = their "
                      "reconstructions; mean = their mean volume repeated")
    t.add_column("metric", no_wrap=True)
    for c in ("samples", "goal", *(_CONTROLS[k] for k in ctrl), "reference"):
        t.add_column(c, no_wrap=c != "reference")

    def fmt(row: dict, key: str) -> str:
        v = row.get(key)
        return "" if v is None else f"{v:.4g}"

    for key, _meaning, ref, ref_name in _REALISM_ROWS:
        if m.get(key) is None:
            continue
        r = f"{m[ref]:.4g} ({ref_name})" if ref and m.get(ref) is not None else ""
        chk = (m.get("checks") or {}).get(_CHECK_OF.get(key, ""))
        goal = "" if chk is None else ("pass" if chk["pass"] else "fail")
        t.add_row(key, fmt(m, key), goal, *(fmt(c, key) for c in ctrl.values()), r)
    out.print(t)
    if m.get("controls_note"):
        err.print(f"[yellow]note:[/] {m['controls_note']}")
    if m.get("fid_features"):
        out.print(f"FID features: {m['fid_features']}")
    out.print(f"wrote {res['json']}\npicture: {res['picture']}")


