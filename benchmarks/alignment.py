"""Where the brain lands in the model's grid: no alignment (the array's centre crop), MONAI's
``CropForeground``, TorchIO's ``CropOrPad`` about a head mask, and affine registration with the template
by SimpleITK (mrivq's own) and by ANTsPy, at equal threads, on varied phantoms (poses up to 15 degrees
and 25 mm, three sites' fields of view, one with the neck) whose true transforms are known.

    python benchmarks/alignment.py --count 12 --spacing 2 --out benchmarks/results/alignment_cpu_2cores.json

Per row: subjects losing more than 1% (and 2%) of their brain to the grid's box, the spread of the
brain's centre in the grid (RMS distance from the mean, mm), the median Dice of a subject's brain mask
with the others' mean (leave-one-out, on the grid), the mean registration error inside the brain
against the truth (mm), and seconds per subject. The grid is the ``vqvae3d-cpu`` preset's (4 mm,
48x56x48); registration rows also time a 2 mm registration (the GPU presets' resolution).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit  # noqa: E402
from mrivq.data import align  # noqa: E402
from mrivq.datasets import phantom as ph  # noqa: E402

SHAPE = [48, 56, 48]
SPACING = 4.0


def _subjects(count: int, spacing: float, seed: int) -> list[dict]:
    out = []
    for i in range(count):
        site = ph.site_of(i)
        shape, centre = ph.site_geometry(site, spacing)
        pose = ph.draw_pose(seed, i)
        sub = ph.generate_subject(i, seed=seed, shape=shape, spacing=spacing, modalities=("t1",), pose=pose,
                                  centre=centre)
        truth = ph.head_to_world(i, seed=seed, pose=pose)
        # the brain: cerebrum, cerebellum, brainstem above the floor (head frame), CSF inside
        idx = np.argwhere(np.isin(sub["labels"], (3, 4, 5, 6)))
        world = idx @ sub["affine"][:3, :3].T + sub["affine"][:3, 3]
        head = (world - truth[:3, 3]) @ np.linalg.inv(truth[:3, :3]).T
        brain = np.zeros(sub["labels"].shape, bool)
        keep = idx[head[:, 2] > ph.BRAIN_FLOOR_MM]
        brain[tuple(keep.T)] = True
        out.append({"t1": sub["t1"], "affine": sub["affine"], "brain": brain, "truth": truth, "site": site})
    return out


def _grid_points(sub: dict, to_grid: np.ndarray) -> np.ndarray:
    """The subject's brain voxels as grid indices (``to_grid``: native world -> grid index)."""
    idx = np.argwhere(sub["brain"])
    world = idx @ sub["affine"][:3, :3].T + sub["affine"][:3, 3]
    return world @ to_grid[:3, :3].T + to_grid[:3, 3]


def _pull(sub: dict, to_grid: np.ndarray) -> np.ndarray:
    """The subject's brain mask on the grid: each grid voxel takes the native voxel under its centre."""
    from scipy import ndimage

    m = np.linalg.inv(sub["affine"]) @ np.linalg.inv(to_grid)  # grid index -> native index
    return ndimage.affine_transform(sub["brain"].astype(np.uint8), m[:3, :3], m[:3, 3], output_shape=tuple(SHAPE),
                                    order=0, mode="constant", cval=0) > 0


def _figures(subs: list[dict], maps: list[np.ndarray]) -> dict:
    """``maps[i]``: native world -> grid index for subject i."""
    lost, centres, masks = [], [], []
    for sub, m in zip(subs, maps, strict=True):
        g = _grid_points(sub, m)
        inside = np.all((g > -0.5) & (g < np.asarray(SHAPE) - 0.5), axis=1)
        lost.append(1.0 - float(inside.mean()))
        centres.append(g.mean(0) * SPACING)
        masks.append(_pull(sub, m))
    c = np.asarray(centres)
    spread = float(np.sqrt(((c - c.mean(0)) ** 2).sum(1).mean()))
    dice = []
    stack = np.stack(masks).astype(np.float32)
    for i, m in enumerate(masks):
        others = (stack.sum(0) - stack[i]) / (len(masks) - 1) > 0.5
        dice.append(2 * float((m & others).sum()) / max(1.0, float(m.sum() + others.sum())))
    return {"lose_over_1pct": int(sum(v > 0.01 for v in lost)), "lose_over_2pct": int(sum(v > 0.02 for v in lost)),
            "max_brain_lost_pct": round(100 * max(lost), 2), "centre_spread_mm": round(spread, 2),
            "median_dice_with_mean": round(float(np.median(dice)), 4)}


def _centred_grid(centre_world: np.ndarray) -> np.ndarray:
    """native world -> index of a RAS grid of SHAPE at SPACING centred on ``centre_world``."""
    g = np.diag([SPACING] * 3 + [1.0])
    g[:3, 3] = centre_world - SPACING * (np.asarray(SHAPE) - 1) / 2
    return np.linalg.inv(g)


def row_none(subs: list[dict]) -> tuple[list[np.ndarray], list[float]]:
    """The array path (data.register: null): resample at 4 mm, crop/pad the array about the volume's centre."""
    maps, secs = [], []
    for s in subs:
        t = time.perf_counter()
        centre = s["affine"][:3, :3] @ ((np.asarray(s["t1"].shape) - 1) / 2) + s["affine"][:3, 3]
        maps.append(_centred_grid(centre))
        secs.append(time.perf_counter() - t)
    return maps, secs


def row_monai_crop_foreground(subs: list[dict]) -> tuple[list[np.ndarray], list[float]]:
    """MONAI's CropForeground about the head mask (a plain threshold keeps the whole field of view: the
    Rician noise floor crosses it somewhere on every edge) at 4 mm, then the centred crop/pad."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import CropForeground, Spacing

    maps, secs = [], []
    for s in subs:
        t = time.perf_counter()
        img = MetaTensor(torch.from_numpy(s["t1"][None]), affine=torch.as_tensor(s["affine"]))
        img = Spacing(pixdim=(SPACING,) * 3, mode="bilinear")(img)
        head = torch.from_numpy(align.head_mask(img.numpy()[0]))[None]
        cropped = CropForeground(select_fn=lambda x, head=head: head, margin=0)(img)
        aff = np.asarray(cropped.affine, dtype=np.float64)
        centre = aff[:3, :3] @ ((np.asarray(cropped.shape[1:]) - 1) / 2) + aff[:3, 3]
        maps.append(_centred_grid(centre))
        secs.append(time.perf_counter() - t)
    return maps, secs


def row_torchio_crop_or_pad(subs: list[dict]) -> tuple[list[np.ndarray], list[float]]:
    """TorchIO's CropOrPad to the grid's shape about the head mask's bounding box, at 4 mm."""
    import torch
    import torchio as tio

    maps, secs = [], []
    for s in subs:
        t = time.perf_counter()
        head = align.head_mask(s["t1"])
        subj = tio.Subject(t1=tio.ScalarImage(tensor=torch.from_numpy(s["t1"][None]), affine=s["affine"]),
                           head=tio.LabelMap(tensor=torch.from_numpy(head[None].astype(np.uint8)), affine=s["affine"]))
        subj = tio.Resample(SPACING)(subj)
        out = tio.CropOrPad(tuple(SHAPE), mask_name="head")(subj)
        aff = np.asarray(out["t1"].affine, dtype=np.float64)
        maps.append(np.linalg.inv(aff))
        secs.append(time.perf_counter() - t)
    return maps, secs


def _error(tpl: align.Template, matrix: np.ndarray, truth: np.ndarray) -> float:
    pts = np.argwhere(tpl.brain > 0.5) @ tpl.affine[:3, :3].T + tpl.affine[:3, 3]
    a = pts @ matrix[:3, :3].T + matrix[:3, 3]
    b = pts @ truth[:3, :3].T + truth[:3, 3]
    return float(np.linalg.norm(a - b, axis=1).mean())


def row_sitk(subs: list[dict], tpl: align.Template, threads: int, resolution: float) -> tuple:
    grid, _ = align.template_grid(tpl, [SPACING] * 3, SHAPE)
    maps, secs, errs, sims = [], [], [], []
    for s in subs:
        t = time.perf_counter()
        reg = align.register(s["t1"], s["affine"], tpl, resolution_mm=resolution, threads=threads)
        secs.append(time.perf_counter() - t)
        maps.append(np.linalg.inv(grid) @ np.linalg.inv(reg.array))
        errs.append(_error(tpl, reg.array, s["truth"]))
        sims.append(reg.similarity)
    return maps, secs, errs, sims


def row_ants(subs: list[dict], tpl: align.Template, threads: int) -> tuple:
    import ants

    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    grid, _ = align.template_grid(tpl, [SPACING] * 3, SHAPE)

    def to_ants(arr: np.ndarray, aff: np.ndarray):
        lps = np.diag([-1.0, -1.0, 1.0]) @ aff[:3, :3]
        sp = np.sqrt((lps ** 2).sum(0))
        return ants.from_numpy(arr.astype(np.float32), origin=list(np.diag([-1.0, -1.0, 1.0]) @ aff[:3, 3]),
                               spacing=list(sp), direction=lps / sp)

    fixed = to_ants(tpl.t1, tpl.affine)
    maps, secs, errs = [], [], []
    for s in subs:
        t = time.perf_counter()
        moving = to_ants(s["t1"] / np.percentile(s["t1"], 99.5), s["affine"])
        out = ants.registration(fixed=fixed, moving=moving, type_of_transform="Affine", aff_metric="mattes",
                                verbose=False)
        secs.append(time.perf_counter() - t)
        tx = ants.read_transform(out["fwdtransforms"][0])
        # ANTs maps fixed (template) LPS points to moving LPS points, like SimpleITK
        p = np.asarray(tx.parameters, dtype=np.float64)
        c = np.asarray(tx.fixed_parameters, dtype=np.float64)
        m = p[:9].reshape(3, 3)
        lps = np.eye(4)
        lps[:3, :3] = m
        lps[:3, 3] = p[9:] + c - m @ c
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        matrix = flip @ lps @ flip
        maps.append(np.linalg.inv(grid) @ np.linalg.inv(matrix))
        errs.append(_error(tpl, matrix, s["truth"]))
    return maps, secs, errs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=12)
    ap.add_argument("--spacing", type=float, default=2.0, help="the scans' voxel size (mm)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-ants", action="store_true")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    t0 = time.perf_counter()
    subs = _subjects(a.count, a.spacing, a.seed)
    gen = time.perf_counter() - t0
    tpl = align.load_template("phantom")
    rows = []

    def add(name: str, maps, secs, errs=None, extra=None) -> None:
        r = {"method": name, **_figures(subs, maps), "seconds_per_subject": round(float(np.mean(secs)), 2),
             "max_seconds": round(float(np.max(secs)), 2)}
        if errs is not None:
            r["registration_error_mm"] = round(float(np.mean(errs)), 2)
            r["max_registration_error_mm"] = round(float(np.max(errs)), 2)
        rows.append({**r, **(extra or {})})
        print(rows[-1], file=sys.stderr)

    add("none: centre crop of the array (data.register: null)", *row_none(subs))
    add("MONAI CropForeground, then centre crop/pad", *row_monai_crop_foreground(subs))
    add("TorchIO CropOrPad about the head mask", *row_torchio_crop_or_pad(subs))
    maps, secs, errs, sims = row_sitk(subs, tpl, a.threads, SPACING)
    add("SimpleITK affine at 4 mm (mrivq: data.register=affine)", maps, secs, errs,
        {"min_similarity": round(float(np.min(sims)), 3)})
    maps2, secs2, errs2, _ = row_sitk(subs, tpl, a.threads, 2.0)
    add("SimpleITK affine at 2 mm", maps2, secs2, errs2)
    if not a.no_ants:
        add("ANTsPy affine (ants.registration Affine, Mattes)", *row_ants(subs, tpl, a.threads))
    goals = {"max_brain_lost_pct": 1.0, "centre_spread_mm": 2.0, "registration_error_mm": 2.0,
             "median_dice_with_mean": 0.95, "seconds_2mm": 15.0}
    emit({"subjects": a.count, "scan_spacing_mm": a.spacing, "grid": {"shape": SHAPE, "spacing_mm": SPACING},
          "template": "phantom", "threads": a.threads, "max_rotation_deg": ph.MAX_ROTATION_DEG,
          "max_shift_mm": ph.MAX_SHIFT_MM, "sites": list(ph.SITES), "generation_seconds": round(gen, 1),
          "goals": goals, "rows": rows}, a.out)


if __name__ == "__main__":
    main()
