"""What both training stages build from a config: their defaults, models and step counts.

Stage 1 (:mod:`mrivq.training.vqvae`) and stage 2 (:mod:`mrivq.training.prior`), and the code that loads a run,
import these from here, so neither stage module imports the other's internals.
"""

from __future__ import annotations

import torch

from mrivq.utils.errors import MrivqError


def build_vqvae(cfg: dict, in_channels: int) -> torch.nn.Module:
    from mrivq.models.vqvae import VQVAE

    mcfg = dict(cfg.get("model", {}))
    mcfg.setdefault("spatial_dims", cfg["data"]["dims"])
    mcfg.setdefault("in_channels", in_channels)
    try:
        return VQVAE(**mcfg)
    except TypeError as e:
        raise MrivqError(f"model config has a bad key ({e}); check the preset's model section") from None


PRIOR_FAMILIES = ("pixelcnn", "maskgit")
# options that only one family has (both have channels, kernel_size, position_dim and the data's sizes)
FAMILY_ONLY = {"pixelcnn": ("num_layers", "positions", "attention_every", "attention_heads", "cond_dim"),
               "maskgit": ("num_blocks", "dilations", "decode_steps", "choice_temperature")}


def prior_from_config(mcfg: dict) -> torch.nn.Module:
    """A prior from its saved constructor arguments (``prior.config``): ``family`` picks the
    autoregressive :class:`~mrivq.models.pixelcnn.GatedPixelCNN` (``pixelcnn``, the default) or the
    parallel-decoding :class:`~mrivq.models.maskgit.MaskedTokenPrior` (``maskgit``)."""
    mcfg = dict(mcfg)
    family = mcfg.pop("family", None) or "pixelcnn"
    if family not in PRIOR_FAMILIES:
        raise MrivqError(f"prior.model.family {family!r} is not one of {', '.join(PRIOR_FAMILIES)}")
    if family == "maskgit":
        from mrivq.models.maskgit import MaskedTokenPrior as cls
    else:
        from mrivq.models.pixelcnn import GatedPixelCNN as cls
    try:
        return cls(**mcfg)
    except TypeError as e:
        raise MrivqError(f"prior model config has a bad key for the {family} family ({e}); check the preset's "
                         "prior.model section") from None


def build_prior(cfg: dict, dims: int, num_embeddings: int, latent_shape: tuple[int, ...] | None = None
                ) -> torch.nn.Module:
    """The prior of ``cfg["prior"]["model"]``; ``latent_shape`` (the code grid) is filled in for
    position embeddings, which are tied to one grid (the maskgit family always has them)."""
    mcfg = dict(cfg.get("prior", {}).get("model", {}))
    family = mcfg.get("family") or "pixelcnn"
    other = [k for k in FAMILY_ONLY.get("maskgit" if family == "pixelcnn" else "pixelcnn", ()) if k in mcfg]
    if other:  # a preset's options of the other family (e.g. --set prior.model.family=maskgit on prior3d-cpu)
        import warnings

        warnings.warn(f"prior.model.{', '.join(other)} {'is' if len(other) == 1 else 'are'} not options of the "
                      f"{family} prior; ignored", stacklevel=2)
        for k in other:
            mcfg.pop(k)
    mcfg.setdefault("spatial_dims", dims)
    mcfg["num_embeddings"] = num_embeddings
    wants_grid = mcfg.get("family") == "maskgit" or mcfg.get("positions") not in (None, "none")
    if wants_grid and latent_shape is not None:
        mcfg["latent_shape"] = list(latent_shape)
    return prior_from_config(mcfg)


def total_steps(tcfg: dict, n: int, bs: int) -> int:
    """Optimizer steps of a stage: ``max_steps``, else ``epochs`` passes over ``n`` items."""
    if tcfg.get("max_steps"):
        return int(tcfg["max_steps"])
    if tcfg.get("epochs"):
        return int(tcfg["epochs"]) * max(1, n // min(bs, n))
    raise MrivqError("the config sets neither train.max_steps nor train.epochs; pass --max-steps or --epochs")
