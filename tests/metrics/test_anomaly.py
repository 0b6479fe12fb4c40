"""Anomaly-map metrics on maps whose AUROC, AUPRC and Dice are known by hand (and against scikit-learn)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from mrivq.metrics.anomaly import anomaly_metrics, auprc, auroc, best_dice, dice_at
from mrivq.utils.errors import MrivqError

# four voxels: lesion, healthy, lesion, healthy
SCORES = np.array([0.9, 0.8, 0.7, 0.1])
TRUTH = np.array([1, 0, 1, 0], bool)


def test_hand_computed_values() -> None:
    # pairs (lesion > healthy): 0.9>0.8, 0.9>0.1, 0.7>0.1, not 0.7>0.8 -> 3/4
    assert auroc(SCORES, TRUTH) == pytest.approx(0.75)
    # precision at the two lesion voxels: 1/1 and 2/3 -> mean 5/6
    assert auprc(SCORES, TRUTH) == pytest.approx(5 / 6)
    # top-1: 2/3, top-2: 1/2, top-3: 4/5, top-4: 2/3 -> 0.8 at threshold 0.7
    assert best_dice(SCORES, TRUTH) == pytest.approx((0.8, 0.7))
    assert dice_at(SCORES, TRUTH, 0.85) == pytest.approx(2 / 3)
    assert dice_at(SCORES, TRUTH, 2.0) == 0.0


def test_perfect_random_and_tied_maps() -> None:
    truth = np.zeros((8, 8, 8), bool)
    truth[2:4, 2:4, 2:4] = True
    assert auroc(truth * 1.0, truth) == 1.0 and auprc(truth * 1.0, truth) == 1.0
    assert best_dice(truth * 1.0, truth)[0] == 1.0
    flat = np.zeros(truth.shape)  # one tie: AUROC 1/2, AUPRC the lesion fraction
    assert auroc(flat, truth) == pytest.approx(0.5)
    assert auprc(flat, truth) == pytest.approx(truth.mean())


def test_agrees_with_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    truth = rng.random(5000) < 0.05
    scores = np.round(rng.random(5000) + truth * 0.6, 2)  # rounded: many ties
    assert auroc(scores, truth) == pytest.approx(roc_auc_score(truth, scores))
    assert auprc(scores, truth) == pytest.approx(average_precision_score(truth, scores))


def test_region_pooling_and_bad_input() -> None:
    a, b = np.zeros((4, 4, 4)), np.zeros((4, 4, 4))
    ma, mb = np.zeros_like(a, bool), np.zeros_like(b, bool)
    a[0, 0, 0], ma[0, 0, 0] = 5.0, True  # found in subject a
    b[1, 1, 1], mb[2, 2, 2] = 5.0, True  # missed in subject b (its hot voxel is elsewhere)
    region = np.ones_like(a, bool)
    res = anomaly_metrics([a, b], [ma, mb], [region, region], threshold=1.0, names=["a", "b"])
    assert res["subjects"]["a"]["best_dice"] == 1.0 and res["subjects"]["a"]["dice"] == 1.0
    assert res["subjects"]["b"]["dice"] == 0.0
    assert res["pooled"]["lesion_voxels"] == 2 and res["pooled"]["dice"] == pytest.approx(0.5)
    outside = np.zeros_like(a, bool)  # a region without lesion voxels: undefined, not zero
    assert np.isnan(auprc(a, ma, outside | ~ma))
    with pytest.raises(MrivqError, match="shape"):
        auroc(a, ma[:2])
    with pytest.raises(MrivqError, match="NaN"):
        auprc(np.full(4, np.nan), TRUTH)
