"""Numbers from arrays: reconstruction, realism (two-sample tests, diversity, anatomy), anomaly, named features."""
