"""mrivq.SyntheticDataset: deterministic per index and seed, equal to `mrivq synth`, MONAI-style items,
DataLoader workers, ConcatDataset with real data, and pre-synthesized folders."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import mrivq
from mrivq.utils.errors import MrivqError
from tests.helpers import invoke


@pytest.mark.slow
def test_items_are_deterministic_and_equal_synth(trained_run: Path, tmp_path: Path) -> None:
    from monai.data import MetaTensor

    ds = mrivq.SyntheticDataset(trained_run, 3, seed=4)
    assert len(ds) == 3
    a = [ds[i] for i in (2, 0, 1)]  # any order
    b = [mrivq.SyntheticDataset(trained_run, 3, seed=4)[i] for i in (2, 0, 1)]  # another pass
    for x, y in zip(a, b, strict=True):
        assert isinstance(x["image"], MetaTensor) and x["image"].shape == (1, 32, 32, 32)
        assert torch.equal(x["image"], y["image"]) and x["index"] == y["index"] and x["seed"] == 4
        assert 0 <= float(x["image"].min()) and float(x["image"].max()) <= 1
    assert not torch.equal(a[0]["image"], a[1]["image"])
    assert not torch.equal(mrivq.SyntheticDataset(trained_run, 3, seed=5)[0]["image"], a[1]["image"])
    # item i is synth's sample i (same seed), in the run's geometry and, with "original", its units
    out = tmp_path / "s"
    assert invoke("synth", "--run", str(trained_run), "--count", "3", "--seed", "4", "--out", str(out),
                  "--device", "cpu").exit_code == 0
    orig = mrivq.SyntheticDataset(trained_run, 3, seed=4, intensity="original")
    for i in range(3):
        nii = nib.load(out / f"synth_{i:04d}.nii.gz")
        item = orig[i]
        np.testing.assert_allclose(item["image"][0].numpy(), np.asarray(nii.dataobj), rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(item["image"].affine.numpy(), nii.affine, atol=1e-5)
    # read back from the folder: the same volumes on the model's scale
    from_folder = mrivq.SyntheticDataset(trained_run, 3, folder=out)
    for i in range(3):
        np.testing.assert_allclose(from_folder[i]["image"].numpy(), ds[i]["image"].numpy(), atol=1e-4)


@pytest.mark.slow
def test_dataloader_workers_and_concat_with_real_data(trained_run: Path) -> None:
    from monai.data import DataLoader, Dataset
    from torch.utils.data import ConcatDataset

    synth = mrivq.SyntheticDataset(trained_run, 4, seed=1)
    real = Dataset([{"image": torch.zeros(1, 32, 32, 32), "class": -1, "index": -1, "seed": -1}])
    mixed = ConcatDataset([real, synth])
    assert len(mixed) == 5

    batches = list(DataLoader(synth, batch_size=2, num_workers=2))
    assert [b["index"].tolist() for b in batches] == [[0, 1], [2, 3]]
    assert batches[0]["image"].shape == (2, 1, 32, 32, 32) and batches[0]["class"].tolist() == [-1, -1]
    for b in batches:
        for j, i in enumerate(b["index"].tolist()):
            assert torch.equal(b["image"][j].as_tensor(), synth[i]["image"].as_tensor())
    assert mixed[0]["index"] == -1 and mixed[1]["index"] == 0
    assert len(list(DataLoader(mixed, batch_size=5))) == 1


def test_bad_arguments(trained_run: Path, tmp_path: Path) -> None:
    with pytest.raises(MrivqError, match="num_samples"):
        mrivq.SyntheticDataset(trained_run, 0)
    with pytest.raises(MrivqError, match="intensity"):
        mrivq.SyntheticDataset(trained_run, 1, intensity="raw")
    with pytest.raises(MrivqError, match="fewer than"):
        mrivq.SyntheticDataset(trained_run, 2, folder=tmp_path)
    with pytest.raises(MrivqError, match="does not exist"):
        mrivq.SyntheticDataset(trained_run, 2, folder=tmp_path / "nope")
    with pytest.raises(IndexError):
        mrivq.SyntheticDataset(trained_run, 2)[2]
    with pytest.raises(MrivqError, match="unconditional"):
        mrivq.SyntheticDataset(trained_run, 1, cls=1)[0]
