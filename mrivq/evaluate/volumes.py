"""Sets of volumes for evaluation, all through a run's own preprocessing so that samples and real
scans are compared on one grid.

A set is named by a spec:

- ``NAME[:SPLIT]``: a fetched dataset under the data root, ``SPLIT`` one of ``train``, ``val``
  (the run's own subject split, recomputed with its seed and fraction) or ``all`` (default);
- a folder of NIfTI files (``*.nii``, ``*.nii.gz``, ``*.hdr``);
- a folder of DICOM files: every image series in it (grouped by SeriesInstanceUID) is one volume.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mrivq.io.files import nifti_files
from mrivq.utils.errors import MrivqError

SPLITS = ("train", "val", "all")


@dataclass
class VolumeSet:
    """Volumes ``[N, C, *spatial]`` in [0, 1] on a run's grid, with a name per volume."""

    x: np.ndarray
    names: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.x)


def _transform_source(src: dict, name: str, pre: Any) -> np.ndarray:
    from monai.data import MetaTensor

    from mrivq.data.transforms import build_transforms, run_transforms

    d = run_transforms(build_transforms(pre, volumetric=True, for_dataset=False), {"image": [src], "subject": name})
    img = d["image"]
    return (img.as_tensor() if isinstance(img, MetaTensor) else img).float().numpy()


def _stack(arrays: list[np.ndarray], names: list[str], source: str, pre: Any) -> VolumeSet:
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:  # cannot happen with a fixed data.shape; without one, volumes pad differently
        raise MrivqError(f"{source}: the volumes preprocess to different grids ({sorted(shapes)[:2]}); "
                         f"evaluation needs a run with a fixed data.shape")
    x = np.stack(arrays).astype(np.float32)
    if x.ndim != pre.dims + 2:
        raise MrivqError(f"{source} gives {x.ndim - 2}D images but the run is {pre.dims}D")
    return VolumeSet(x, names, source)


def load_folder(folder: Path, pre: Any, progress: Any = None, what: str = "volumes",
                files: list[Path] | None = None) -> VolumeSet:
    """Every NIfTI file in ``folder`` (or else every DICOM series under it), preprocessed; ``files``:
    the NIfTI files already listed (by :func:`check_samples`)."""
    from mrivq.io.images import scan_dicom_series
    from mrivq.utils.progress import silent

    folder = Path(folder)
    files = nifti_files(folder) if files is None else files
    if files:
        srcs = [({"path": str(p)}, p.name) for p in files]
    else:
        series = scan_dicom_series(folder)
        if not series:
            raise MrivqError(f"{folder} holds no NIfTI files and no DICOM series; pass a folder of volumes")
        srcs = []
        for uid, entry in sorted(series.items()):
            desc = str(getattr(entry["header"], "SeriesDescription", "") or "").strip()
            srcs.append(({"path": str(folder), "series_uid": uid}, desc or uid))
    arrays, names = [], []
    with (progress or silent()).task(f"load {what}", total=len(srcs), unit="vol") as bar:
        for src, name in srcs:
            arrays.append(_transform_source(src, name, pre))
            names.append(name)
            bar.advance(1)
    return _stack(arrays, names, str(folder), pre)


def load_dataset(name: str, split: str, run: Any, root: Path | None, progress: Any = None,
                 splits: dict | None = None) -> VolumeSet:
    """A fetched dataset's ``split`` of the run's subject split, preprocessed like training.
    ``splits`` (data folder -> loaded split) lets ``phantom:val`` and ``phantom:train`` of one
    evaluation preprocess the dataset once."""
    from mrivq.data.split import load_split
    from mrivq.utils.paths import resolve_root

    if split not in SPLITS:
        raise MrivqError(f"split {split!r} of {name} is not one of {', '.join(SPLITS)}")
    own = Path(run.info.get("data_dir", ""))
    data_dir = own if name == run.info.get("dataset") and root is None and own.is_dir() else resolve_root(root) / name
    if not (data_dir / "manifest.csv").is_file():
        raise MrivqError(f"dataset {name!r} is not fetched under {data_dir.parent}; fetch it with `mrivq fetch "
                         f"{name}` or pass --root, a NIfTI folder or a DICOM folder")
    key = str(data_dir.resolve())
    sp = splits.get(key) if splits is not None else None
    if sp is None:
        sp = load_split(run.config, data_dir, progress=progress, subjects=run.info.get("split"))
        if splits is not None:
            splits[key] = sp
    parts = {"train": [sp.train], "val": [sp.val], "all": [sp.train, sp.val]}[split]
    arrays, names = [], []
    for ds in parts:
        for i in range(len(ds)):
            item = ds[i]
            arrays.append(np.asarray(item["image"], np.float32))
            names.append(str(item["subject"]))
    return _stack(arrays, names, f"{name}:{split}", run.preprocess)


def load_spec(spec: str, run: Any, root: Path | None = None, progress: Any = None, what: str = "volumes",
              splits: dict | None = None) -> VolumeSet:
    """A folder (NIfTI or DICOM) if ``spec`` names one, else ``NAME[:SPLIT]`` of a fetched dataset
    (``splits``: see :func:`load_dataset`)."""
    p = Path(spec)
    if p.is_dir():
        return load_folder(p, run.preprocess, progress, what)
    if p.exists():
        raise MrivqError(f"{spec} is a file; pass a folder of volumes or a dataset name such as phantom:val")
    name, _, split = spec.partition(":")
    if not name or "/" in name or "\\" in name:
        raise MrivqError(f"{spec} does not exist; pass a folder of volumes or a dataset name such as phantom:val")
    return load_dataset(name, split or "all", run, root, progress, splits)


def on_synth_grid(path: Path, run: Any) -> bool:
    """Whether NIfTI ``path`` is a sample written for ``run``'s grid: a synth sidecar beside it (which says
    how it was decoded) and the run's image shape and synth affine. Such volumes are read back exactly;
    any other (a real scan that happens to share the grid included) goes through the run's
    preprocessing, as real scans do."""
    import nibabel as nib

    from mrivq.data.intensity import synth_geometry
    from mrivq.inference.synth import read_sidecar

    side = read_sidecar(path)
    if not isinstance(side, dict) or "calibration" not in side:
        return False

    try:
        img = nib.load(str(path))
    except Exception as e:
        raise MrivqError(f"sample {path} cannot be read ({type(e).__name__}); remove it or re-synthesize") from None
    want = tuple(int(s) for s in run.info.get("image_shape") or ())
    shape = tuple(int(s) for s in img.shape[:3])
    return bool(want) and shape == want[:3] and np.allclose(img.affine, synth_geometry(run.preprocess, want), atol=1e-3)


def load_samples(folder: Path, run: Any, progress: Any = None) -> tuple[VolumeSet, dict]:
    """The samples in ``folder`` (NIfTI files, else DICOM series) on the run's grid: volumes ``mrivq synth``
    wrote for this grid are read back exactly (:func:`mrivq.inference.synth.read_sample`), any other (another model's
    samples, real scans) goes through the run's preprocessing. Returns the set and how many took each
    path (``{"synth_grid": n, "preprocessed": m}``)."""
    from mrivq.inference.synth import read_sample
    from mrivq.utils.progress import silent

    folder = Path(folder)
    if not folder.is_dir():
        raise MrivqError(f"samples folder {folder} does not exist; write samples with `mrivq synth --out {folder}`")
    files = nifti_files(folder)
    if not files:
        try:
            vs = load_folder(folder, run.preprocess, progress, "samples")
        except MrivqError:
            raise MrivqError(f"{folder} holds no NIfTI samples and no DICOM series; write some with "
                             f"`mrivq synth --out {folder}`") from None
        return vs, {"synth_grid": 0, "preprocessed": len(vs)}
    arrays, names, paths = [], [], {"synth_grid": 0, "preprocessed": 0}
    with (progress or silent()).task("load samples", total=len(files), unit="vol") as bar:
        for f in files:
            if on_synth_grid(f, run):  # as the decoder wrote it (not re-scaled by its own percentiles)
                arrays.append(read_sample(f, run)[0])
                paths["synth_grid"] += 1
            else:
                arrays.append(_transform_source({"path": str(f)}, f.name, run.preprocess))
                paths["preprocessed"] += 1
            names.append(f.name)
            bar.advance(1)
    return _stack(arrays, names, str(folder), run.preprocess), paths


def write_as_samples(x: np.ndarray, run: Any, folder: Path, prefix: str = "control",
                     calibration: str = "none") -> list[Path]:
    """Volumes ``[N, C, *grid]`` in [0, 1] written exactly as ``mrivq synth`` writes its samples (the run's
    intensity range and synth affine, a sidecar saying how they were decoded: ``calibration``, as
    :func:`mrivq.models.calibration.describe` says it), so that a control set takes the samples' path."""
    from mrivq.data.intensity import synth_geometry, to_intensity
    from mrivq.inference.synth import sample_intensity
    from mrivq.io.images import save_nifti
    from mrivq.runs.folder import write_json

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, v in enumerate(x):
        vol = to_intensity(v, sample_intensity(run, None))
        p = folder / f"{prefix}_{i:04d}.nii.gz"
        arr = np.moveaxis(vol, 0, -1) if vol.shape[0] > 1 else vol[0]
        save_nifti(arr, synth_geometry(run.preprocess, v.shape[1:]), p)
        write_json(p.with_name(f"{prefix}_{i:04d}.json"), {"calibration": calibration, "index": i})
        out.append(p)
    return out
