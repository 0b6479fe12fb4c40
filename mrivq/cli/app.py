"""The ``mrivq`` command line: a thin typer layer over the library.

Every command parses its options, calls one library function and prints the result with rich.
User errors (:class:`mrivq.utils.errors.MrivqError`) become one line on stderr and exit code 2; the
traceback is shown only with ``--debug``.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mrivq import __version__
from mrivq.utils.errors import MrivqError, find_in_chain, user_message
from mrivq.utils.paths import resolve_root
from mrivq.utils.progress import Progress


class _OneLineUsage(typer.core.TyperGroup):
    """Command-line usage errors (an unknown command, a missing or extra argument, a bad option value) as
    mrivq errors: one line naming the problem and the ``--help`` to read, exit code 2, like every other
    bad input (typer would print a usage block and a boxed message)."""

    @staticmethod
    def _one_line(e: Exception) -> Exception:
        if type(e).__name__ == "NoArgsIsHelpError" or not hasattr(e, "format_message") \
                or not hasattr(e, "ctx") or getattr(e, "exit_code", None) != 2:
            return e
        where = e.ctx.command_path if getattr(e, "ctx", None) is not None else "mrivq"
        return MrivqError(f"{e.format_message()} (see `{where} --help`)")

    def parse_args(self, ctx, args):  # noqa: ANN001, ANN201 - click's signature
        try:
            return super().parse_args(ctx, args)
        except Exception as e:
            raise self._one_line(e) from None

    def invoke(self, ctx):  # noqa: ANN001, ANN201 - click's signature
        try:
            return super().invoke(ctx)
        except Exception as e:
            raise self._one_line(e) from None


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=_OneLineUsage,
                  help="Vector-quantized autoencoders and PixelCNN priors for MRI, on MONAI.")
datasets_app = typer.Typer(help="List the dataset catalogue, or show one card.")
app.add_typer(datasets_app, name="datasets")
out = Console()
err = Console(stderr=True)

RootOpt = typer.Option(None, "--root", help="Data root (default: $MRIVQ_DATA, else a per-user data folder).")
# = mrivq.inference.heal.HealOptions' defaults (not imported here: the CLI starts fast);
# benchmarks/anomaly.py chose them
HEAL_THRESHOLD, HEAL_SMOOTH = 0.05, 2.0
# healing's options, shared by `score --heal` and `eval --anomaly`
HealThresholdOpt = typer.Option(HEAL_THRESHOLD, "--threshold", help="Healing: redraw codes whose probability "
                                "under the prior is below this.")
HealResamplesOpt = typer.Option(4, "--resamples", help="Healing: healed versions averaged.")
HealZscoreOpt = typer.Option(0.0, "--zscore", help="Healing: flag codes this many SDs above their position's NLL "
                             "on the training codes, instead of --threshold (0: off).")
HealSmoothOpt = typer.Option(HEAL_SMOOTH, "--smooth", help="Healing: Gaussian sigma (voxels) of the maps.")
HealCalibrateOpt = typer.Option(None, "--calibrate/--no-calibrate", help="Healing: compare the input with "
                                "reconstructions through the run's intensity calibration (default: when the run "
                                "has one; raw measures alike).", show_default=False)
HealNormalizeOpt = typer.Option(None, "--normalize/--no-normalize", help="Healing: residuals as per-voxel z-scores "
                                "against the reconstruction residuals of the run's healthy validation scans "
                                "(default: for 3D runs whose dataset or stored reference is there; measured "
                                "better).", show_default=False)
RunOpt = typer.Option(None, "--run", help="Run folder (default: the most recent under ./runs).")


def _version(value: bool) -> None:
    if value:
        out.print(f"mrivq {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """mrivq: compress MRI into discrete codes, synthesize volumes, score how typical a scan is."""


# ---------------------------------------------------------------- datasets

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
        shown = _size(size) if size else (f">= {_size(known)}" if known else "-")
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


def _size(n: int | float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# ---------------------------------------------------------------- fetch

@app.command()
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
    as_name: str | None = typer.Option(None, "--name", help="Folder name under the root (default: the "
                                       "dataset's name; phantom-lesions with --lesions)."),
) -> None:
    """Download (or copy with --from), verify and lay out a dataset; writes manifest.csv."""
    from mrivq.datasets.catalog import get_card, rename_card
    from mrivq.datasets.fetch.job import fetch as do_fetch

    card = get_card(name)
    if lesions and card.access != "builtin":
        raise MrivqError(f"--lesions is for generated datasets such as phantom, not {card.name}")
    if as_name or lesions:
        card = rename_card(card, as_name or f"{card.name}-lesions")
    r = resolve_root(root)
    opts = {"count": count, "shape": tuple(shape) if shape else None, "spacing": spacing, "seed": seed,
            "lesions": lesions}
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
                  f"({_size(res.bytes_downloaded)} downloaded)")
    out.print(f"data:     {res.dataset_dir}")
    out.print(f"manifest: {res.manifest_path}")


# ---------------------------------------------------------------- train

@app.command()
def train(
    dataset: str | None = typer.Option(None, "--dataset", "-d", help="Dataset name under the data root [ixi]."),
    modality: list[str] = typer.Option(None, "--modality", "-m", help="Input modality (repeat for multi-contrast)."),
    dims: int | None = typer.Option(None, "--dims", help="2 or 3 spatial dimensions [3]."),
    preset: str | None = typer.Option(None, "--preset", help="Preset from configs/ (default: by dims/device)."),
    config: Path | None = typer.Option(None, "--config", help="A YAML config file (overrides the preset)."),
    set_: list[str] = typer.Option(None, "--set", help="Override a config key: section.key=value (repeatable); "
                                   "on an existing run only the schedule's length, logging and speed."),
    stage: str = typer.Option("all", "--stage", help="all (VQ-VAE then prior), vqvae, or prior."),
    run: Path | None = typer.Option(None, "--run", help="Existing run (for --stage prior or --resume)."),
    out_dir: Path | None = typer.Option(None, "--out", help="Run folder (default runs/<dataset>-<mod>-<dims>d-<t>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run from its last checkpoint."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Stage-1 optimizer steps."),
    epochs: int | None = typer.Option(None, "--epochs", help="Stage-1 epochs (instead of --max-steps)."),
    prior_max_steps: int | None = typer.Option(None, "--prior-max-steps", help="Stage-2 optimizer steps."),
    root: Path | None = RootOpt,
) -> None:
    """Train the VQ-VAE (stage 1) and the prior (stage 2: the PixelCNN, or --set prior.model.family=maskgit).

    Under `torchrun --nproc_per_node=N -m mrivq train ...` each of N processes (GPUs) takes an equal
    share of every batch: train.batch_size is the global batch, so a run learns the same with any N.
    """
    from mrivq.training import runconfig as RC
    from mrivq.utils import distributed as ddp

    req = RC.TrainRequest(dataset, list(modality) if modality else None, dims, preset, config, set_ or None)
    device = ddp.init_from_env(device)  # torchrun: join the process group, take this rank's GPU
    try:
        _train(req, stage, run, out_dir, resume, device, max_steps, epochs, prior_max_steps, root)
    finally:
        ddp.shutdown()


def _train(req, stage: str, run: Path | None, out_dir: Path | None, resume: bool, device: str,
           max_steps: int | None, epochs: int | None, prior_max_steps: int | None, root: Path | None) -> None:
    from mrivq.training import runconfig as RC
    from mrivq.training.loop import Interrupted
    from mrivq.training.run import train_run
    from mrivq.utils import distributed as ddp
    from mrivq.utils.device import resolve_device

    main = ddp.is_main()
    t = RC.train_target(req, stage, run, out_dir, resume, resolve_root(root), resolve_device(device).type)
    run_dir = t.run_dir
    if t.new and main:
        err.print(f"preset {t.cfg['preset']}; run folder {run_dir}")
    try:
        with Progress(enabled=main) as prog:
            summary = train_run(t.cfg, data_dir=t.data_dir, run_dir=run_dir, stage=stage, resume=resume,
                                device=device, max_steps=max_steps, epochs=epochs,
                                prior_max_steps=prior_max_steps, progress=prog, meta=t.meta, request=req)
    except Interrupted as e:
        if main:
            err.print(f"{e}; checkpoint written. Continue with: mrivq train --resume --out {run_dir}")
        raise typer.Exit(code=130) from None
    if not main:
        return
    for st in ("vqvae", "prior"):
        if st in summary:
            vals = "  ".join(f"{k} {v:.4g}" for k, v in summary[st].items() if isinstance(v, (int, float)))
            out.print(f"{st}: {vals}")
    out.print(f"run: {run_dir}")


# ---------------------------------------------------------------- using a trained model

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


@app.command("eval")
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
              caption="goal: the samples' check (see `Measuring realism` in the README). Controls, measured "
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


OverwriteOpt = typer.Option(False, "--overwrite", help="Replace an existing output file.")
FormatOpt = typer.Option("nifti", "--format", help="nifti, or dicom: a DICOM series (MR, 16-bit, marked "
                         "synthetic) in the folder -o names.")


@app.command()
def encode(
    image: Path = typer.Argument(..., help="A NIfTI file or a DICOM series folder."),
    output: Path = typer.Option(..., "-o", "--output", help="Output .npz with the code indices."),
    run: Path | None = RunOpt,
    device: str = typer.Option("auto", "--device"),
    overwrite: bool = OverwriteOpt,
) -> None:
    """Encode an image into code indices (plus what is needed to decode into its geometry)."""
    from mrivq.inference.files import encode_file

    res = encode_file(run, image, output, device=device, overwrite=overwrite)
    out.print(f"wrote {output}: codes {tuple(res['shape'])}")


@app.command()
def decode(
    codes: Path = typer.Argument(..., help="A codes .npz written by `mrivq encode`."),
    output: Path = typer.Option(..., "-o", "--output", help="Output NIfTI (.nii.gz), or with --format dicom "
                                "a folder for the DICOM series."),
    run: Path | None = RunOpt,
    fmt: str = FormatOpt,
    device: str = typer.Option("auto", "--device"),
    overwrite: bool = OverwriteOpt,
) -> None:
    """Decode code indices back into an image in the original geometry."""
    from mrivq.inference.files import decode_file

    decode_file(run, codes, output, device=device, overwrite=overwrite, fmt=fmt)
    out.print(f"wrote {output}")


@app.command()
def reconstruct(
    image: Path = typer.Argument(..., help="A NIfTI file or a DICOM series folder."),
    output: Path = typer.Option(..., "-o", "--output", help="Output NIfTI (.nii.gz), or with --format dicom "
                                "a folder for the DICOM series."),
    run: Path | None = RunOpt,
    fmt: str = FormatOpt,
    device: str = typer.Option("auto", "--device"),
    overwrite: bool = OverwriteOpt,
) -> None:
    """Encode then decode an image (shape, affine and intensity scale of the input)."""
    from mrivq.inference.files import reconstruct_file

    res = reconstruct_file(run, image, output, device=device, overwrite=overwrite, fmt=fmt)
    out.print(f"wrote {output} (PSNR vs input {res['psnr']:.2f} dB in the model's space)")


CovariateOpt = typer.Option([], "--covariate", help="NAME=VALUE of a covariate the prior is conditioned on "
                            "(data.covariates), e.g. age=40; repeatable; default: the training mean.")


def _covariates(items: list[str]) -> dict[str, float]:
    """``["age=40", ...]`` -> ``{"age": 40.0}``; a malformed item is a one-line error."""
    out: dict[str, float] = {}
    for it in items:
        name, sep, value = it.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise MrivqError(f"--covariate {it!r} is not NAME=NUMBER (e.g. --covariate age=40)") from None
    return out


@app.command()
def synth(
    count: int = typer.Option(10, "--count", "-n", help="Number of samples."),
    out_dir: Path = typer.Option(Path("synth"), "--out", help="Output folder."),
    run: Path | None = RunOpt,
    seed: int = typer.Option(0, "--seed"),
    temperature: float = typer.Option(1.0, "--temperature", help="Softmax temperature; 0 = most likely code."),
    top_k: int | None = typer.Option(None, "--top-k"),
    batch_size: int = typer.Option(16, "--batch-size", help="Code grids sampled together (decoded 4 at a time)."),
    class_: str | None = typer.Option(None, "--class", help="Class (id or name, e.g. HH or t2) for a "
                                      "class-conditional prior."),
    covariate: list[str] = CovariateOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing files."),
    reference: bool = typer.Option(False, "--reference", help="Use the slow reference sampler."),
    calibrate: bool = typer.Option(True, "--calibrate/--no-calibrate", help="Map decoded intensities through "
                                   "the run's calibration (fitted on its training reconstructions) when it has "
                                   "one; --no-calibrate writes the decoder's raw output."),
    prior: str = typer.Option("pixelcnn", "--prior", help="pixelcnn (the run's trained prior, PixelCNN or "
                              "maskgit), marginal (each position's training code frequencies) or uniform "
                              "(random codes)."),
    fmt: str = typer.Option("nifti", "--format", help="3D: nifti (synth_0000.nii.gz), dicom (a DICOM series "
                            "folder synth_0000/, marked synthetic) or both."),
    device: str = typer.Option("auto", "--device"),
) -> None:
    """Sample new volumes (or 2D images) from a run's prior and decode them."""
    from mrivq.inference.synth import synthesize

    with Progress() as prog:
        res = synthesize(run, count, out_dir, seed=seed, temperature=temperature, top_k=top_k,
                         batch_size=batch_size, cls=class_, covariates=_covariates(covariate),
                         overwrite=overwrite, cached=not reference,
                         device=device, progress=prog, prior=prior, fmt=fmt, calibrate=calibrate)
    out.print(f"wrote {count} samples to {out_dir}/")
    for p in res["images"][:3]:
        out.print(f"  {p}")
    if res.get("previews"):
        out.print(f"previews: {res['previews'][0]}" + (" ..." if len(res["previews"]) > 1 else ""))


@app.command()
def score(
    image: Path = typer.Argument(..., help="A NIfTI file or a DICOM series folder."),
    output: Path = typer.Option(..., "-o", "--output", help="Output map (.nii.gz): the NLL map, or with "
                                "--heal the anomaly map."),
    run: Path | None = RunOpt,
    class_: str | None = typer.Option(None, "--class", help="Class (id or name, e.g. HH or t2) for a "
                                      "class-conditional prior."),
    covariate: list[str] = CovariateOpt,
    heal: bool = typer.Option(False, "--heal", help="Anomaly map by healing (Pinaya et al. 2022): redraw "
                              "unlikely codes from the prior, decode, residual where codes were redrawn."),
    healed: Path | None = typer.Option(None, "--healed", help="--heal: where the healed volume goes "
                                       "(default: beside -o as NAME_healed.nii.gz; the NLL map goes to NAME_nll)."),
    threshold: float = HealThresholdOpt,
    resamples: int = HealResamplesOpt,
    zscore: float = HealZscoreOpt,
    smooth: float = HealSmoothOpt,
    calibrate: bool | None = HealCalibrateOpt,
    normalize: bool | None = HealNormalizeOpt,
    brain_mask: Path | None = typer.Option(None, "--brain-mask", help="--heal: a brain mask in the input's "
                                           "geometry; the maps are zero outside it."),
    background: float = typer.Option(0.05, "--background", help="--heal: scaled intensity (0-1) below which "
                                     "a voxel is background."),
    erode: int = typer.Option(1, "--erode", help="--heal: voxels taken off the head's edge."),
    seed: int = typer.Option(0, "--seed", help="--heal: random seed of the redraws."),
    device: str = typer.Option("auto", "--device"),
    overwrite: bool = OverwriteOpt,
) -> None:
    """Negative log-likelihood of each code under the prior, in the input's geometry; with --heal an
    anomaly map, the healed volume and the NLL map."""
    from mrivq.inference.files import heal_file, score_file

    if not heal:
        if healed is not None or brain_mask is not None:
            raise MrivqError("--healed and --brain-mask go with --heal")
        res = score_file(run, image, output, device=device, cls=class_, covariates=_covariates(covariate),
                         overwrite=overwrite)
        out.print(f"mean NLL {res['mean_nll']:.4f} nats/code; wrote {output}")
        return
    from mrivq.inference.heal import HealOptions

    opts = HealOptions(threshold=threshold, resamples=resamples, background=background, erode=erode,
                       seed=seed, zscore=zscore, smooth=smooth, calibrate=calibrate,
                       normalize=normalize).validate()
    with Progress() as prog:
        res = heal_file(run, image, output, opts, healed=healed, brain=brain_mask, device=device, cls=class_,
                        covariates=_covariates(covariate), overwrite=overwrite, progress=prog)
    out.print(f"redrew {100 * res['resampled']:.1f}% of codes; anomaly max {res['max']:.3f}; wrote {output}, "
              f"{res['healed']} and {res['nll']}")


@app.command()
def export(
    run: Path | None = RunOpt,
    bundle: Path = typer.Option(..., "--bundle", help="Folder to write the MONAI bundle into (new)."),
    num_samples: int = typer.Option(4, "--num-samples", help="Volumes configs/inference.json synthesizes."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a bundle mrivq exported before."),
) -> None:
    """Export a run as a MONAI bundle (metadata, inference config, weights, docs, licence)."""
    from mrivq.inference.bundle import export_bundle

    out_dir = export_bundle(run, bundle, overwrite=overwrite, num_samples=num_samples)
    out.print(f"wrote bundle {out_dir}; run it with: python -m monai.bundle run --config_file "
              f"{out_dir}/configs/inference.json --bundle_root {out_dir}")


@app.command()
def presets() -> None:
    """List the shipped presets."""
    from mrivq.config.presets import list_presets

    for p in list_presets():
        out.print(p)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """Warnings as one line each ("warning: ..."), like errors; --debug keeps Python's format."""
    err.print(f"[yellow]warning:[/] {escape(' '.join(str(message).split()))}", highlight=False, soft_wrap=True)


def _from_ctrl_c(e: BaseException) -> bool:
    """Whether an exception's chain holds a KeyboardInterrupt (typer's ``Exit(130)`` from Ctrl-C)."""
    return find_in_chain(e, KeyboardInterrupt) is not None


def main() -> None:
    """Console entry point: one-line errors with exit code 2 unless --debug."""
    from mrivq.utils import distributed as ddp

    debug = "--debug" in sys.argv
    who = ddp.label()  # "rank 1: " under torchrun: which process said it
    if not debug:
        warnings.showwarning = _one_line_warning
    try:
        app()
    except (KeyboardInterrupt, SystemExit) as e:  # typer turns Ctrl-C into exit code 130, silently
        if isinstance(e, SystemExit) and not _from_ctrl_c(e):
            raise  # a normal exit, or training's own "interrupted at step N" (exit 130, already said)
        err.print(f"[red]interrupted:[/] {escape(who)}what was finished is kept; run the same command again to "
                  "continue", highlight=False, soft_wrap=True)
        sys.exit(130)
    except Exception as e:
        if debug:
            raise
        msg = user_message(e)
        if msg is not None:
            err.print(f"[red]error:[/] {escape(who + ' '.join(msg.split()))}", highlight=False, soft_wrap=True)
            sys.exit(getattr(e, "exit_code", 2))
        if not ddp.peer_failed(e):
            raise
        err.print(f"[red]error:[/] {escape(who)}stopped because another process of this torchrun job failed "
                  f"(its own message is above or in torchrun's summary)", highlight=False, soft_wrap=True)
        sys.exit(2)
