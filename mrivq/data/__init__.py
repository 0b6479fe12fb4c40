"""Manifest -> MONAI transforms -> datasets, and the way back to an input's own geometry.

This is the one place preprocessing lives. A :class:`Preprocess` (stored with every trained model)
fully describes it; the same transforms serve training (:func:`make_dataset`), single files
(:func:`preprocess_file`) and the inverse mapping (:func:`restore`).

Volumes (NIfTI, Analyze, DICOM series) go through::

    LoadSourcesd            mrivq.io.images.load_volume -> MetaTensor [C, *spatial] (affine set); later
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

Modules: :mod:`~mrivq.data.preprocess` (the :class:`~mrivq.data.preprocess.Preprocess` config),
:mod:`~mrivq.data.manifest` (reading, selecting and splitting manifest rows), :mod:`~mrivq.data.readers`
(reading one source), :mod:`~mrivq.data.transforms` (the MONAI transforms), :mod:`~mrivq.data.items`
(items -> MONAI data dicts), :mod:`~mrivq.data.datasets` (:func:`~mrivq.data.datasets.make_dataset`),
:mod:`~mrivq.data.intensity` (intensity statistics, generated outputs), :mod:`~mrivq.data.covariates`
(continuous covariates of a conditional prior), :mod:`~mrivq.data.restore` (back to an input's
geometry) and :mod:`~mrivq.data.split` (a run's train/validation split and its batches).
"""
