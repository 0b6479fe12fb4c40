"""Named feature extractors for FID (Heusel et al. 2017). An FID is only meaningful with the network
that produced the features named beside it, so mrivq ships none and downloads none: the user supplies
the weights, e.g. a MedicalNet ResNet (Chen et al. 2019, *Med3D*) checkpoint, loaded into MONAI's
ResNet definition with ``weights_only=True``.

``--features medicalnet:PATH`` (depth read from the checkpoint) or ``medicalnet50:PATH`` (depth given).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from mrivq.utils.errors import MrivqError

KINDS = ("medicalnet",)
# blocks per stage -> depth (basic blocks; the same counts with bottlenecks are the next deeper nets)
_DEPTHS = {(1, 1, 1, 1): 10, (2, 2, 2, 2): 18, (3, 4, 6, 3): 34}
_BOTTLENECK = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152, (3, 24, 36, 3): 200}


class FeatureExtractor:
    """A frozen network mapping ``[N, C, *spatial]`` volumes to ``[N, F]`` feature rows."""

    def __init__(self, net: torch.nn.Module, name: str) -> None:
        self.net = net.eval()
        self.name = name

    @torch.no_grad()
    def __call__(self, x: np.ndarray | torch.Tensor, batch: int = 4) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(x), dtype=torch.float32)[:, :1]
        out = []
        for s in range(0, len(t), batch):
            v = t[s:s + batch]
            # MedicalNet was trained on volumes z-scored over their foreground
            fg = v > 0
            mean = (v * fg).flatten(1).sum(1) / fg.flatten(1).sum(1).clamp(min=1)
            var = (((v - mean.view(-1, 1, 1, 1, 1)) * fg) ** 2).flatten(1).sum(1) / fg.flatten(1).sum(1).clamp(min=1)
            v = (v - mean.view(-1, 1, 1, 1, 1)) / var.sqrt().clamp(min=1e-6).view(-1, 1, 1, 1, 1)
            out.append(self.net(v).flatten(1).double())
        return torch.cat(out)


def _strip(state: dict) -> dict:
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("not a state dict")
    out = {k.removeprefix("module."): v for k, v in state.items()}
    return {k: v for k, v in out.items() if not k.startswith(("conv_seg.", "fc."))}


def _depth_of(state: dict) -> int:
    blocks = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    table = _BOTTLENECK if any(k.endswith("conv3.weight") for k in state) else _DEPTHS
    if blocks not in table:
        raise ValueError(f"no ResNet depth has {blocks} blocks per stage")
    return table[blocks]


def load_features(spec: str) -> FeatureExtractor:
    """``KIND[:PATH]`` -> a :class:`FeatureExtractor`. Raises :class:`MrivqError` for an unknown kind,
    a missing or unreadable file, or a checkpoint that does not match the architecture."""
    from monai.networks.nets import resnet
    from monai.networks.nets.resnet import get_medicalnet_pretrained_resnet_args

    kind, _, path = spec.partition(":")
    base = kind.rstrip("0123456789")
    if base not in KINDS:
        raise MrivqError(f"--features {spec!r}: unknown kind {kind!r}; use medicalnet:PATH (a MedicalNet "
                         f"ResNet checkpoint, e.g. resnet_10_23dataset.pth)")
    if not path:
        raise MrivqError(f"--features {spec!r} names no weights; no weights can be downloaded by mrivq, "
                         f"pass {base}:PATH to a checkpoint you have")
    p = Path(path)
    if not p.is_file():
        raise MrivqError(f"--features: weights {p} do not exist; pass the path of a {base} checkpoint")
    try:
        state = _strip(torch.load(p, map_location="cpu", weights_only=True))
        depth = int(kind[len(base):]) if kind != base else _depth_of(state)
        bias_downsample, shortcut = get_medicalnet_pretrained_resnet_args(depth)
        make = getattr(resnet, f"resnet{depth}", None)
        if make is None:
            raise ValueError(f"MONAI has no resnet{depth}")
        net = make(spatial_dims=3, n_input_channels=1, feed_forward=False, shortcut_type=shortcut,
                   bias_downsample=bias_downsample)
        net.load_state_dict(state, strict=True)
    except MrivqError:
        raise
    except Exception as e:  # unpickling refused, wrong keys or shapes, unknown depth
        msg = str(e).splitlines()[0][:160]
        raise MrivqError(f"--features: {p} is not a MedicalNet ResNet checkpoint that fits MONAI's ResNet "
                         f"({type(e).__name__}: {msg}); pass the matching medicalnetDEPTH:PATH") from None
    sha = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    return FeatureExtractor(net, f"MedicalNet ResNet-{depth} global-average-pooled features "
                                 f"({p.name}, sha256 {sha}...)")


def fid(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance of two sets of feature rows (MONAI's ``FIDMetric``)."""
    import warnings

    from monai.metrics import FIDMetric

    with warnings.catch_warnings():  # fewer volumes than features: a singular covariance, expected
        warnings.simplefilter("ignore")
        return float(FIDMetric()(a.double(), b.double()))
