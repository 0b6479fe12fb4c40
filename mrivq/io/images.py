"""Image files in and out: NIfTI / Analyze / DICOM readers, atomic NIfTI and PNG writers.

Every reader returns ``(array, affine)``: a float32 array with the spatial axes first (channels last
for 4D images, e.g. MSD multichannel volumes) and a 4x4 affine mapping voxel indices to RAS+ world
millimetres (the nibabel convention). Anything wrong with a file (missing, corrupt, truncated, not an
image, a folder with no or several DICOM series) raises :class:`~mrivq.utils.errors.ImageReadError` with one
line that names the path and says what to do.
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mrivq.io.files import NIFTI_SUFFIXES, iter_files
from mrivq.utils import limits
from mrivq.utils.atomic import atomic_write_bytes
from mrivq.utils.errors import ImageReadError

ANALYZE_SUFFIXES = (".hdr", ".img", ".hdr.gz", ".img.gz")
# DICOM to NIfTI world coordinates: DICOM patient space is LPS+, NIfTI/nibabel world space is RAS+.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


# ------------------------------------------------------------------------------------------ reading

def load_volume(path: str | os.PathLike, series_uid: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read an image as ``(float32 array, 4x4 RAS affine)``.

    ``path`` may be a NIfTI file (``.nii``, ``.nii.gz``), an Analyze pair (``.hdr`` or ``.img``), a
    folder holding one DICOM series (``series_uid`` picks one when it holds several) or one DICOM
    file (its whole series is read from the file's folder).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ImageReadError(f"{p}: no such file or folder; check the path (or fetch the dataset again)")
    if p.is_dir():
        arr, affine, _ = read_dicom_series(p, series_uid=series_uid)
        return checked_volume(p, arr, affine)
    name = p.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return checked_volume(p, *_read_nifti(p))
    if name.endswith(ANALYZE_SUFFIXES):
        return checked_volume(p, *_read_analyze(p))
    limits.regular_file(p)
    ds = _try_dicom_header(p)
    if ds is not None:
        uid = series_uid or str(getattr(ds, "SeriesInstanceUID", "") or "") or None
        arr, affine, _ = read_dicom_series(p.parent, series_uid=uid)
        return checked_volume(p, arr, affine)
    raise ImageReadError(f"{p}: not a NIfTI (.nii/.nii.gz), Analyze (.hdr/.img) or DICOM image; "
                         "pass an image file or a folder holding one DICOM series")


def checked_volume(p: Path, arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Refuse an unusable geometry (a non-finite or singular affine, voxels of zero size) and a volume
    with no finite voxel; a few NaN/Inf voxels are set to 0 with a warning naming the count, so that
    they neither spread through the network (one NaN makes the whole output NaN) nor pass silently."""
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.isfinite(aff).all():
        raise ImageReadError(f"{p}: its affine (voxel-to-world matrix) is not finite; fix the header's "
                             "qform/sform (e.g. with nibabel or fslorient)")
    zooms = np.sqrt((aff[:3, :3] ** 2).sum(0))
    if abs(np.linalg.det(aff[:3, :3])) < 1e-12 or (zooms < 1e-6).any():
        raise ImageReadError(f"{p}: its affine (voxel-to-world matrix) is singular (voxel sizes "
                             f"{', '.join(f'{z:.3g}' for z in zooms)} mm); fix the header's qform/sform or "
                             "pixdim")
    bad = ~np.isfinite(arr)
    n_bad = int(bad.sum())
    if n_bad:
        if n_bad == arr.size:
            raise ImageReadError(f"{p}: holds no finite voxel (all {arr.size} are NaN or Inf); check the file")
        import warnings

        arr = np.where(bad, np.float32(0), arr).astype(np.float32, copy=False)
        warnings.warn(f"{p}: {n_bad} of {arr.size} voxels are NaN or Inf; they were set to 0",
                      NonFiniteWarning, stacklevel=2)
    return arr, aff


class NonFiniteWarning(UserWarning):
    """An input held NaN/Inf voxels that were set to 0."""


def _to_channels_last(arr: np.ndarray) -> np.ndarray:
    """NIfTI shapes -> spatial axes first, channels last: [X,Y,Z,1,C] -> [X,Y,Z,C]; drop extra 1s."""
    if arr.ndim == 5 and arr.shape[3] == 1:  # NIfTI vector images keep components in dim 5
        arr = arr[:, :, :, 0, :]
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim > 4:
        raise ValueError(f"{arr.ndim}D data of shape {arr.shape} is not a 3D volume or a 4D multichannel one")
    return arr


def _nifti_header(p: Path, head: bytes) -> tuple[Any, Any, int]:
    """(image class, header, bytes the header says the file holds) from a NIfTI file's first bytes."""
    import nibabel as nib

    if len(head) < 4:
        raise ImageReadError(f"{p}: is empty or truncated; delete it and fetch or copy it again")
    sizeof_hdr = int.from_bytes(head[:4], "little")
    if sizeof_hdr not in (348, 540):
        sizeof_hdr = int.from_bytes(head[:4], "big")
    klass = {348: nib.Nifti1Image, 540: nib.Nifti2Image}.get(sizeof_hdr)
    if klass is None:
        raise ImageReadError(f"{p}: is not a NIfTI image (bad header); check that the file is an image")
    if len(head) < sizeof_hdr:
        raise ImageReadError(f"{p}: is truncated inside its header; delete it and fetch or copy it again")
    try:
        hdr = klass.header_class.from_fileobj(io.BytesIO(head))
        shape = hdr.get_data_shape()
        itemsize = hdr.get_data_dtype().itemsize
        offset = int(hdr.get_data_offset())
    except Exception as e:  # nibabel raises many kinds (HeaderDataError, ValueError, ...)
        raise ImageReadError(f"{p}: is not a readable NIfTI image ({_short(e)}); check or replace the "
                             "file") from None
    check_header(p, hdr)
    # the float32 array and the raw data both live in memory while the image is converted
    limits.check_voxels(str(p), shape, itemsize=4 + itemsize, why="its header declares ")
    return klass, hdr, offset + int(np.prod(shape, dtype=np.int64)) * itemsize


def check_header(p: Path, hdr: Any) -> None:
    """Refuse what a NIfTI/Analyze header declares but mrivq cannot use: complex voxels (a magnitude
    would be a guess between modulus and real part), and an sform whose code says it is valid but whose
    rows are all zeros (nibabel would hand on a zero affine)."""
    if np.dtype(hdr.get_data_dtype()).kind == "c":
        raise ImageReadError(f"{p}: holds complex voxels ({np.dtype(hdr.get_data_dtype()).name}); write the "
                             "magnitude (or real part) as a real-valued image first")
    try:
        code = int(hdr["sform_code"])
        rows = np.stack([np.asarray(hdr[k], dtype=np.float64) for k in ("srow_x", "srow_y", "srow_z")])
    except (KeyError, ValueError):  # Analyze headers have no sform
        return
    if code > 0 and not rows[:, :3].any():
        raise ImageReadError(f"{p}: its sform is all zeros although sform_code={code} says it is valid; set "
                             "sform_code to 0 (use the qform) or write a valid sform (e.g. with nibabel or "
                             "fslorient)")


def _read_nifti(p: Path) -> tuple[np.ndarray, np.ndarray]:
    limits.regular_file(p)
    try:
        if p.name.lower().endswith(".gz"):
            # Decompress only as much as the header declares: gzip checks the CRC and length in the
            # trailer, so a truncated download fails here rather than loading as a partly zero volume,
            # and a gzip bomb stops at the declared size.
            try:
                with limits.GzipReader(p) as gz:
                    klass, hdr, need = _nifti_header(p, gz.head(544))
                    raw = gz.upto(need)
            except (EOFError, OSError, zlib.error) as e:
                what = "truncated" if isinstance(e, EOFError) else f"not valid gzip ({_short(e)})"
                raise ImageReadError(f"{p}: is {what}; delete it and fetch or copy it again") from None
        else:
            with open(p, "rb") as f:
                klass, hdr, need = _nifti_header(p, f.read(544))
                f.seek(0)
                raw = f.read(need + limits.GZIP_SLACK)
    except OSError as e:
        raise ImageReadError(f"{p}: cannot be read ({e.strerror or e}); check its permissions") from None
    if len(raw) < need:
        raise ImageReadError(f"{p}: is truncated ({len(raw)} of {need} bytes); delete it and fetch "
                             "or copy it again")
    try:
        img = klass.from_bytes(raw)
        arr = _to_channels_last(np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32))
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as e:  # nibabel raises many kinds (HeaderDataError, ValueError, ...)
        raise ImageReadError(f"{p}: is not a readable NIfTI image ({_short(e)}); check or replace the "
                             "file") from None
    return arr, affine


def _read_analyze(p: Path) -> tuple[np.ndarray, np.ndarray]:
    """Analyze 7.5 / NIfTI pairs (OASIS ships ``.hdr`` + ``.img``)."""
    import nibabel as nib

    low = p.name.lower()
    gz = ".gz" if low.endswith(".gz") else ""
    stem = p.name[: len(p.name) - len(gz) - 4]
    for ext in (".hdr", ".img"):
        # The pair may differ in case (.HDR/.img); nibabel looks for the exact spelling.
        cands = [q for q in (p.with_name(stem + ext + gz), p.with_name(stem + ext.upper() + gz)) if q.exists()]
        if not cands:
            raise ImageReadError(f"{p}: the Analyze pair is incomplete ({stem}{ext}{gz} is missing); "
                                 "keep the .hdr and .img files together")
    for q in (p.with_name(stem + ".hdr" + gz), p.with_name(stem + ".img" + gz)):
        if q.exists():
            limits.regular_file(q)
    try:
        img = nib.load(str(p))
        hdr = img.header
        check_header(p, hdr)
        limits.check_voxels(str(p), hdr.get_data_shape(), itemsize=4 + hdr.get_data_dtype().itemsize,
                            why="its header declares ")
        arr = np.asarray(img.dataobj)  # raises if the .img is shorter than the header says
        need = int(np.prod(hdr.get_data_shape(), dtype=np.int64))
        if arr.size != need:
            raise ValueError("data shorter than the header says")
        arr = _to_channels_last(np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32))
        affine = np.asarray(img.affine, dtype=np.float64)
    except ImageReadError:
        raise
    except Exception as e:
        raise ImageReadError(f"{p}: is not a readable Analyze image ({_short(e)}); check that the .hdr/.img "
                             "pair is complete") from None
    return arr, affine


def _short(e: BaseException) -> str:
    s = " ".join(str(e).split())
    return (s[:160] + "...") if len(s) > 160 else (s or type(e).__name__)


# -------------------------------------------------------------------------------------------- DICOM

def _try_dicom_header(p: Path) -> Any | None:
    """The header of a DICOM file (no pixels), or None for anything that is not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(p), stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError, AttributeError):
        return None
    except Exception:  # pydicom raises assorted errors on garbage; such a file is simply not DICOM
        return None


def _floats(v: Any, n: int) -> np.ndarray | None:
    try:
        a = np.array([float(x) for x in v], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return a if a.shape == (n,) else None


class _Frame:
    """One 2D image of a series: a classic single-frame file, or one frame of an enhanced file."""

    __slots__ = ("path", "frame", "ipp", "iop", "spacing", "slope", "intercept", "order", "shape")

    def __init__(self, path: Path, frame: int | None, ipp, iop, spacing, slope, intercept, order, shape):
        self.path, self.frame, self.ipp, self.iop, self.spacing = path, frame, ipp, iop, spacing
        self.slope, self.intercept, self.order, self.shape = slope, intercept, order, shape


def _group_attr(fg: Any, seq: str, attr: str) -> Any:
    s = getattr(fg, seq, None)
    if not s:
        return None
    return getattr(s[0], attr, None)


def _frames_of(path: Path, ds: Any) -> list[_Frame]:
    """Geometry of each 2D frame in one DICOM file (empty if the file is not a positioned image)."""
    rows, cols = getattr(ds, "Rows", None), getattr(ds, "Columns", None)
    if not rows or not cols:
        return []
    shape = (int(rows), int(cols), int(getattr(ds, "SamplesPerPixel", 1) or 1))
    nframes = int(getattr(ds, "NumberOfFrames", 1) or 1)
    per = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
    if nframes > 1 and per:  # enhanced multi-frame: geometry lives in functional groups
        shared = (getattr(ds, "SharedFunctionalGroupsSequence", None) or [None])[0]
        out = []
        for i, fg in enumerate(per):
            def get(seq: str, attr: str, fg=fg) -> Any:
                v = _group_attr(fg, seq, attr)
                return v if v is not None or shared is None else _group_attr(shared, seq, attr)
            ipp = _floats(get("PlanePositionSequence", "ImagePositionPatient") or [], 3)
            iop = _floats(get("PlaneOrientationSequence", "ImageOrientationPatient") or [], 6)
            sp = _floats(get("PixelMeasuresSequence", "PixelSpacing") or [], 2)
            if ipp is None or iop is None or sp is None:
                return []
            slope = get("PixelValueTransformationSequence", "RescaleSlope")
            icpt = get("PixelValueTransformationSequence", "RescaleIntercept")
            tpos = get("FrameContentSequence", "TemporalPositionIndex") or 0
            out.append(_Frame(path, i, ipp, iop, sp, float(slope if slope is not None else 1.0),
                              float(icpt if icpt is not None else 0.0), (int(tpos), i), shape))
        return out
    ipp = _floats(getattr(ds, "ImagePositionPatient", None) or [], 3)
    iop = _floats(getattr(ds, "ImageOrientationPatient", None) or [], 6)
    sp = _floats(getattr(ds, "PixelSpacing", None) or [], 2)
    if ipp is None or iop is None:
        return []
    if sp is None:
        sp = np.ones(2)
    slope = getattr(ds, "RescaleSlope", None)
    icpt = getattr(ds, "RescaleIntercept", None)
    # Order among frames sharing one position (time points, echoes): acquisition, then instance.
    order = tuple(int(getattr(ds, k, 0) or 0) for k in
                  ("TemporalPositionIdentifier", "AcquisitionNumber", "EchoNumbers", "InstanceNumber"))
    return [_Frame(path, None, ipp, iop, sp, float(slope if slope is not None else 1.0),
                   float(icpt if icpt is not None else 0.0), order, shape)]


def _dicom_files(folder: Path) -> Iterator[Path]:
    for p in iter_files(folder):
        if p.name.upper() == "DICOMDIR":
            continue
        yield p


def scan_dicom_series(folder: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Group the DICOM files under ``folder`` (recursively) by SeriesInstanceUID.

    Returns ``{uid: {"files": [Path, ...], "header": first header, "frames": [...]}}`` for series whose
    images carry a position and orientation (localizer-less secondary captures are left out).
    """
    series: dict[str, dict[str, Any]] = {}
    for p in _dicom_files(Path(folder)):
        ds = _try_dicom_header(p)
        if ds is None or not hasattr(ds, "SeriesInstanceUID"):
            continue
        frames = _frames_of(p, ds)
        if not frames:
            continue
        uid = str(ds.SeriesInstanceUID)
        entry = series.setdefault(uid, {"files": [], "header": ds, "frames": []})
        entry["files"].append(p)
        entry["frames"].extend(frames)
    return series


def _describe(uid: str, entry: dict[str, Any]) -> str:
    desc = str(getattr(entry["header"], "SeriesDescription", "") or "").strip()
    return f"{uid}" + (f" '{desc}'" if desc else "") + f" ({len(entry['frames'])} images)"


def read_dicom_series(folder: str | os.PathLike, series_uid: str | None = None
                      ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read one DICOM series into ``(float32 array, RAS affine, meta)``.

    Voxel ``[i, j, k]`` is column ``i`` and row ``j`` of the ``k``-th slice, slices ordered along the
    slice normal (row direction x column direction), so the affine is the one dcm2niix/nibabel give
    before any reorientation: ``LPS->RAS @ [row_dir*dc | col_dir*dr | slice_step | first position]``.
    Rescale slope/intercept are applied per slice. Several images at each position (time points,
    echoes) become a 4D array, channels last. ``meta`` has ``series_uid``, ``patient_id``,
    ``series_description``, ``modality``, ``spacing``, ``shape`` and ``n_files``.
    """
    import pydicom

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ImageReadError(f"{folder}: is not a folder; pass the folder holding the DICOM series")
    series = scan_dicom_series(folder)
    if not series:
        n = sum(1 for _ in iter_files(folder))
        what = "is empty" if n == 0 else f"holds {n} file(s) but no DICOM image with a position"
        raise ImageReadError(f"{folder}: {what}; point at a folder holding one DICOM series (or pass a "
                             "NIfTI file)")
    if series_uid is not None:
        if series_uid not in series:
            raise ImageReadError(f"{folder}: has no DICOM series {series_uid}; it holds "
                                 + "; ".join(_describe(u, e) for u, e in sorted(series.items())[:5]))
        uid = series_uid
    elif len(series) > 1:
        listed = "; ".join(_describe(u, e) for u, e in sorted(series.items())[:5])
        more = f"; and {len(series) - 5} more" if len(series) > 5 else ""
        raise ImageReadError(f"{folder}: holds {len(series)} DICOM series ({listed}{more}); pick one with "
                             "series_uid=<uid> (the manifest's series_uid column)")
    else:
        uid = next(iter(series))
    entry = series[uid]
    frames: list[_Frame] = entry["frames"]
    hdr = entry["header"]

    iop = frames[0].iop
    if any(f.shape != frames[0].shape for f in frames):
        raise ImageReadError(f"{folder}: series {uid} mixes image sizes; it is not one volume")
    if any(np.abs(f.iop - iop).max() > 1e-3 for f in frames):
        raise ImageReadError(f"{folder}: series {uid} mixes slice orientations (e.g. a 3-plane localizer); "
                             "it is not one volume, pick another series")
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    # Group images by position along the normal; several per position = time points / echoes.
    proj = np.array([float(f.ipp @ normal) for f in frames])
    order = np.argsort(proj, kind="stable")
    positions: list[list[_Frame]] = []
    last = None
    same_pos = 0.01  # mm: positions closer than this are one slice (DS strings are rounded)
    for idx in order:
        if last is None or proj[idx] - last > same_pos:
            positions.append([])
        positions[-1].append(frames[idx])
        last = proj[idx]
    counts = {len(g) for g in positions}
    if len(counts) != 1:
        raise ImageReadError(f"{folder}: series {uid} has an uneven number of images per slice position "
                             "(files missing?); copy the whole series again")
    nvol = counts.pop()
    for g in positions:
        g.sort(key=lambda f: f.order)
    nz = len(positions)
    firsts = [g[0] for g in positions]
    spacing_rc = firsts[0].spacing  # [row spacing (between rows), column spacing (between columns)]
    if nz > 1:
        gaps = np.diff([float(f.ipp @ normal) for f in firsts])
        med = float(np.median(gaps))
        if med <= 0 or np.abs(gaps - med).max() > 0.1 * med + 1e-3:
            raise ImageReadError(f"{folder}: series {uid} has unevenly spaced slices (gaps "
                                 f"{gaps.min():.3g} to {gaps.max():.3g} mm; files missing?); copy the whole "
                                 "series again")
        step = (firsts[-1].ipp - firsts[0].ipp) / (nz - 1)  # keeps gantry tilt as a shear, like dcm2niix
    else:
        thick = getattr(hdr, "SpacingBetweenSlices", None) or getattr(hdr, "SliceThickness", None) or 1.0
        step = normal * float(thick)
    aff = np.eye(4)
    aff[:3, 0] = row_dir * spacing_rc[1]
    aff[:3, 1] = col_dir * spacing_rc[0]
    aff[:3, 2] = step
    aff[:3, 3] = firsts[0].ipp
    affine = LPS_TO_RAS @ aff

    rows, cols, spp = frames[0].shape
    shape = (cols, rows, nz) + ((nvol,) if nvol > 1 else ()) + ((spp,) if spp > 1 else ())
    if nvol > 1 and spp > 1:
        raise ImageReadError(f"{folder}: series {uid} is a colour time series; that is not supported")
    # the headers' Rows x Columns x images, checked before any pixel data is decoded
    limits.check_voxels(f"{folder}: series {uid}", shape, itemsize=8, why="its headers declare ")
    out = np.empty(shape, dtype=np.float32)
    cache: dict[Path, np.ndarray] = {}
    for k, g in enumerate(positions):
        for t, f in enumerate(g):
            px = _pixels(f, cache, pydicom)
            img = px.T if px.ndim == 2 else px.transpose(1, 0, 2)
            img = img.astype(np.float32) * np.float32(f.slope) + np.float32(f.intercept)
            if nvol > 1:
                out[:, :, k, t] = img
            else:
                out[:, :, k] = img
    meta = {
        "series_uid": uid,
        "patient_id": str(getattr(hdr, "PatientID", "") or ""),
        "series_description": str(getattr(hdr, "SeriesDescription", "") or ""),
        "modality": str(getattr(hdr, "Modality", "") or ""),
        "spacing": (float(spacing_rc[1]), float(spacing_rc[0]), float(np.linalg.norm(step))),
        "shape": tuple(int(s) for s in out.shape),
        "n_files": len(entry["files"]),
    }
    return out, affine, meta


def _pixels(f: _Frame, cache: dict[Path, np.ndarray], pydicom: Any) -> np.ndarray:
    """Raw pixel data of one frame (multi-frame files are decoded once)."""
    try:
        if f.frame is None:
            return pydicom.dcmread(str(f.path)).pixel_array
        if f.path not in cache:
            cache[f.path] = pydicom.dcmread(str(f.path)).pixel_array
        return cache[f.path][f.frame]
    except Exception as e:
        msg = _short(e)
        hint = ("install a decoder for its compressed transfer syntax (pip install pylibjpeg "
                "pylibjpeg-libjpeg pylibjpeg-openjpeg)") if "decod" in msg.lower() or "handler" in msg.lower() \
            else "copy the series again"
        raise ImageReadError(f"{f.path}: pixel data cannot be read ({msg}); {hint}") from None


# ------------------------------------------------------------------------------------------ writing

def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> Path:
    """Write ``array`` (spatial axes first, channels last for 4D) as float32 NIfTI, atomically.

    The file appears complete or not at all (temporary file in the same folder, then ``os.replace``).
    ``.nii.gz`` names are compressed. qform and sform both carry ``affine`` (code 1, like dcm2niix).
    """
    import nibabel as nib

    path = Path(path)
    name = path.name.lower()
    if not name.endswith(NIFTI_SUFFIXES):
        raise ImageReadError(f"{path}: a NIfTI output needs a .nii or .nii.gz name")
    arr = np.asarray(array, dtype=np.float32)
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {aff.shape}")
    img = nib.Nifti1Image(arr, aff)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    data = img.to_bytes()
    if name.endswith(".gz"):
        data = gzip.compress(data, compresslevel=6, mtime=0)
    return atomic_write_bytes(path, data)


def to_uint8(array: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Scale an image to uint8.

    uint8 is kept; bool becomes 0/255. Otherwise ``[vmin, vmax]`` maps to ``[0, 255]``; when not given,
    data already within [0, 1] (previews, decoded samples) use [0, 1] so intensities stay comparable
    between images, and anything else is min-max scaled over its finite values.
    """
    a = np.asarray(array)
    if a.dtype == np.uint8 and vmin is None and vmax is None:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    f = a.astype(np.float64)
    finite = np.isfinite(f)
    if vmin is None or vmax is None:
        if not finite.any():
            lo, hi = 0.0, 1.0
        else:
            lo, hi = float(f[finite].min()), float(f[finite].max())
            if lo >= 0.0 and hi <= 1.0:
                lo, hi = 0.0, 1.0
        vmin = lo if vmin is None else vmin
        vmax = hi if vmax is None else vmax
    span = float(vmax) - float(vmin)
    f = np.where(finite, f, float(vmin))
    scaled = (f - float(vmin)) / span if span > 0 else np.zeros_like(f)
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


def save_png(array: np.ndarray, path: str | os.PathLike, vmin: float | None = None,
             vmax: float | None = None) -> Path:
    """Write a 2D (H, W) or colour (H, W, 3|4) image as PNG, atomically, scaled by :func:`to_uint8`."""
    from PIL import Image

    path = Path(path)
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise ValueError(f"save_png needs an (H, W) or (H, W, 3|4) array, got shape {a.shape}")
    img = Image.fromarray(np.ascontiguousarray(to_uint8(a, vmin, vmax)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())





