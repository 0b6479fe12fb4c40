"""A run as a MONAI bundle (the MONAI Model Zoo format, ``docs/source/mb_specification.rst`` in MONAI).

``mrivq export --run RUN --bundle DIR`` writes::

    DIR/configs/metadata.json    the specification's mandatory keys, network_data_format, eval_metrics
    DIR/configs/inference.json   synthesizes volumes: mrivq.SyntheticDataset + MONAI's SaveImage
    DIR/configs/mrivq.json       what mrivq needs to rebuild the models (architecture, preprocessing)
    DIR/models/model.pt          the VQ-VAE's state dict (the bundle's network)
    DIR/models/prior.pt          the prior's state dict (PixelCNN or masked-token)
    DIR/docs/README.md           intended use, training data and its licence, how to run
    DIR/LICENSE

``python -m monai.bundle run --config_file DIR/configs/inference.json --bundle_root DIR`` then writes
``num_samples`` volumes to ``DIR/samples``; :class:`mrivq.SyntheticDataset` and :func:`load_bundle`
read a bundle folder like a run folder. Weights are plain state dicts, loaded with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from mrivq import __version__
from mrivq.runs.folder import file_sha256
from mrivq.runs.run import Run
from mrivq.utils.errors import MrivqError

SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"
_INFO_KEYS = ("model_config", "preprocess", "latent_shape", "image_shape", "in_channels", "intensity", "classes",
              "covariates", "dataset")


def is_bundle(path: str | Path) -> bool:
    p = Path(path)
    return (p / "configs" / "metadata.json").is_file() and (p / "configs" / "mrivq.json").is_file()


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> Run:
    """A bundle exported by :func:`export_bundle` as a :class:`~mrivq.runs.run.Run` (VQ-VAE and prior)."""
    from mrivq.data.preprocess import Preprocess
    from mrivq.models.factory import prior_from_config
    from mrivq.models.vqvae import VQVAE
    from mrivq.utils.errors import RunError

    root = Path(path)
    try:
        info = json.loads((root / "configs" / "mrivq.json").read_text())
        vq = VQVAE(**info["model_config"]["vqvae"])
        prior = prior_from_config(info["model_config"]["prior"])
        for net, name in ((vq, "model.pt"), (prior, "prior.pt")):
            net.load_state_dict(torch.load(root / "models" / name, map_location=device, weights_only=True))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise RunError(f"{root} is not a bundle exported by `mrivq export` ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200]}); export it again") from None
    run = Run(root, {}, info, Preprocess.from_dict(info["preprocess"]), vq.to(device).eval(),
              checkpoints={"vqvae": file_sha256(root / "models" / "model.pt")})
    run.prior = prior.to(device).eval()
    run.checkpoints["prior"] = file_sha256(root / "models" / "prior.pt")
    return run


def _masked(r: Run) -> bool:
    return getattr(r.prior, "family", "pixelcnn") == "maskgit"


def _prior_words(r: Run) -> str:
    return "masked-token (MaskGIT) prior" if _masked(r) else "gated PixelCNN prior"


class BundleNetwork(torch.nn.Module):
    """The bundle's network for MONAI tools (``network_def``, ``verify_net_in_out``): the VQ-VAE with
    its weights, ``forward(x) -> x_hat`` only (mrivq's VQ-VAE returns ``(x_hat, vq_loss)``, a tuple that
    MONAI's checks and inferers cannot take)."""

    def __init__(self, bundle_root: str | Path, device: str = "cpu") -> None:
        super().__init__()
        self.vqvae = load_bundle(bundle_root, device).vqvae

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vqvae(x)[0]


def _inference_config(num_samples: int) -> dict:
    return {
        "imports": ["$import mrivq"],
        "bundle_root": ".",
        "device": "cpu",
        "num_samples": num_samples,
        "seed": 0,
        "temperature": 1.0,
        "output_dir": "$@bundle_root + '/samples'",
        "network_def": {"_target_": "mrivq.inference.bundle.BundleNetwork", "bundle_root": "@bundle_root",
                        "device": "@device"},
        "dataset": {"_target_": "mrivq.SyntheticDataset", "run": "@bundle_root", "num_samples": "@num_samples",
                    "seed": "@seed", "temperature": "@temperature", "intensity": "original", "device": "@device"},
        "saver": {"_target_": "SaveImage", "output_dir": "@output_dir", "output_postfix": "", "output_ext": ".nii.gz",
                  "separate_folder": False, "resample": False, "print_log": False},
        "run": ["$[@saver(@dataset[i]['image']) for i in range(len(@dataset))]"],
    }


def _metadata(r: Run, realism: dict | None) -> dict:
    import monai
    import numpy as np

    pre, info = r.preprocess, r.info
    shape = [int(s) for s in info.get("image_shape") or pre.shape or []]
    channels = int(info.get("in_channels", 1))
    image = {"type": "image", "format": "magnitude", "modality": "MR", "num_channels": channels,
             "spatial_shape": shape, "dtype": "float32", "value_range": [0, 1], "is_patch_data": False,
             "channel_def": {str(i): m for i, m in enumerate(pre.modalities or ["image"])}}
    meta: dict[str, Any] = {
        "schema": SCHEMA_URL,
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by mrivq {__version__} from run {r.path.name}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"mrivq": __version__, "nibabel": _version("nibabel")},
        "name": f"mrivq {r.path.name}",
        "task": f"Synthesis of brain MRI volumes with a VQ-VAE and a {_prior_words(r)}",
        "description": f"VQ-VAE (model.pt) and {_prior_words(r)} (prior.pt) trained by mrivq on "
                       f"{info.get('dataset', 'unknown data')}; configs/inference.json samples volumes.",
        "authors": "mrivq",
        "copyright": "Copyright (c) the authors of the run; weights derived from the training data named in "
                     "docs/README.md",
        "data_source": str(info.get("dataset", "")),
        "data_type": "nibabel",
        "intended_use": "Research only: synthetic MRI for data augmentation and method development. Not for "
                        "diagnosis.",
        "references": ["van den Oord et al. 2017, Neural Discrete Representation Learning",
                       "van den Oord et al. 2016, Conditional Image Generation with PixelCNN Decoders"
                       if not _masked(r) else "Chang et al. 2022, MaskGIT: Masked Generative Image Transformer"],
        "network_data_format": {  # of network_def: a volume in, its reconstruction out
            "inputs": {"image": image},
            "outputs": {"pred": {**image, "type": "image"}},
        },
    }
    if realism:
        meta["eval_metrics"] = {k: v for k, v in realism.items() if isinstance(v, (int, float)) and v == v}
    return meta


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "unknown"


def _readme(r: Run, licence: str, citation: str, num_samples: int) -> str:
    ds = r.info.get("dataset", "unknown")
    licence = licence or f"see the dataset card (`mrivq datasets show {ds}`)"
    return f"""# mrivq run {r.path.name} as a MONAI bundle

Intended use: research only. Synthetic brain MRI for data augmentation, method development and shareable
synthetic cohorts. It is not a medical device and must not be used for diagnosis.

## Model
A VQ-VAE (`models/model.pt`; van den Oord et al. 2017) compresses a volume into a grid of discrete codes
{'x'.join(map(str, r.latent_shape))}; a {_prior_words(r)} (`models/prior.pt`) over that grid samples new code grids,
which the VQ-VAE decodes. Preprocessing: {json.dumps(r.preprocess.to_dict())}.

## Training data
Dataset: {ds}. Licence of the training data: {licence}.
{('Citation: ' + citation) if citation else ''}
Weights derived from data inherit its terms: check them before you share this bundle.

## Run
    python -m monai.bundle run --config_file configs/inference.json --bundle_root .

writes `num_samples` (default {num_samples}) volumes to `samples/`; override with
`--num_samples 10 --seed 3`. In Python: `mrivq.SyntheticDataset("path/to/bundle", 10)`.
"""


def export_bundle(run: str | Path | None, out: str | Path, *, overwrite: bool = False,
                  num_samples: int = 4) -> Path:
    """Write run ``run`` as a MONAI bundle folder ``out`` (see the module docstring); the folder
    appears whole (written beside it, then renamed) and replaces an existing bundle only with
    ``overwrite``."""
    from mrivq.runs.run import load_run
    from mrivq.utils.atomic import atomic_folder, atomic_write_bytes

    r = load_run(run, need_prior=True)
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise MrivqError(f"bundle folder {out} already exists; pass --overwrite or choose another --bundle")
        if not is_bundle(out):
            raise MrivqError(f"{out} exists and is not a bundle mrivq exported; choose another --bundle")
    if not out.parent.is_dir():
        raise MrivqError(f"folder {out.parent} does not exist; create it first")
    if out.resolve().is_relative_to(r.path.resolve()):
        raise MrivqError(f"bundle folder {out} is inside run {r.path.name}; choose a folder outside it")
    from mrivq.inference.synth import read_json

    realism = None
    for p in sorted(r.path.glob("**/realism.json")):
        found = read_json(p)
        if isinstance(found, dict):
            realism = found.get("metrics") or found
    licence = citation = ""
    try:
        from mrivq.datasets.catalog import get_card

        card = get_card(str(r.info.get("dataset", "")))
        licence, citation = card.licence, card.citation
    except Exception:  # noqa: BLE001 - a dataset without a card (a user's folder): say so in the README
        pass
    with atomic_folder(out) as tmp:
        for sub in ("configs", "models", "docs"):
            (tmp / sub).mkdir()
        torch.save(r.vqvae.state_dict(), tmp / "models" / "model.pt")
        torch.save(r.prior.state_dict(), tmp / "models" / "prior.pt")

        def dump(rel: str, obj: Any) -> None:
            atomic_write_bytes(tmp / rel, (json.dumps(obj, indent=2) + "\n").encode())

        dump("configs/metadata.json", _metadata(r, realism))
        dump("configs/inference.json", _inference_config(num_samples))
        info = {k: r.info[k] for k in _INFO_KEYS if k in r.info}
        if r.calibration is not None:  # tied to the bundle's own copy of the weights
            info["calibration"] = {**r.calibration, "vqvae_sha256": file_sha256(tmp / "models" / "model.pt")}
        dump("configs/mrivq.json", info)
        atomic_write_bytes(tmp / "docs" / "README.md", _readme(r, licence, citation, num_samples).encode())
        atomic_write_bytes(tmp / "LICENSE", (
            "The code that runs this bundle (mrivq) is under its own licence. These weights were trained on "
            f"{r.info.get('dataset', 'unknown data')}, licence: {licence or 'see the dataset card'}; "
            "they are shared under the same terms.\n").encode())
    return out
