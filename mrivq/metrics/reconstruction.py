"""How well a VQ-VAE reconstructs a set: PSNR and SSIM (MONAI's metrics), MSE, codebook use and perplexity,
overall and per class."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mrivq.data.split import iterate


class _ReconMetrics:
    """Running PSNR and SSIM (MONAI metrics), MSE, code histogram of one group of images."""

    def __init__(self, dims: int, n_codes: int) -> None:
        from monai.metrics import PSNRMetric, SSIMMetric

        self.psnr, self.ssim = PSNRMetric(max_val=1.0), SSIMMetric(spatial_dims=dims, data_range=1.0)
        self.counts = torch.zeros(n_codes, dtype=torch.long)
        self.mse: list[float] = []
        self.n = 0

    def add(self, x_hat: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> None:
        self.counts += torch.bincount(idx.flatten().cpu(), minlength=self.counts.numel())
        self.psnr(x_hat, x)
        if min(x.shape[2:]) >= 7:  # SSIM's 7-voxel window needs at least that many
            self.ssim(x_hat, x)
        self.mse.append(F.mse_loss(x_hat, x).item())
        self.n += x.shape[0]

    def result(self) -> dict:
        p = self.counts.float() / self.counts.sum().clamp(min=1)
        perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
        out = {"val_psnr": float(self.psnr.aggregate().item()), "val_mse": float(np.mean(self.mse)),
               "val_code_usage": float((self.counts > 0).float().mean()), "val_perplexity": perplexity}
        try:
            out["val_ssim"] = float(self.ssim.aggregate().item())
        except Exception:  # no SSIM computed (tiny images)
            pass
        return out



def reconstruction_metrics(model: Any, ds: Any, dims: int, batch_size: int, device: torch.device, *,
                           by_label: bool = False) -> dict:
    """Validation PSNR and SSIM (MONAI metrics), code usage and perplexity, model in eval mode.

    With ``by_label`` the same pass also measures each label's images on their own, under
    ``"by_label": {label: {metrics..., "n_images"}}`` (items without a label are only in the total)."""
    n_codes = model.num_embeddings
    total, groups = _ReconMetrics(dims, n_codes), {}
    with torch.no_grad():
        for b in iterate(ds, batch_size, device):
            x = b["image"]
            idx = model.encode_indices(x)
            x_hat = model.decode_indices(idx).float().clamp(0, 1)
            total.add(x_hat, x, idx)
            if by_label and "label" in b:
                for lab in b["label"].unique().tolist():
                    m = b["label"] == lab
                    groups.setdefault(int(lab), _ReconMetrics(dims, n_codes)).add(x_hat[m], x[m], idx[m])
    out = total.result()
    if by_label:
        out["by_label"] = {lab: {**g.result(), "n_images": g.n} for lab, g in sorted(groups.items())}
    return out
