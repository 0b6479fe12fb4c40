"""The deformed-ICBM152 cohort (real anatomy, known population) and the anatomy benchmark's run figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.anatomy import ARMS, goals, run_figures, slug
from benchmarks.anatomy_cohort import subject, write_cohort
from mrivq.data.align import load_template
from tests.helpers import mrivq_main


@pytest.fixture(scope="module")
def tpl():
    return load_template("icbm152")


def test_subjects_are_deterministic_posed_and_differ(tpl) -> None:
    a, aff_a = subject(tpl.t1, tpl.affine, 0)
    a2, aff_a2 = subject(tpl.t1, tpl.affine, 0)
    b, aff_b = subject(tpl.t1, tpl.affine, 1)
    assert np.array_equal(a, a2) and np.array_equal(aff_a, aff_a2)
    assert a.shape == tpl.t1.shape and a.dtype == np.float32 and a.min() >= 0
    assert not np.allclose(a, b) and not np.allclose(aff_a, aff_b)
    # the pose is rigid: the voxel axes keep the template's 2 mm spacing and stay orthogonal
    m = aff_a[:3, :3]
    assert np.allclose(m.T @ m, np.diag(np.diag(tpl.affine[:3, :3]) ** 2), atol=1e-6)
    assert not np.allclose(aff_a, tpl.affine)


def test_subjects_keep_the_anatomy(tpl) -> None:
    """Pose aside (the voxels stay on the template grid), each subject correlates with the template inside
    its brain (a deformed brain, not noise; the anatomy 20 mm off correlates less), and subjects differ
    from each other as much as from the template."""
    brain = tpl.brain > 0.5
    xs = [subject(tpl.t1, tpl.affine, i)[0] for i in range(3)]
    for x in xs:
        r = np.corrcoef(x[brain], tpl.t1[brain])[0, 1]
        shifted = np.corrcoef(x[brain], np.roll(tpl.t1, 10, axis=1)[brain])[0, 1]
        assert r > 0.35 and r > shifted + 0.1, (r, shifted)
    assert np.corrcoef(xs[0][brain], xs[1][brain])[0, 1] < 0.9


def test_cohort_becomes_a_dataset_through_the_nifti_folder_layout(tmp_path: Path) -> None:
    card = write_cohort(tmp_path / "cohort", 2)
    res = mrivq_main("fetch", str(card), "--from", str(tmp_path / "cohort" / "scans"), "--root", str(tmp_path / "data"))
    assert res.returncode == 0, res.stderr
    rows = (tmp_path / "data" / "icbm-cohort" / "manifest.csv").read_text().splitlines()
    assert rows[0].startswith("subject,modality,path") and len(rows) == 3
    assert rows[1].startswith("sub-000,t1,")


def test_run_figures_reads_stage_times_psnr_and_best_nats(tmp_path: Path) -> None:
    rows = [{"stage": "vqvae", "step": 1, "time": 100.0}, {"stage": "vqvae", "step": 10, "time": 110.0},
            {"stage": "vqvae", "step": 10, "time": 111.0, "val_psnr": 21.234},
            {"stage": "prior", "step": 1, "time": 120.0},
            {"stage": "prior", "step": 5, "time": 150.0, "val_nats_per_token": 2.5},
            {"stage": "prior", "step": 9, "time": 180.0, "val_nats_per_token": 2.7}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert run_figures(tmp_path) == {"vqvae_steps": 10, "vqvae_seconds": 11.0, "prior_steps": 9,
                                     "prior_seconds": 60.0, "val_psnr": 21.23, "prior_val_nats_best": 2.5}


def test_goals_mark_each_figure_met_or_missed() -> None:
    row = {"samples": {"c2st_accuracy": 0.77, "tissue_dice_gap": 0.03, "ventricles_present": 0.5,
                       "ms_ssim_synth": 0.80, "ms_ssim_real": 0.86, "memorization": 1.1, "mask_dice_synth": 0.95,
                       "mask_dice_real": 0.96},
           "controls": {"reconstructions": {"c2st_accuracy": 0.55}, "real_as_samples": {"c2st_accuracy": 0.67}},
           "synth_volumes_per_minute": 120.0}
    got = list(goals(row).values())
    # reconstructions below the control pass (one-sided); MS-SSIM 0.06 away fails (two-sided)
    assert got == ["-0.12 met", "0.03 met", "0.5 missed", "0.06 missed", "1.1 met", "0.01 met", "0.77 missed",
                   "120 met"]
    assert list(goals({"samples": {}}).values())[0] == "—"  # a figure the arm lacks


def test_every_arm_has_its_own_picture_name() -> None:
    names = [slug(n) for n in ARMS]
    assert len(set(names)) == len(names) and all(names)
