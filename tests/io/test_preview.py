"""Preview images: orientation of the mid-slices and enlargement of small panels."""

import numpy as np

from mrivq.io.preview import grid, mid_slices, montage


def test_mid_slices_are_upright_views() -> None:
    vol = np.zeros((10, 12, 14), np.float32)
    vol[:, :, -1] = 1.0  # superior face
    ax, cor, sag = mid_slices(vol)
    assert ax.shape == (12, 10) and cor.shape == (14, 10) and sag.shape == (14, 12)
    assert cor[0].all() and not cor[-1].any()  # superior is at the top of the coronal view


def test_montage_enlarges_small_panels_by_an_integer_factor() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((1, 48, 56, 48)).astype(np.float32)
    img = montage([x, x], pad=2)
    # factor ceil(128 / 48) = 3: panels 144 px high, two rows plus three gutters
    assert img.shape == (2 * 168 + 3 * 2, (144 + 144 + 168) + 4 * 2)
    ax = mid_slices(x[0])[0]
    np.testing.assert_array_equal(img[2:2 + 3 * ax.shape[0]:3, 2:2 + 3 * ax.shape[1]:3], np.clip(ax, 0, 1))
    big = montage([rng.random((1, 160, 160, 160)).astype(np.float32)])
    assert big.shape == (164, 3 * 160 + 4 * 2)  # large volumes are not enlarged


def test_grid_tiles_2d_samples() -> None:
    imgs = [np.full((1, 28, 28), i / 10, np.float32) for i in range(10)]
    g = grid(imgs, ncols=4, pad=2)
    assert g.shape == (3 * (84 + 2) + 2, 4 * (84 + 2) + 2)  # 28 px tiles x3
    assert np.isclose(g[2 + 86 + 10, 2 + 10], 0.4)  # row 1, column 0 -> sample 4
