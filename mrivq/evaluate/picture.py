"""The realism picture: samples beside their nearest training (or real) volume, and histograms of the
anatomy statistics, real against synthetic."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from mrivq.io.preview import mid_slices


def realism_figure(path: Path, samples: np.ndarray, neighbours: np.ndarray, neighbour_label: str,
                   stats: dict[str, tuple[np.ndarray, np.ndarray]], title: str, rows: int = 6) -> Path:
    """Write ``path`` (PNG): ``rows`` samples (three mid-slices each) beside their nearest neighbour,
    then one histogram per entry of ``stats`` (``name -> (real values, synthetic values)``)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from mrivq.utils.atomic import atomic_write_bytes

    k = min(rows, len(samples))
    nh = max(1, len(stats))
    fig = plt.figure(figsize=(12, 2 * k + 3), dpi=80)
    gs = fig.add_gridspec(k + 1, 6 * nh, height_ratios=[1] * k + [1.6])
    span = nh  # each image panel spans nh columns, each histogram 6
    for r in range(k):
        panels = mid_slices(samples[r, 0]) + mid_slices(neighbours[r, 0])
        for c, img in enumerate(panels):
            ax = fig.add_subplot(gs[r, c * span:(c + 1) * span])
            ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                view = "axial coronal sagittal".split()[c % 3]
                ax.set_title(f"sample {view}" if c < 3 else f"{neighbour_label}\n{view}", fontsize=7)
    for i, (name, (real, synth)) in enumerate(stats.items()):
        ax = fig.add_subplot(gs[k, i * 6:(i + 1) * 6])
        vals = np.concatenate([real, synth])
        lo, hi = (float(vals.min()), float(vals.max())) if vals.size else (0.0, 1.0)
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-3, 16)
        ax.hist(real, bins=bins, alpha=0.6, label="real", color="tab:blue")
        ax.hist(synth, bins=bins, alpha=0.6, label="synthetic", color="tab:orange")
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)
