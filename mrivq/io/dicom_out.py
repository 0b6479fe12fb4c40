"""Volumes out as DICOM series (MR Image Storage), for PACS viewers and DICOM tools.

One file per slice, written with pydicom. Geometry follows the standard (PS3.3 C.7.6.2.1.1): the
RAS affine is turned into LPS; ``ImageOrientationPatient`` is the direction of increasing column
(array axis 0) then of increasing row (axis 1); ``ImagePositionPatient`` of slice ``k`` is the world
position of voxel ``(0, 0, k)``; ``PixelSpacing`` is (row spacing, column spacing). Pixels are 16-bit
unsigned with ``RescaleSlope``/``RescaleIntercept`` spanning the volume's range, so values come back
within half a quantisation step. Every series is marked as generated: ``ImageType`` DERIVED\\SECONDARY,
``SyntheticData`` (0008,001C) YES, and a patient name and id that say so; UIDs are new per series.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

import numpy as np

from mrivq import __version__
from mrivq.utils.atomic import atomic_folder
from mrivq.utils.errors import MrivqError

PATIENT_NAME = "SYNTHETIC^MRIVQ"
FORMATS = ("nifti", "dicom", "both")


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise MrivqError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    return fmt


def check_series_folder(folder: Path, overwrite: bool) -> Path:
    """Refuse, before any work, a series folder that would replace something: an existing file, or a
    folder with anything but ``.dcm`` files (only those are replaced, and only with ``overwrite``)."""
    folder = Path(folder)
    if folder.exists() or folder.is_symlink():
        if not folder.is_dir() or folder.is_symlink():
            raise MrivqError(f"output {folder} exists and is not a folder; name a new folder for the DICOM series")
        entries = list(folder.iterdir())
        if entries and not overwrite:
            raise MrivqError(f"output folder {folder} is not empty; pass --overwrite or name a new folder")
        if any(not (e.is_file() and e.name.lower().endswith(".dcm")) for e in entries):
            raise MrivqError(f"output folder {folder} holds files other than a DICOM series; name a new folder")
    if not folder.parent.is_dir():
        raise MrivqError(f"output folder {folder.parent} does not exist; create it first")
    return folder


def _quantise(vol: np.ndarray) -> tuple[np.ndarray, float, float]:
    lo, hi = float(vol.min()), float(vol.max())
    slope = (hi - lo) / 65535.0 if hi > lo else 1.0
    stored = np.clip(np.rint((vol - lo) / slope), 0, 65535).astype(np.uint16)
    return stored, slope, lo


def _ds(v: float) -> str:
    """A decimal string (VR DS) of at most 16 characters."""
    s = f"{v:.10g}"
    return s if len(s) <= 16 else f"{v:.6e}"


def save_dicom_series(volume: np.ndarray, affine: np.ndarray, folder: str | os.PathLike, *,
                      description: str = "mrivq synthetic", series_number: int = 1,
                      patient_id: str = "SYNTHETIC", overwrite: bool = False) -> Path:
    """Write ``volume`` ([X, Y, Z], RAS ``affine`` as for NIfTI) as one DICOM series in ``folder``.

    The folder appears complete or not at all (:func:`mrivq.utils.atomic.atomic_folder`; with ``overwrite``,
    an existing series is replaced only after the new one is complete)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    vol = np.asarray(volume, dtype=np.float64)
    if vol.ndim == 4 and vol.shape[-1] == 1:
        vol = vol[..., 0]
    if vol.ndim != 3:
        raise MrivqError(f"a DICOM series holds one 3D volume; got an array of shape {vol.shape}")
    if not np.isfinite(vol).all():
        raise MrivqError("the volume holds NaN/Inf values; it cannot be written as DICOM")
    folder = check_series_folder(Path(folder), overwrite)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)
    dc, dr = float(np.linalg.norm(lps[:3, 0])), float(np.linalg.norm(lps[:3, 1]))
    row_dir, col_dir = lps[:3, 0] / dc, lps[:3, 1] / dr
    if abs(float(np.dot(row_dir, col_dir))) > 1e-4:
        raise MrivqError("the volume's first two voxel axes are not perpendicular (a sheared affine); DICOM "
                         "cannot store that: resample it (e.g. with MONAI's Spacingd) or write NIfTI")
    thickness = float(np.linalg.norm(lps[:3, 2]))
    stored, slope, intercept = _quantise(vol)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    now = _dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    centre, width = (float(vol.max()) + float(vol.min())) / 2, max(float(vol.max() - vol.min()), 1e-6)
    with atomic_folder(folder) as tmp:
        for k in range(vol.shape[2]):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = MRImageStorage
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta = meta
            ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
            ds.ImageType = ["DERIVED", "SECONDARY"]
            ds.SyntheticData = "YES"
            ds.Modality, ds.Manufacturer = "MR", "mrivq"
            ds.SoftwareVersions = __version__
            ds.PatientName, ds.PatientID = PATIENT_NAME, patient_id
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
            ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
            ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", int(series_number), k + 1
            ds.SeriesDescription = description[:64]
            ipp = lps[:3, 3] + k * lps[:3, 2]
            ds.ImagePositionPatient = [_ds(v) for v in ipp]
            ds.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
            ds.SliceLocation = _ds(float(np.dot(ipp, np.cross(row_dir, col_dir))))
            ds.PixelSpacing = [_ds(dr), _ds(dc)]
            ds.SliceThickness = ds.SpacingBetweenSlices = _ds(thickness)
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = _ds(slope), _ds(intercept), "US"
            ds.WindowCenter, ds.WindowWidth = _ds(centre), _ds(width)
            px = np.ascontiguousarray(stored[:, :, k].T)  # rows along axis 1, columns along axis 0
            ds.Rows, ds.Columns = px.shape
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
            ds.PixelData = px.tobytes()
            ds.save_as(tmp / f"IM{k + 1:04d}.dcm", enforce_file_format=True)
    return folder
