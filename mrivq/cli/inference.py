"""`mrivq encode|decode|reconstruct|synth|score|export`: using a trained run."""

from __future__ import annotations

from pathlib import Path

import typer

from mrivq.cli.common import (
    HealCalibrateOpt,
    HealNormalizeOpt,
    HealResamplesOpt,
    HealSmoothOpt,
    HealThresholdOpt,
    HealZscoreOpt,
    RunOpt,
    out,
)
from mrivq.utils.errors import MrivqError
from mrivq.utils.progress import Progress

OverwriteOpt = typer.Option(False, "--overwrite", help="Replace an existing output file.")
FormatOpt = typer.Option("nifti", "--format", help="nifti, or dicom: a DICOM series (MR, 16-bit, marked "
                         "synthetic) in the folder -o names.")


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


