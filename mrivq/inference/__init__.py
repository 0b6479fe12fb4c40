"""Using a trained run: samplers, healing, encode/decode/reconstruct/score files, synth, SyntheticDataset, bundles."""
