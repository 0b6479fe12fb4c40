"""Preview montages: three orthogonal mid-slices for 3D, the image itself for 2D."""

from __future__ import annotations

import numpy as np

MIN_PANEL = 128  # panels are enlarged (nearest neighbour, integer factor) to at least this many pixels


def _upscale(img: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement by an integer factor (keeps voxels visible as blocks)."""
    return img if factor <= 1 else np.repeat(np.repeat(img, factor, axis=0), factor, axis=1)


def _factor(panels: list[np.ndarray], min_size: int) -> int:
    """Smallest integer factor that makes the smallest panel side at least ``min_size`` pixels."""
    smallest = min(min(p.shape[:2]) for p in panels)
    return max(1, -(-min_size // max(smallest, 1)))


def mid_slices(vol: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal and sagittal mid-slices of a [X, Y, Z] RAS volume, displayed upright."""
    x, y, z = (s // 2 for s in vol.shape)
    # Rotate so anterior/superior point up, as radiologists look at them.
    return [np.rot90(vol[:, :, z]), np.rot90(vol[:, y, :]), np.rot90(vol[x, :, :])]


def _panel(img: np.ndarray) -> list[np.ndarray]:
    """[C, *spatial] -> list of 2D (or HxWx3) panels."""
    if img.ndim == 4:  # 3D: first channel's mid-slices
        return mid_slices(img[0])
    if img.shape[0] == 3:  # RGB 2D
        return [np.rot90(np.moveaxis(img, 0, -1))]
    return [np.rot90(img[0])]


def montage(rows: list[np.ndarray], pad: int = 2, min_size: int = MIN_PANEL) -> np.ndarray:
    """Grid image: one row per input (each [C, *spatial]), panels side by side, values clipped to [0, 1].

    Small panels (a 4 mm volume is 48 voxels across) are enlarged to at least ``min_size`` pixels.
    """
    panel_rows = [_panel(np.asarray(r, dtype=np.float32)) for r in rows]
    f = _factor([p for row in panel_rows for p in row], min_size)
    panel_rows = [[_upscale(p, f) for p in row] for row in panel_rows]
    h = max(p.shape[0] for row in panel_rows for p in row)
    w_per = [max(row[i].shape[1] for row in panel_rows) for i in range(len(panel_rows[0]))]
    rgb = panel_rows[0][0].ndim == 3
    width = sum(w_per) + pad * (len(w_per) + 1)
    height = h * len(panel_rows) + pad * (len(panel_rows) + 1)
    out = np.zeros((height, width, 3) if rgb else (height, width), np.float32)
    for r, row in enumerate(panel_rows):
        y0 = pad + r * (h + pad)
        x0 = pad
        for i, p in enumerate(row):
            out[y0:y0 + p.shape[0], x0:x0 + p.shape[1]] = p
            x0 += w_per[i] + pad
    return np.clip(out, 0.0, 1.0)


def grid(images: list[np.ndarray], ncols: int = 8, pad: int = 2, min_size: int = 84) -> np.ndarray:
    """Tile 2D samples ([C, H, W] each) into one grid image, tiles enlarged to >= ``min_size`` pixels."""
    ncols = max(1, min(ncols, len(images)))
    nrows = -(-len(images) // ncols)
    tiles = [_panel(np.asarray(im, dtype=np.float32))[0] for im in images]
    f = _factor(tiles, min_size)
    tiles = [_upscale(t, f) for t in tiles]
    h, w = tiles[0].shape[:2]
    shape = (nrows * (h + pad) + pad, ncols * (w + pad) + pad) + tiles[0].shape[2:]
    out = np.zeros(shape, np.float32)
    for i, t in enumerate(tiles):
        r, c = divmod(i, ncols)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = t
    return np.clip(out, 0.0, 1.0)
