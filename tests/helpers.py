"""Helpers the tests share: the tiny model settings, the CLI run in-process, and image writers.

Fixtures live in ``conftest.py``; test files import only from here (and ``tests.httpserver``), never
from one another."""

from __future__ import annotations

import contextlib
import io
import json  # noqa: F401
import os
import random
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib  # noqa: F401
import numpy as np
import pydicom  # noqa: F401
from typer.testing import CliRunner

from mrivq.cli.app import app
from mrivq.utils.errors import MrivqError

TINY = [
    "--set", "data.spacing=[6.0,6.0,6.0]", "--set", "data.shape=[32,32,32]",
    # the array path: alignment has its own tests (tests/data/test_align.py) and costs a second per subject
    "--set", "data.register=null", "--set", "data.head_percentiles=false",
    "--set", "model.channels=[8,16]", "--set", "model.num_res_channels=[8,16]",
    "--set", "model.num_embeddings=32", "--set", "model.embedding_dim=4",
    "--set", "train.batch_size=2", "--set", "train.val_every=4", "--set", "train.ckpt_every=4",
    "--set", "train.warmup_steps=2", "--set", "train.threads=1",
    "--set", "prior.model.channels=8", "--set", "prior.model.num_layers=2",
    "--set", "prior.train.val_every=3", "--set", "prior.train.warmup_steps=1",
]



class Result:
    def __init__(self, exit_code: int, output: str) -> None:
        self.exit_code, self.output = exit_code, output



def invoke(*args: str) -> Result:
    """Run the CLI in-process; a MrivqError maps to exit code 2 as in `mrivq.cli.app.main`."""
    res = CliRunner().invoke(app, list(args))
    if isinstance(res.exception, MrivqError):
        return Result(2, res.output + str(res.exception))
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return Result(res.exit_code, res.output)


def oblique_affine() -> np.ndarray:
    """A RAS affine with rotation about an oblique axis and anisotropic voxels."""
    aff = np.eye(4)
    aff[:3, :3] = rotation([1, 2, 3], 0.4) @ np.diag([0.9, 1.1, 2.5])
    aff[:3, 3] = [10.0, -20.0, 30.0]
    return aff



def write_dicom_series(folder: Path, vol: np.ndarray, ras_affine: np.ndarray, *, slope: float = 0.5,
                       intercept: float = -100.0, series_uid: str | None = None, desc: str = "T1 oblique",
                       patient: str = "P001", shuffle: bool = True, prefix: str = "IM",
                       time_points: int = 1, scramble_instances: bool = True) -> str:
    """Write ``vol`` ([X, Y, Z] or [X, Y, Z, T]) as an MR series with the geometry of ``ras_affine``.

    Follows the DICOM standard directly: voxel (i, j, k) is column i, row j of slice k, at
    IPP_k + i * PixelSpacing[1] * row_dir + j * PixelSpacing[0] * col_dir in LPS; file names are
    shuffled, and so are InstanceNumbers unless ``scramble_instances=False``, so that order can only
    come from the positions.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ras_affine
    dc, dr = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    row_dir, col_dir = lps[:3, 0] / dc, lps[:3, 1] / dr
    series_uid = series_uid or generate_uid()
    study = generate_uid()
    if vol.ndim == 3:
        vol = vol[..., None]
    jobs = [(k, t) for k in range(vol.shape[2]) for t in range(time_points)]
    if shuffle:
        random.Random(0).shuffle(jobs)
    for n, (k, t) in enumerate(jobs):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.PatientName = "MR", patient, "Test^Patient"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesDescription = study, series_uid, desc
        ds.SeriesNumber = 1
        ds.InstanceNumber = n + 1 if scramble_instances else k * time_points + t + 1
        ds.TemporalPositionIdentifier = t + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in lps[:3, 3] + k * lps[:3, 2]]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in [*row_dir, *col_dir]]
        ds.PixelSpacing = [f"{dr:.6f}", f"{dc:.6f}"]
        ds.SliceThickness = f"{np.linalg.norm(lps[:3, 2]):.6f}"
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope}", f"{intercept}"
        px = np.rint((vol[:, :, k, t].T - intercept) / slope).astype(np.uint16)
        ds.Rows, ds.Columns = px.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = px.tobytes()
        path = folder / f"{prefix}{n:04d}.dcm"
        try:
            ds.save_as(path, enforce_file_format=True)  # pydicom >= 3
        except TypeError:  # pragma: no cover - pydicom 2.x
            ds.is_little_endian, ds.is_implicit_VR = True, False
            ds.save_as(path, write_like_original=False)
    return series_uid



def quantised_volume(shape, slope=0.5, intercept=-100.0, seed=0) -> np.ndarray:
    """Random values that survive the uint16 slope/intercept round trip exactly."""
    rng = np.random.default_rng(seed)
    stored = rng.integers(0, 4000, size=shape)
    return (stored * slope + intercept).astype(np.float32)


@dataclass
class Completed:
    """What a finished ``mrivq`` command left: like :class:`subprocess.CompletedProcess`."""

    returncode: int
    stdout: str
    stderr: str


def mrivq_main(*args: str, cwd: Path | None = None) -> Completed:
    """``mrivq ARGS`` in this process through the console entry point (:func:`mrivq.cli.app.main`): the
    same error boundary, messages and exit codes as the installed command, without starting Python
    again. Use a subprocess only where the process itself matters (signals, memory limits, torchrun)."""
    from mrivq.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    argv, here, show = sys.argv, Path.cwd(), warnings.showwarning
    code = 0
    try:
        sys.argv = ["mrivq", *args]
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            try:
                main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
        os.chdir(here)
        warnings.showwarning = show
    return Completed(code, out.getvalue(), err.getvalue())


def rotation(axis, angle: float) -> np.ndarray:
    a = np.asarray(axis, float)
    a /= np.linalg.norm(a)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
