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

from mrivq.errors import MrivqError
from mrivq.io import NIFTI_SUFFIXES

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

    from mrivq.data import build_transforms
    from mrivq.data.transforms import _run

    d = _run(build_transforms(pre, volumetric=True, for_dataset=False), {"image": [src], "subject": name})
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


def nifti_files(folder: Path) -> list[Path]:
    """NIfTI/Analyze files directly in ``folder``, in natural order."""
    from mrivq.io import _natural

    ok = NIFTI_SUFFIXES + (".hdr", ".hdr.gz")
    return sorted((p for p in Path(folder).iterdir() if p.is_file() and p.name.lower().endswith(ok)),
                  key=lambda p: _natural(p.name))


def load_folder(folder: Path, pre: Any, progress: Any = None, what: str = "volumes",
                files: list[Path] | None = None) -> VolumeSet:
    """Every NIfTI file in ``folder`` (or else every DICOM series under it), preprocessed; ``files``:
    the NIfTI files already listed (by :func:`check_samples`)."""
    from mrivq.io import scan_dicom_series
    from mrivq.progress import silent

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
    from mrivq.paths import resolve_root
    from mrivq.train import load_split

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


def check_samples(folder: Path, run: Any) -> list[Path]:
    """The NIfTI samples in ``folder``; each must have the grid and voxel size the run synthesizes
    (samples of another run would otherwise be silently resampled into this one's grid)."""
    import nibabel as nib

    folder = Path(folder)
    if not folder.is_dir():
        raise MrivqError(f"samples folder {folder} does not exist; write samples with `mrivq synth --out {folder}`")
    files = nifti_files(folder)
    if not files:
        raise MrivqError(f"{folder} holds no NIfTI samples; write some with `mrivq synth --out {folder}`")
    want = tuple(int(s) for s in run.info.get("image_shape") or ())
    spacing = run.preprocess.spacing
    for f in files:
        try:
            hdr = nib.load(str(f)).header
        except Exception as e:
            raise MrivqError(f"sample {f} cannot be read ({type(e).__name__}); remove it or re-synthesize") from None
        shape = tuple(int(s) for s in hdr.get_data_shape()[:3])
        zooms = [float(z) for z in hdr.get_zooms()[:3]]
        if (want and shape != want) or (spacing and not np.allclose(zooms, spacing[:3], atol=1e-3)):
            raise MrivqError(f"sample {f.name} is {'x'.join(map(str, shape))} at {zooms} mm, but run "
                             f"{run.path.name} synthesizes {'x'.join(map(str, want))} at {spacing} mm; pass "
                             f"samples written by `mrivq synth --run {run.path}`")
    return files
