"""What the model sees, written for a person to check: :func:`preprocess_inputs` runs a model's
preprocessing (bias field, registration, template box, masks, scaling) on scans and writes, per
input ``NAME``, ``NAME.nii.gz`` (the preprocessed volume on the model's grid, with that grid's affine),
``NAME.json`` (the transform and its quality figures) and ``NAME.png`` (three planes with the template's
brain outline over the registered scan); label maps given with the scans follow them by nearest
neighbour. Subjects run in parallel threads (SimpleITK and numpy release the GIL)."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from mrivq.data.preprocess import Preprocess
from mrivq.data.restore import preprocess_file
from mrivq.utils.atomic import atomic_write_text
from mrivq.utils.errors import MrivqError


def output_name(path: Path) -> str:
    """``scan.nii.gz`` -> ``scan``; a DICOM folder keeps its name."""
    name = path.name
    for ext in (".nii.gz", ".nii", ".hdr", ".img"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _outline(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask)


def qc_montage(volume: np.ndarray, brain: np.ndarray | None, path: Path) -> None:
    """Three mid planes of ``volume`` (scaled 0-1) side by side, the template's brain outline in red."""
    from PIL import Image

    planes = []
    centre = [s // 2 for s in volume.shape]
    for axis in range(3):
        img = np.take(volume, centre[axis], axis=axis)
        rgb = np.repeat(np.clip(img, 0, 1)[..., None], 3, axis=-1)
        if brain is not None:
            edge = _outline(np.take(brain, centre[axis], axis=axis))
            rgb[edge] = [1.0, 0.15, 0.15]
        planes.append(np.rot90(rgb))  # superior / anterior up
    h = max(p.shape[0] for p in planes)
    padded = [np.pad(p, ((0, h - p.shape[0]), (0, 2), (0, 0))) for p in planes]
    arr = (np.concatenate(padded, axis=1) * 255).astype(np.uint8)
    scale = max(1, 256 // max(h, 1))
    Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST).save(path)


def _one(src: Path, label: Path | None, pre: Preprocess, out_dir: Path) -> dict:
    from mrivq.data.align import Registration, grid_brain, resolve_template
    from mrivq.data.readers import load_source
    from mrivq.io.images import save_nifti

    name = output_name(src)
    x, ctx = preprocess_file(src, pre)
    affine = np.asarray(ctx["preprocessed_affine"], dtype=np.float64)
    vol = x.numpy()
    reg = ctx.get("registration")
    brain = None
    if reg is not None:  # the preprocessed grid is the template's grid
        brain = grid_brain(resolve_template(pre.template, src), affine, list(vol.shape[1:]))
    out_label = None
    if label is not None:  # its geometry was checked against the scan's before anything was written
        lab, lab_aff, _, _ = load_source({"path": str(label)}, None)
        lab = lab[0]
        if reg is not None:
            from mrivq.data.align import to_template

            moved = to_template(lab, lab_aff, Registration.from_dict(reg), affine, list(vol.shape[1:]), nearest=True)
        else:
            from mrivq.data.align import resample

            moved = resample(lab, lab_aff, affine, list(vol.shape[1:]), nearest=True)
        out_label = out_dir / f"{output_name(label)}.nii.gz"
    arr = np.moveaxis(vol, 0, -1) if vol.shape[0] > 1 else vol[0]
    files = {"image": out_dir / f"{name}.nii.gz", "json": out_dir / f"{name}.json", "png": out_dir / f"{name}.png"}
    save_nifti(arr.astype(np.float32), affine, files["image"])
    if out_label is not None:
        save_nifti(np.rint(moved).astype(np.int16), affine, out_label)
    qc_montage(vol[0], brain, files["png"])
    record = {"input": str(src), "label": str(label) if label else None, "shape": list(vol.shape[1:]),
              "affine": affine.tolist(), "input_shape": ctx["shape"], "input_affine": ctx["affine"],
              "intensity": {"lo": ctx["lo"], "hi": ctx["hi"]}, "preprocess": pre.to_dict(),
              "registration": reg, "ctx": ctx}
    atomic_write_text(files["json"], json.dumps(record, indent=2) + "\n")
    return {"name": name, "passed": True if reg is None else bool(reg["passed"]),
            "why": "" if reg is None else reg.get("why", ""),
            "similarity": None if reg is None else reg["similarity"],
            "seconds": None if reg is None else reg["seconds"],
            "files": [str(p) for p in files.values()] + ([str(out_label)] if out_label else [])}


def preprocess_inputs(inputs: list[Path], out_dir: Path, pre: Preprocess, *, labels: list[Path] | None = None,
                      workers: int | None = None, progress: Any = None, overwrite: bool = False) -> list[dict]:
    """Preprocess each input into ``out_dir`` (see the module's docstring); returns one record per input
    (``name``, ``passed``, ``why``, ``similarity``, ``seconds``, ``files``), in input order.

    Everything is checked before anything is written: inputs exist, one label map per input, no two
    inputs with one output name, no output that exists (unless ``overwrite``). Each output file is
    written whole (under a temporary name, then renamed)."""
    pre.validate()
    inputs = [Path(p) for p in inputs]
    labels = [Path(p) for p in labels] if labels else None
    if not inputs:
        raise MrivqError("no input given; name one or more NIfTI files or DICOM folders")
    if labels is not None and len(labels) != len(inputs):
        raise MrivqError(f"--labels gives {len(labels)} label map(s) for {len(inputs)} input(s); give one per "
                         "input, in the same order")
    for p in inputs + (labels or []):
        if not p.exists():
            raise MrivqError(f"{p} does not exist; check the path")
    from mrivq.data.readers import is_image2d

    for p in inputs:
        if pre.dims == 3 and is_image2d(p):
            raise MrivqError(f"{p} is a 2D image but the model is 3D; give a NIfTI volume or DICOM folder")
    for scan, lab in zip(inputs, labels or [], strict=False):  # before anything is written
        (ss, sa), (ls, la) = _geometry(scan), _geometry(lab)
        if ss[:3] != ls[:3] or not np.allclose(sa, la, atol=1e-3):
            raise MrivqError(f"label map {lab} is {ls[:3]} voxels but its scan {scan} is {ss[:3]} (or their "
                             "affines differ); give the label map of that scan, in the same order as the scans")
    names = [output_name(p) for p in inputs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise MrivqError(f"two inputs would both write {sorted(dup)[0]}.nii.gz; rename one or preprocess them "
                         "into separate folders")
    if pre.register:  # a missing or unreadable template is refused before anything is written
        from mrivq.data.align import load_template, resolve_template

        for src in inputs:
            load_template(resolve_template(pre.template, src))
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise MrivqError(f"{out_dir} is a file; -o takes a folder")
    planned = [out_dir / f"{n}{ext}" for n in names for ext in (".nii.gz", ".json", ".png")]
    planned += [out_dir / f"{output_name(p)}.nii.gz" for p in (labels or [])]
    there = [p for p in planned if p.exists()]
    if there and not overwrite:
        raise MrivqError(f"{there[0]} already exists; choose another -o folder or pass --overwrite")
    out_dir.mkdir(parents=True, exist_ok=True)
    n = max(1, min(workers or (os.cpu_count() or 1), len(inputs)))
    task_cm = progress.task("preprocessing", total=len(inputs), unit="scan") if progress is not None else None
    results: list[dict | None] = [None] * len(inputs)
    with (task_cm if task_cm is not None else _Null()) as task, ThreadPoolExecutor(n) as pool:
        futures = {pool.submit(_one, src, labels[i] if labels else None, pre, out_dir): i
                   for i, src in enumerate(inputs)}
        for f in futures:
            results[futures[f]] = f.result()
            if task is not None:
                task.advance()
    return [r for r in results if r is not None]


def _geometry(path: Path) -> tuple[list[int], np.ndarray]:
    """(shape, affine) of an image, from the header alone where it is a NIfTI."""
    if path.name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        try:
            img = nib.load(str(path))
            return [int(s) for s in img.shape], np.asarray(img.affine, dtype=np.float64)
        except Exception:  # noqa: BLE001 - the reader below names what is wrong
            pass
    from mrivq.data.readers import load_source

    arr, aff, _, _ = load_source({"path": str(path)}, None)
    return [int(s) for s in arr.shape[1:]], np.asarray(aff, dtype=np.float64)


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return False
