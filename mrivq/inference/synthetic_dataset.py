"""Synthetic volumes as a dataset for downstream training: mix a run's samples with real data in a
MONAI pipeline (``torch.utils.data.ConcatDataset([real, SyntheticDataset(run, 100)])``).

Item ``i`` is the ``i``-th sample of ``seed``: the same code grid as ``mrivq synth --seed SEED``'s
``synth_{i:04d}`` (drawn on its own with :func:`mrivq.inference.sampling.sample_tokens`'s ``first``), decoded on
the fly, so an item never depends on which other items were asked for, on the order, on the number of
DataLoader workers or on the pass. With ``folder`` the items are read from volumes ``mrivq synth``
wrote instead (their sidecars give the class), for when sampling on the fly costs too much.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mrivq.utils.errors import MrivqError


class SyntheticDataset(Dataset):
    """``{"image": MetaTensor[C, *spatial] (with its affine), "class": int, "index": i, "seed": s}``;
    ``class`` is -1 for an unconditional prior (an int always, so default collation batches it).

    Args:
        run: a trained run folder (its prior samples the codes, its VQ-VAE decodes them), or a MONAI
            bundle that ``mrivq export`` wrote.
        num_samples: items (with ``folder``: at most the volumes there).
        seed, temperature, top_k: as ``mrivq synth``.
        cls: one class of a class-conditional prior for every item (default: the classes in turn, as
            ``mrivq synth``); ``covariates``: ``{"age": 60}`` for a prior with covariates.
        intensity: ``"scaled"`` (0-1, what the model and mrivq's training transforms give real scans)
            or ``"original"`` (the training data's units, as ``mrivq synth`` writes).
        folder: read pre-synthesized volumes (``synth_0000.nii.gz`` ...) instead of sampling.
        transform: applied to each item dictionary (a MONAI ``Compose`` of dictionary transforms).
        device: where to sample and decode (default CPU: DataLoader workers are CPU processes).

    The run is loaded lazily, once per process, so the dataset pickles cheaply into workers.
    """

    def __init__(self, run: str | Path, num_samples: int, *, seed: int = 0, temperature: float = 1.0,
                 top_k: int | None = None, cls: str | int | None = None,
                 covariates: dict[str, float] | None = None, intensity: str = "scaled",
                 folder: str | Path | None = None, transform: Any = None, device: str = "cpu") -> None:
        from mrivq.inference.bundle import is_bundle
        from mrivq.runs.folder import resolve_run

        if int(num_samples) < 1:
            raise MrivqError(f"num_samples must be at least 1, got {num_samples}")
        if intensity not in ("scaled", "original"):
            raise MrivqError(f"intensity {intensity!r} is not one of scaled, original")
        self.bundle = is_bundle(run)
        self.run_dir = Path(run) if self.bundle else resolve_run(run)
        self.n, self.seed, self.temperature, self.top_k = int(num_samples), int(seed), float(temperature), top_k
        self.cls, self.covariates, self.intensity = cls, covariates, intensity
        self.transform, self.device = transform, device
        self.files: list[Path] | None = None
        if folder is not None:
            from mrivq.io.files import nifti_files

            folder = Path(folder)
            if not folder.is_dir():
                raise MrivqError(f"folder {folder} does not exist; write samples with `mrivq synth --out {folder}`")
            files = [p for p in nifti_files(folder) if p.name.startswith("synth_")]
            if len(files) < self.n:
                raise MrivqError(f"{folder} holds {len(files)} samples, fewer than num_samples={self.n}; "
                                 f"synthesize more with `mrivq synth --count {self.n} --out {folder}`")
            self.files = files[: self.n]
        self._run: Any = None

    def __len__(self) -> int:
        return self.n

    def _load(self) -> Any:
        if self._run is None:
            from mrivq.inference.bundle import load_bundle
            from mrivq.runs.run import load_run

            dev = torch.device(self.device)
            self._run = load_bundle(self.run_dir, dev) if self.bundle else \
                load_run(self.run_dir, device=dev, need_prior=self.files is None)
        return self._run

    def _class(self, r: Any, i: int) -> int | None:
        n_classes = getattr(r.prior, "num_classes", None) if r.prior is not None else None
        cid = r.class_id(self.cls)
        if cid is not None:
            return cid
        return i % n_classes if n_classes is not None else None

    def _sample(self, r: Any, i: int) -> tuple[np.ndarray, int | None]:
        from mrivq.inference.sampling import sample_tokens

        c = self._class(r, i)
        dev = torch.device(self.device)
        cond, _ = r.condition(None if c is None else torch.tensor([c], device=dev), self.covariates, 1, dev)
        tokens = sample_tokens(r.prior, r.latent_shape, 1, temperature=self.temperature, top_k=self.top_k,
                               seed=self.seed, cond=cond, first=i)
        x = r.decode(tokens)[0].cpu().numpy()
        return x, c

    def _read(self, r: Any, i: int) -> tuple[np.ndarray, int | None]:
        from mrivq.inference.synth import read_sample

        assert self.files is not None
        return read_sample(self.files[i], r)

    def __getitem__(self, i: int) -> dict:
        from monai.data import MetaTensor

        from mrivq.data.intensity import synth_geometry, to_intensity
        from mrivq.inference.synth import sample_intensity

        i = int(i)
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} is out of range for {self.n} synthetic samples")
        i %= self.n
        r = self._load()
        x, c = self._read(r, i) if self.files is not None else self._sample(r, i)
        if self.intensity == "original":
            x = to_intensity(x, sample_intensity(r, c))
        affine = synth_geometry(r.preprocess, x.shape[1:])
        image = MetaTensor(torch.as_tensor(x), affine=torch.as_tensor(affine, dtype=torch.float64),
                           meta={"filename_or_obj": f"synth_{i:04d}"})  # SaveImage names files by it
        item = {"image": image,
                "class": -1 if c is None else int(c), "index": i, "seed": self.seed}
        return self.transform(item) if self.transform is not None else item

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_run"] = None  # each worker loads the run itself
        return state
