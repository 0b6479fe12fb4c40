"""Which device runs the work and in which precision: ``--device`` and ``train.amp`` resolved once."""

from __future__ import annotations

import torch

from mrivq.utils.errors import MrivqError


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU. Asking for CUDA without one is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MrivqError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise MrivqError(f"--device {device!r} is not one of auto, cpu, cuda")
    return torch.device(device)



def amp_dtype(device: torch.device, mode: str = "auto") -> torch.dtype | None:
    """Autocast dtype: ``auto`` is bf16 where the GPU computes it natively (Ampere and later), else fp16
    (V100 and T4 only emulate bf16, slower than fp32); on CPU only what is asked (``bf16``/``fp16``)."""
    if mode in ("off", "none", False, None):
        return None
    if mode not in ("auto", "bf16", "fp16"):
        raise MrivqError(f"train.amp={mode!r} is not one of auto, bf16, fp16, off")
    if mode == "fp16":
        return torch.float16
    if mode == "bf16":
        return torch.bfloat16
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
