"""Small services every stage uses: errors, atomic writes, paths, progress, limits on inputs, device
choice, torchrun."""
