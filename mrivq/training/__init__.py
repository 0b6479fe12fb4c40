"""Training: the loop, stage 1 (VQ-VAE), stage 2 (prior), the adversary and the run configuration."""
