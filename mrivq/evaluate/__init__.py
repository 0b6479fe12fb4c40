"""Reports on trained runs, over :mod:`mrivq.metrics`: reconstruction (:mod:`~mrivq.evaluate.reconstruction`),
realism of samples (:mod:`~mrivq.evaluate.realism`, volume sets in :mod:`~mrivq.evaluate.volumes`, the
picture in :mod:`~mrivq.evaluate.picture`) and anomaly detection (:mod:`~mrivq.evaluate.anomaly`).
"""
