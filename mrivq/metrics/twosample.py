"""Two-sample statistics that look at anatomy, not at the grid: arrays in, numbers out.

Volumes on a model grid carry regions that are constant in every real scan: the padding that makes
the grid divisible, and the clipped air outside every head. A statistic that standardises over both
sets pooled turns any tiny value a decoder writes there (0.002, invisible) into a perfect separator.
So every statistic here describes a volume *relative to the real scans only*:

- :class:`RealReference` keeps the features along which the real scans vary (sd above ``min_std``),
  standardises them by the real scans' own mean and spread (the spread floored at ``noise``, so a
  feature that hardly varies cannot amplify an invisible offset) and, for the classifier, projects them
  on the real scans' principal components (whitened). It is fitted on the real rows of each training
  fold only, never on the rows it is tested on.
- :func:`c2st_anatomy`: classifier two-sample test (Lopez-Paz & Oquab 2017) on 4x block means through
  that reference: cross-validated balanced accuracy of a linear classifier, with a permutation p-value
  (the whole cross-validation re-run on permuted labels, so the p-value is exact for unequal set sizes
  too; Ojala & Garriga 2010, *Permutation tests for studying classifier performance*).
- :func:`c2st_texture`: the same test on voxel-scale texture, which block means average away: a small
  fixed 3D CNN of random convolutions (ROCKET, Dempster et al. 2020) looks at the volumes inside the
  real scans' support, and the classifier reads its pooled responses.
- :func:`mmd`: unbiased MMD² (Gretton et al. 2012) with a sum of Gaussian kernels at 0.25-4x the
  median real distance (small bandwidths see a set that repeats one volume), and its permutation null:
  the 95% quantile is the floor, with a p-value.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

#: real-scan spread below which a feature counts as constant (padding, clipped air), in [0, 1] units
MIN_STD = 1e-3
#: the smallest spread a feature is standardised by: about the voxel noise of a block mean
NOISE = 0.01
#: kernel bandwidths as multiples of the median real-real distance
BANDWIDTHS = (0.25, 0.5, 1.0, 2.0, 4.0)


class RealReference:
    """Feature map fitted on real rows only: keep the features the real rows vary along, standardise
    by their mean and floored spread, optionally project on their first ``components`` principal
    components (whitened). ``fit(X, y)`` uses the rows with ``y == 0`` (all rows without ``y``)."""

    def __init__(self, components: int | None = 16, min_std: float = MIN_STD, noise: float = NOISE) -> None:
        self.components, self.min_std, self.noise = components, min_std, noise

    def fit(self, x: np.ndarray, y: np.ndarray | None = None) -> RealReference:
        x = np.asarray(x, np.float64)
        real = x if y is None else x[np.asarray(y) == 0]
        if len(real) < 2:
            raise ValueError("a real-scan reference needs at least 2 real rows")
        sd = real.std(0)
        self.keep_ = sd > self.min_std
        if not self.keep_.any():  # identical real rows (a permuted collapsed set): judge every feature by the noise
            self.keep_ = np.ones_like(self.keep_)
        self.mean_ = real[:, self.keep_].mean(0)
        self.scale_ = np.maximum(sd[self.keep_], self.noise)
        self.basis_ = None
        if self.components and (sd > self.min_std).any():
            z = (real[:, self.keep_] - self.mean_) / self.scale_
            _, s, vt = np.linalg.svd(z, full_matrices=False)
            k = int(min(self.components, len(real) - 1, len(s)))
            sd_k = s[:k] / math.sqrt(len(real) - 1)
            k = int(max(1, (sd_k > 1e-9 * max(sd_k[0], 1e-12)).sum()))
            self.basis_ = vt[:k].T / sd_k[:k]  # whitened: unit variance per component on the real rows
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, np.float64)[:, self.keep_] - self.mean_) / self.scale_
        return z if self.basis_ is None else z @ self.basis_

    def fit_transform(self, x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        return self.fit(x, y).transform(x)


def _labels(n_a: int, n_b: int) -> np.ndarray:
    return np.r_[np.zeros(n_a, int), np.ones(n_b, int)]


def _folds(y: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedKFold

    return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


def _balanced(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean([(pred[y == c] == c).mean() for c in (0, 1)]))


def permutation_test(stat: Callable[[np.ndarray], float], y: np.ndarray, permutations: int, seed: int) -> dict:
    """``stat(labels)`` on the true labels and on ``permutations`` random permutations of them: the
    p-value ``(1 + #{null >= observed}) / (1 + permutations)`` is exact under exchangeability (any set
    sizes), and the null's 95% quantile is the band a statistic of one distribution stays under."""
    rng = np.random.default_rng(seed)
    obs = stat(y)
    null = np.array([stat(rng.permutation(y)) for _ in range(permutations)])
    p = (1 + int((null >= obs - 1e-12).sum())) / (1 + permutations) if permutations else None
    return {"value": obs, "p_value": p, "null_q95": float(np.quantile(null, 0.95)) if permutations else None,
            "null_mean": float(null.mean()) if permutations else None, "permutations": permutations}


def _ridge_predict(z_tr: np.ndarray, y_tr: np.ndarray, z_te: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """A class-balanced ridge classifier (least squares on +-1 targets, L2 ``alpha``, free intercept) in
    closed form: a linear classifier as the C2ST asks for, cheap enough to refit under permutations."""
    w = np.where(y_tr == 1, len(y_tr) / (2 * max((y_tr == 1).sum(), 1)), len(y_tr) / (2 * max((y_tr == 0).sum(), 1)))
    a = np.c_[np.ones(len(z_tr)), z_tr]
    pen = alpha * np.eye(a.shape[1])
    pen[0, 0] = 0.0
    coef = np.linalg.solve(a.T @ (a * w[:, None]) + pen, a.T @ (w * (2.0 * y_tr - 1)))
    return (np.c_[np.ones(len(z_te)), z_te] @ coef > 0).astype(int)


def classifier_test(real: np.ndarray, other: np.ndarray, *, folds: int = 5, repeats: int = 2,
                    permutations: int = 100, components: int = 16, seed: int = 0) -> dict:
    """Classifier two-sample test of feature rows ``real [N, F]`` against ``other [M, F]``.

    In each stratified fold a :class:`RealReference` is fitted on the training fold's real rows and a
    class-balanced ridge classifier on its whitened components; the statistic is the out-of-fold
    balanced accuracy averaged over ``repeats`` fold shuffles (0.5: indistinguishable, 1.0: every volume
    told apart), with the permutation p-value and null band of :func:`permutation_test`."""
    x = np.concatenate([np.asarray(real, np.float64), np.asarray(other, np.float64)])
    y = _labels(len(real), len(other))
    k = int(min(folds, len(real), len(other)))
    if k < 2:
        raise ValueError(f"c2st needs at least 2 items per set, got {len(real)} and {len(other)}")
    def stat(lab: np.ndarray) -> float:  # folds stratified by ``lab``: the whole procedure, re-run
        accs = []
        for r in range(repeats):
            split = _folds(lab, k, seed + r)
            pred = np.empty_like(lab)
            for tr, te in split:
                ref = RealReference(components).fit(x[tr], lab[tr])
                pred[te] = _ridge_predict(ref.transform(x[tr]), lab[tr], ref.transform(x[te]))
            accs.append(_balanced(lab, pred))
        return float(np.mean(accs))

    t = permutation_test(stat, y, permutations, seed)
    return {"accuracy": t["value"], "p_value": t["p_value"], "null_q95": t["null_q95"], "null_mean": t["null_mean"],
            "permutations": permutations, "folds": k, "repeats": repeats,
            "classifier": f"class-balanced ridge classifier on up to {components} whitened principal components "
                          "of the real scans' varying features, standardised by the real spread"}


def c2st_anatomy(real: np.ndarray, other: np.ndarray, *, factor: int = 4, **kw: object) -> dict:
    """C2ST on low-resolution anatomy: ``factor``-voxel block means of volumes ``[N, C, *spatial]``
    (:func:`mrivq.metrics.realism.downsample`), then :func:`classifier_test` (``kw``)."""
    from mrivq.metrics.realism import downsample

    res = classifier_test(downsample(real, factor).numpy(), downsample(other, factor).numpy(), **kw)
    return {**res, "features": f"{factor}x block means"}


def support_mask(real: np.ndarray) -> np.ndarray:
    """``[*spatial]`` bool: voxels that are not 0 in every real scan (``real [N, C, *spatial]``): the
    grid's padding and the air every scan clips to 0 are outside it."""
    return (np.abs(np.asarray(real)) > 0).any(axis=(0, 1))


def texture_features(x: np.ndarray, mask: np.ndarray, *, kernels: int = 24, regions: int = 2, seed: int = 0,
                     batch: int = 8) -> np.ndarray:
    """``[N, F]`` texture descriptors of volumes ``x [N, C, *spatial]``, looked at inside ``mask`` only
    (everything outside it is zeroed first): a bank of ``kernels`` random 3x3x3 convolutions (half of
    them dilated by 2; random weights and biases, as ROCKET, Dempster et al. 2020), each followed by a
    ReLU, summarised by the mean response and the share of positive responses (PPV) within the mask in
    each of ``regions``^3 blocks of the grid. A small fixed 3D CNN: its read-out alone is learned."""
    g = torch.Generator().manual_seed(seed)
    t = torch.as_tensor(np.asarray(x, np.float32)) * torch.as_tensor(mask)
    c = t.shape[1]
    w = torch.randn(kernels, c, 3, 3, 3, generator=g)
    w = w - w.mean((1, 2, 3, 4), keepdim=True)  # edge-like filters: a constant offset does not pass
    w = w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1, 1)
    bias = (torch.rand(kernels, generator=g) - 0.5) * 0.1
    m = torch.as_tensor(mask, dtype=torch.float32)[None, None]
    size = [max(1, regions)] * 3
    inside = F.adaptive_avg_pool3d(m, size).flatten(1).clamp_min(1e-6)
    feats = []
    for s in range(0, len(t), batch):
        xb = t[s:s + batch]
        half = kernels // 2
        r = torch.cat([F.conv3d(xb, w[:half], bias[:half], padding=1),
                       F.conv3d(xb, w[half:], bias[half:], padding=2, dilation=2)], 1)
        mean = F.adaptive_avg_pool3d(F.relu(r) * m, size).flatten(2) / inside
        ppv = F.adaptive_avg_pool3d((r > 0).float() * m, size).flatten(2) / inside
        feats.append(torch.cat([mean, ppv], 1).flatten(1))
    return torch.cat(feats).double().numpy()


def c2st_texture(real: np.ndarray, other: np.ndarray, *, kernels: int = 24, regions: int = 2, seed: int = 0,
                 **kw: object) -> dict:
    """C2ST on voxel-scale texture: :func:`texture_features` of volumes ``[N, C, X, Y, Z]`` inside the
    real scans' support (:func:`support_mask`; the padding and clipped air are zeroed in both sets),
    then :func:`classifier_test` (``kw``)."""
    real, other = np.asarray(real, np.float32), np.asarray(other, np.float32)
    if real.ndim != 5:
        raise ValueError("the texture C2ST compares 3D volumes [N, C, X, Y, Z]")
    mask = support_mask(real)
    if not mask.any():
        raise ValueError("the real scans are 0 everywhere; no texture to compare")
    f = texture_features(np.concatenate([real, other]), mask, kernels=kernels, regions=regions, seed=seed)
    res = classifier_test(f[:len(real)], f[len(real):], seed=seed, **kw)
    return {**res, "features": f"{kernels} random 3x3x3 convolutions (ROCKET-style), mean and PPV inside the "
                               f"real support in {regions}^3 regions"}


def _mmd2(d2: torch.Tensor, real: np.ndarray, bandwidths: tuple[float, ...]) -> float:
    """Unbiased MMD² between the rows ``real`` (bool) and the rest of squared distances ``d2``, with
    the mean of Gaussian kernels at ``bandwidths`` x the median real-real distance."""
    a, b = torch.as_tensor(real), torch.as_tensor(~real)
    daa = d2[a][:, a]
    m, n = int(a.sum()), int(b.sum())
    off = daa[~torch.eye(m, dtype=torch.bool)]
    med = float(off.sqrt().median()) if off.numel() else 1.0
    k = sum(torch.exp(-d2 / (2 * (f * max(med, 1e-12)) ** 2)) for f in bandwidths) / len(bandwidths)
    kaa, kbb, kab = k[a][:, a], k[b][:, b], k[a][:, b]
    saa = (kaa.sum() - kaa.diagonal().sum()) / (m * (m - 1))
    sbb = (kbb.sum() - kbb.diagonal().sum()) / (n * (n - 1))
    return float(saa + sbb - 2 * kab.mean())


def mmd(real: np.ndarray, other: np.ndarray, *, permutations: int = 200, bandwidths: tuple[float, ...] = BANDWIDTHS,
        seed: int = 0) -> dict:
    """Unbiased MMD² of feature rows ``real [N, F]`` and ``other [M, F]`` in the real scans' standardised
    feature space (:class:`RealReference` without projection, refitted on the "real" rows of every
    permutation), with a multi-bandwidth Gaussian kernel; ``floor`` is the 95% quantile of the
    permutation null, ``p_value`` its exact p-value."""
    x = np.concatenate([np.asarray(real, np.float64), np.asarray(other, np.float64)])
    y = _labels(len(real), len(other))
    if len(real) < 2 or len(other) < 2:
        raise ValueError("MMD needs at least 2 items per set")

    def stat(lab: np.ndarray) -> float:
        z = torch.as_tensor(RealReference(None).fit(x, lab).transform(x))
        return _mmd2(torch.cdist(z, z).square(), lab == 0, bandwidths)

    t = permutation_test(stat, y, permutations, seed)
    return {"mmd": t["value"], "floor": t["null_q95"], "p_value": t["p_value"], "null_mean": t["null_mean"],
            "permutations": permutations, "bandwidths": list(bandwidths),
            "kernel": "mean of Gaussian kernels at 0.25-4x the median real-real distance, on block means "
                      "standardised by the real scans' spread (constant features dropped)"}
