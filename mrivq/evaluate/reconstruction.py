"""``mrivq eval`` (reconstruction): a run's VQ-VAE measured on its training or validation split."""

from __future__ import annotations

from pathlib import Path

from mrivq.data.split import load_split
from mrivq.metrics.reconstruction import reconstruction_metrics
from mrivq.runs.folder import write_json
from mrivq.runs.run import load_run_on
from mrivq.utils.errors import MrivqError


def evaluate_reconstruction(run: Path | None, split: str = "val", device: str = "auto") -> dict:
    """Reconstruction metrics of the run's VQ-VAE on its train or validation split -> eval.json.

    A run conditioned on a manifest column (``data.condition_on``) is also measured per class under
    ``by_class``: a pooled T1/T2/PD run gets one PSNR per modality instead of only their mix."""

    if split not in ("val", "train"):
        raise MrivqError(f"--split {split!r} is not one of val, train")
    r, dev = load_run_on(run, device)
    sp = load_split(r.config, Path(r.info["data_dir"]), subjects=r.info.get("split"))
    ds = sp.val if split == "val" else sp.train
    bs = int(r.config.get("train", {}).get("batch_size", 2))
    names = r.class_names  # data.condition_on (e.g. pooled modalities): per class too, in the same pass
    m = reconstruction_metrics(r.vqvae, ds, r.preprocess.dims, bs, dev, by_label=bool(names))
    by_label = m.pop("by_label", None)

    def strip(d: dict) -> dict:
        return {k.removeprefix("val_"): v for k, v in d.items()}

    metrics = {**strip(m), "n_images": len(ds)}
    if by_label:
        metrics["by_class"] = {names[c]: strip(g) for c, g in by_label.items()}
    path = r.path / f"eval_{split}.json"
    write_json(path, {"split": split, "checkpoint_sha256": r.checkpoints["vqvae"], **metrics})
    return {"run": str(r.path), "metrics": metrics, "path": str(path)}
