"""Manifest -> MONAI transforms -> datasets, and the way back to an input's own geometry.

This is the one place preprocessing lives. A :class:`Preprocess` (stored with every trained model)
fully describes it; the same transforms serve training (:func:`make_dataset`), single files
(:func:`preprocess_file`) and the inverse mapping (:func:`restore`).

Volumes (NIfTI, Analyze, DICOM series) go through::

    LoadSourcesd            mrivq.io.load_volume -> MetaTensor [C, *spatial] (affine set); later
                            modalities resampled onto the first one's grid
    Orientationd            to ``pre.orientation`` (RAS)
    Spacingd                to ``pre.spacing`` mm, bilinear (skipped when None)
    ScalePercentilesd       per channel [p_lo, p_hi] percentiles -> [0, 1], lo/hi recorded (invertible)
    ResizeWithPadOrCropd    to ``pre.shape`` (centred)  |  DivisiblePadd(k=divisible_by)
    EnsureTyped, SelectItemsd

2D arrays (MNIST IDX, CIFAR pickles; rows with an ``index``) take a vectorised path: the arrays are
read once per file, scaled by 1/255 and padded/cropped with the same index mapping MONAI would use.
With ``pre.dims == 2`` on volumetric data every subject gives ``slices_per_volume`` central slices
along ``slice_axis`` (after orientation, so axis 2 = axial for RAS).

:func:`restore` inverts everything with MONAI's invertible-transform machinery (the applied
operations are kept, JSON-encoded, in the ``ctx`` dict), falling back to one direct resampling from
the preprocessed grid onto the original one when the recorded operations can't be replayed.

The code is split by responsibility: :mod:`~mrivq.data.preprocess` (the :class:`Preprocess`
config), :mod:`~mrivq.data.manifest` (reading, selecting and splitting manifest rows),
:mod:`~mrivq.data.readers` (reading one source), :mod:`~mrivq.data.transforms` (the MONAI
transforms), :mod:`~mrivq.data.items` (items -> MONAI data dicts), :mod:`~mrivq.data.datasets`
(:func:`make_dataset`), :mod:`~mrivq.data.intensity` (intensity statistics, generated outputs),
:mod:`~mrivq.data.covariates` (continuous covariates of a conditional prior) and
:mod:`~mrivq.data.restore` (single files and the way back). Every name is re-exported here, so
``from mrivq.data import X`` and ``mrivq.data.X`` work as before the split.
"""

from __future__ import annotations

from mrivq.data.covariates import fit_covariates, parse_covariates, standardise, subject_covariates
from mrivq.data.datasets import (
    _ADV_LOCK,
    ArrayDataset,
    VolumeDataset,
    _CacheDataset,
    _NullTask,
    _progress_task,
    _scale_np,
    make_dataset,
)
from mrivq.data.intensity import _abs, _stats_of, dataset_intensity_stats, intensity_range, synth_geometry, to_intensity
from mrivq.data.items import _LOHI_MEMO, DATA_VERSION, _data_items, _item_kind, _label, _memo_key, _stamp
from mrivq.data.manifest import (
    _EXTRAS,
    _SPLIT_TRAIN,
    _SPLIT_VAL,
    _is_grouped,
    _natural,
    _source_of,
    condition_items,
    load_manifest,
    pool_rows,
    select_rows,
    split_subjects,
)
from mrivq.data.preprocess import Preprocess, _axis_of, _is_num, _round_up
from mrivq.data.readers import (
    _ARRAYS,
    _ARRAYS_LOCK,
    _IMAGE_SUFFIXES,
    _array_kind,
    _input_dtype,
    _is_image2d,
    _load_source,
    _read_image2d,
    read_array_file,
)
from mrivq.data.restore import (
    CTX_VERSION,
    _from_json,
    _restore_monai,
    _restore_resample,
    _to_json,
    _with_identity_scaling,
    preprocess_file,
    restore,
    slices_to_volume,
    to_input_dtype,
    volume_to_slices,
)
from mrivq.data.transforms import (
    _RAS_LABELS,
    CentralSlicesd,
    LoadSourcesd,
    ScalePercentilesd,
    _pad_crop,
    _pad_crop_map,
    _run,
    _unwrap_error,
    _volumetric_pixdim,
    build_transforms,
    central_slices,
)

# Private names too: modules and tests reach some as ``data._X`` (e.g. ``_ARRAYS``, ``_label``).
__all__ = [
    "fit_covariates",
    "parse_covariates",
    "standardise",
    "subject_covariates",
    "VolumeDataset",
    "ArrayDataset",
    "make_dataset",
    "dataset_intensity_stats",
    "intensity_range",
    "to_intensity",
    "synth_geometry",
    "DATA_VERSION",
    "load_manifest",
    "select_rows",
    "pool_rows",
    "condition_items",
    "split_subjects",
    "Preprocess",
    "read_array_file",
    "CTX_VERSION",
    "preprocess_file",
    "volume_to_slices",
    "slices_to_volume",
    "restore",
    "to_input_dtype",
    "LoadSourcesd",
    "ScalePercentilesd",
    "CentralSlicesd",
    "central_slices",
    "build_transforms",
    "_scale_np",
    "_CacheDataset",
    "_ADV_LOCK",
    "_NullTask",
    "_progress_task",
    "_stats_of",
    "_abs",
    "_item_kind",
    "_stamp",
    "_data_items",
    "_label",
    "_LOHI_MEMO",
    "_memo_key",
    "_SPLIT_TRAIN",
    "_SPLIT_VAL",
    "_EXTRAS",
    "_is_grouped",
    "_natural",
    "_source_of",
    "_is_num",
    "_axis_of",
    "_round_up",
    "_IMAGE_SUFFIXES",
    "_ARRAYS",
    "_ARRAYS_LOCK",
    "_array_kind",
    "_read_image2d",
    "_is_image2d",
    "_input_dtype",
    "_load_source",
    "_to_json",
    "_from_json",
    "_with_identity_scaling",
    "_restore_monai",
    "_restore_resample",
    "_RAS_LABELS",
    "_volumetric_pixdim",
    "_pad_crop",
    "_unwrap_error",
    "_run",
    "_pad_crop_map",
]
