"""Evaluation of trained runs: realism of samples (:mod:`~mrivq.evaluate.realism`), with the metrics
in :mod:`~mrivq.evaluate.metrics`, volume sets in :mod:`~mrivq.evaluate.volumes`, named FID features
in :mod:`~mrivq.evaluate.features` and the picture in :mod:`~mrivq.evaluate.picture`."""

from mrivq.evaluate.realism import KEYS, evaluate_realism, realism_metrics

__all__ = ["KEYS", "evaluate_realism", "realism_metrics"]
