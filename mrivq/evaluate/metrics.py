"""Realism metrics for sets of volumes on one grid: each takes arrays ``[N, C, *spatial]`` in [0, 1]
(the run's preprocessed space) and returns plain numbers, so they can be tested on cases whose
answer is known and reused by benchmarks.

- :func:`c2st`: classifier two-sample test (Lopez-Paz & Oquab 2017, *Revisiting classifier
  two-sample tests*): cross-validated balanced accuracy of a logistic regression telling the two
  sets apart; 0.5 means indistinguishable.
- :func:`mmd_rbf` and :func:`mmd_floor`: unbiased MMD² with a Gaussian kernel (Gretton et al. 2012,
  *A kernel two-sample test*), and the same statistic between random halves of the real set.
- :func:`mmd_linear`: MONAI's ``MMDMetric`` (unbiased, linear kernel: the distance of the means).
- :func:`pairwise_ms_ssim`: diversity as mean pairwise MS-SSIM (Wang et al. 2003) with MONAI's
  ``MultiScaleSSIMMetric``, kernel and scales chosen for the grid by :func:`ms_ssim_params`.
- :func:`nearest`: nearest-neighbour distances (memorization: Webster et al. 2019 use the same
  nearest-training-image test for GANs).
- :func:`head_masks`, :func:`dice`, :func:`tissue_model`: anatomy (head mask, tissue fractions
  from a 3-class Gaussian mixture inside it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

#: MS-SSIM weights of Wang et al. 2003 (MONAI's defaults), finest scale first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def downsample(x: np.ndarray | torch.Tensor, factor: int = 4) -> torch.Tensor:
    """``[N, C, *spatial]`` -> ``[N, F]``: block means over ``factor`` voxels per axis (flattened).

    At the CPU preset's 48x56x48 grid this gives 12x14x12 = 2016 features: the scale of anatomy, not
    of voxel noise, and few enough for a classifier trained on a few dozen volumes."""
    t = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    dims = t.ndim - 2
    size = [max(1, math.ceil(s / factor)) for s in t.shape[2:]]
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[dims]
    return pool(t, size).flatten(1)


def c2st(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, *, folds: int = 5, repeats: int = 5,
         seed: int = 0) -> dict:
    """Classifier two-sample test on feature rows ``a [N, F]`` and ``b [M, F]``.

    A standardised, L2-regularised logistic regression is trained to tell ``a`` from ``b``; the
    out-of-fold balanced accuracy (stratified ``folds``-fold, averaged over ``repeats`` shuffles) is
    the statistic: 0.5 when the sets are indistinguishable, 1.0 when every volume is told apart.
    ``p_value`` is the one-sided binomial test of the first repeat's correct predictions against
    chance, as in Lopez-Paz & Oquab 2017."""
    from scipy.stats import binomtest
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    x = np.concatenate([a, b])
    y = np.r_[np.zeros(len(a), int), np.ones(len(b), int)]
    k = int(min(folds, len(a), len(b)))
    if k < 2:
        raise ValueError(f"c2st needs at least 2 items per set, got {len(a)} and {len(b)}")
    accs, p = [], 1.0
    for r in range(repeats):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
        pred = cross_val_predict(clf, x, y, cv=StratifiedKFold(k, shuffle=True, random_state=seed + r))
        accs.append(balanced_accuracy_score(y, pred))
        if r == 0:
            p = float(binomtest(int((pred == y).sum()), len(y), 0.5, alternative="greater").pvalue)
    return {"accuracy": float(np.mean(accs)), "accuracy_std": float(np.std(accs)), "p_value": p,
            "folds": k, "repeats": repeats, "classifier": "logistic regression (L2, C=1, standardised)"}


def _sqdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a.double(), b.double()).square()


def rbf_bandwidth(ref: torch.Tensor) -> float:
    """Median heuristic: the median pairwise distance among ``ref`` rows (Gretton et al. 2012)."""
    d = torch.pdist(ref.double())
    return float(d.median()) if d.numel() else 1.0


def mmd_rbf(a: torch.Tensor, b: torch.Tensor, bandwidth: float) -> float:
    """Unbiased MMD² between rows of ``a`` and ``b`` with ``k(x, y) = exp(-|x-y|² / (2 h²))``.

    Its expectation is 0 when both come from one distribution (so small negative values occur)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("MMD needs at least 2 items per set")
    g = 2.0 * bandwidth ** 2
    kaa, kbb, kab = (torch.exp(-_sqdist(u, v) / g) for u, v in ((a, a), (b, b), (a, b)))
    m, n = len(a), len(b)
    saa = (kaa.sum() - kaa.diagonal().sum()) / (m * (m - 1))
    sbb = (kbb.sum() - kbb.diagonal().sum()) / (n * (n - 1))
    return float(saa + sbb - 2 * kab.mean())


def half_splits(real: torch.Tensor, stat: Callable[[torch.Tensor, torch.Tensor], float], *, splits: int = 20,
                seed: int = 0) -> float:
    """Noise floor of a two-sample statistic: its mean absolute value between random halves of ``real``.

    The halves are half the size of the real set, so this floor is, if anything, generous."""
    g = torch.Generator().manual_seed(seed)
    h = len(real) // 2
    if h < 2:
        raise ValueError("a noise floor needs at least 4 real items")
    vals = []
    for _ in range(splits):
        perm = torch.randperm(len(real), generator=g)
        vals.append(abs(stat(real[perm[:h]], real[perm[h:2 * h]])))
    return float(np.mean(vals))


def mmd_floor(real: torch.Tensor, bandwidth: float, *, splits: int = 20, seed: int = 0) -> float:
    """Noise floor of :func:`mmd_rbf` (see :func:`half_splits`)."""
    return half_splits(real, lambda a, b: mmd_rbf(a, b, bandwidth), splits=splits, seed=seed)


def mmd_linear(a: torch.Tensor, b: torch.Tensor, *, seed: int = 0) -> float:
    """MONAI's ``MMDMetric`` (unbiased, linear kernel) on equal-size random subsets (it needs equal sizes)."""
    from monai.metrics import MMDMetric

    n = min(len(a), len(b))
    g = torch.Generator().manual_seed(seed)
    a = a[torch.randperm(len(a), generator=g)[:n]]
    b = b[torch.randperm(len(b), generator=g)[:n]]
    return float(MMDMetric()(a.double(), b.double()))


def ms_ssim_params(shape: Sequence[int], kernel_size: int = 5, max_scales: int = 5) -> dict:
    """Kernel and scales that MONAI's ``MultiScaleSSIMMetric`` accepts on grid ``shape``.

    MONAI's defaults (kernel 11, 5 scales) need 176 voxels per axis. Here the kernel is shrunk to
    fit (at most ``kernel_size``) and the number of scales is the largest that (a) passes MONAI's
    size check and (b) keeps the coarsest scale at least one kernel wide; the first weights of Wang
    et al. are kept and renormalised to sum to 1."""
    small = int(min(shape))
    k = max(3, min(kernel_size, small // 2 * 2 - 1))
    if k % 2 == 0:
        k -= 1
    scales = 1
    for s in range(max_scales, 0, -1):
        div = max(1, s - 1) ** 2  # MONAI's own check
        if small // div > k - 1 and small / 2 ** (s - 1) >= k:
            scales = s
            break
    w = np.asarray(MS_SSIM_WEIGHTS[:scales], np.float64)
    w = w / w.sum()
    return {"kernel_size": int(k), "kernel_sigma": 1.5 * k / 11, "weights": [round(float(v), 6) for v in w],
            "data_range": 1.0, "kernel_type": "gaussian"}


def pairwise_ms_ssim(x: np.ndarray | torch.Tensor, params: dict, *, max_pairs: int = 300, seed: int = 0,
                     batch: int = 16) -> float:
    """Mean MS-SSIM over pairs of distinct volumes of ``x [N, C, *spatial]`` (all pairs, or
    ``max_pairs`` random ones). Lower means more diverse; identical volumes give 1."""
    from monai.metrics import MultiScaleSSIMMetric

    t = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    n = len(t)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if not pairs:
        raise ValueError("diversity needs at least 2 volumes")
    if len(pairs) > max_pairs:
        rng = np.random.default_rng(seed)
        pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), max_pairs, replace=False))]
    metric = MultiScaleSSIMMetric(spatial_dims=t.ndim - 2, data_range=params["data_range"],
                                  kernel_type=params["kernel_type"], kernel_size=params["kernel_size"],
                                  kernel_sigma=params["kernel_sigma"], weights=params["weights"])
    vals = []
    for s in range(0, len(pairs), batch):
        i, j = zip(*pairs[s:s + batch], strict=True)
        vals.append(metric(t[list(i)], t[list(j)]).flatten())
    return float(torch.cat(vals).nan_to_num(0.0).mean())


def nearest(a: torch.Tensor, ref: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance from each row of ``a`` to its nearest row of ``ref``, and that row's index."""
    d = torch.cdist(a.double(), ref.double())
    v, i = d.min(1)
    return v.numpy(), i.numpy()


def head_threshold(x: np.ndarray) -> float:
    """One head/background threshold for a set of volumes: half the Otsu (1979) threshold of their
    pooled voxels. Otsu alone splits background+dark tissue from bright tissue, and T1's dark skull
    and CSF fall below it, which opens the head's outline wherever the field of view cuts the neck."""
    from skimage.filters import threshold_otsu

    v = np.asarray(x, np.float32).ravel()
    if v.size > 2_000_000:
        v = v[:: v.size // 2_000_000 + 1]
    return 0.5 * float(threshold_otsu(v))


def head_masks(x: np.ndarray, threshold: float) -> np.ndarray:
    """``[N, *spatial]`` bool: voxels above ``threshold``, holes filled (in 3D, then in each slice
    along the last axis, for heads left open where the field of view ends), largest part kept."""
    from scipy import ndimage

    out = np.zeros(x.shape, bool)
    for i, v in enumerate(np.asarray(x)):
        m = ndimage.binary_fill_holes(v > threshold)
        if m.ndim == 3:
            m = np.stack([ndimage.binary_fill_holes(m[..., k]) for k in range(m.shape[-1])], -1)
        lab, n = ndimage.label(m)
        if n > 1:
            sizes = ndimage.sum_labels(m, lab, range(1, n + 1))
            m = lab == (int(np.argmax(sizes)) + 1)
        out[i] = m
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1 when both are empty)."""
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * float(np.logical_and(a, b).sum()) / s


def mask_dice(masks: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Dice of each mask with ``reference``."""
    return np.array([dice(m, reference) for m in masks])


def mean_mask(masks: np.ndarray) -> np.ndarray:
    """The voxels inside at least half of ``masks``."""
    return masks.mean(0) >= 0.5


def loo_mask_dice(masks: np.ndarray) -> np.ndarray:
    """Each real mask's Dice with the mean mask of the *other* real masks (leave-one-out, so a real
    scan is not compared with a mean that contains it)."""
    n = len(masks)
    total = masks.sum(0, dtype=np.int64)
    return np.array([dice(m, (total - m) >= (n - 1) / 2) for m in masks])


def tissue_model(x: np.ndarray, masks: np.ndarray, classes: int = 3, seed: int = 0,
                 max_voxels: int = 200_000):
    """A ``classes``-component Gaussian mixture of the intensities inside ``masks`` (real scans);
    returns it with its components ordered by mean intensity (dark to bright)."""
    from sklearn.mixture import GaussianMixture

    v = np.asarray(x)[masks].astype(np.float64)
    if v.size > max_voxels:
        v = np.random.default_rng(seed).choice(v, max_voxels, replace=False)
    gmm = GaussianMixture(classes, random_state=seed).fit(v[:, None])
    order = np.argsort(gmm.means_.ravel())
    return gmm, order


def tissue_fractions(x: np.ndarray, masks: np.ndarray, gmm, order: np.ndarray) -> np.ndarray:
    """``[N, classes]``: the share of each volume's mask given to each mixture component (dark first)."""
    k = len(order)
    rank = np.empty(k, int)
    rank[order] = np.arange(k)
    out = np.zeros((len(x), k))
    for i, (v, m) in enumerate(zip(np.asarray(x), masks, strict=True)):
        if m.any():
            lab = rank[gmm.predict(v[m].astype(np.float64)[:, None])]
            out[i] = np.bincount(lab, minlength=k) / m.sum()
    return out
