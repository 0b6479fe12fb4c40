"""MNIST sanity check on a generated stand-in: does the ``vqvae2d-mnist`` preset reach the Keras VQ-VAE
example's reconstruction quality (test MSE / training-data variance <= 0.045 after 30 epochs)?

Real MNIST cannot be downloaded here, so this script

1. builds an MNIST stand-in (28 x 28 uint8 grey digits 0-9, 60,000 train + 10,000 test, seeded): each
   digit is rendered with PIL from a randomly chosen DejaVu TrueType face (PIL's bitmap font, scaled
   up, when no scalable font is found), given a random stroke thickness (grey dilation / erosion), a
   random affine map (rotation +-15 deg, scale, shear, translation), a mild elastic distortion and a
   gaussian blur, then normalised the way MNIST was: fitted into a 20 x 20 box (aspect kept,
   anti-aliased) and placed in 28 x 28 by its centre of mass (plus a small sub-pixel jitter). The
   images and labels are written as gzip IDX files named exactly like MNIST's, with a dataset card
   ``mnist-standin.yaml`` (same schema as ``datasets/mnist.yaml``, md5s of the generated files);
2. runs the pipeline through the CLI as a user would::

       python -m mrivq fetch <work>/mnist-standin.yaml --root <work>/root --from <work>/files
       python -m mrivq train --dataset mnist-standin --root <work>/root --dims 2 --preset vqvae2d-mnist \\
           --stage vqvae --out <run> --device cpu [--epochs N]

3. loads the run (``mrivq.load_run``) and measures on the 10,000 test images, in [0, 1] (uint8 / 255):
   reconstruction MSE, MSE / variance of the training images (the Keras example's
   ``reconstruction_loss``), PSNR, code usage and perplexity. Prints one JSON object, writes it to
   ``benchmarks/results/mnist_standin.json`` and a PNG of 16 test inputs over their reconstructions to
   ``benchmarks/results/mnist_standin.png``.

Full run (the preset's 30 epochs at batch 128)::

    OMP_NUM_THREADS=2 python benchmarks/mnist_standin.py

Smoke test: ``--epochs 1 --n-train 2000 --n-test 500 --results none``. ``--eval-only`` re-measures an
existing run without training.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout

NAME = "mnist-standin"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
TARGET = 0.045  # Keras VQ-VAE example, MNIST, 30 epochs
CANVAS = 96  # high-resolution rendering canvas (pixels)
FONT_SIZE = 64
# DejaVu faces that look like plain digits (the maths face is left out).
FONT_NAMES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSans-ExtraLight.ttf", "DejaVuSansCondensed.ttf", "DejaVuSansCondensed-Bold.ttf",
    "DejaVuSansCondensed-Oblique.ttf", "DejaVuSansCondensed-BoldOblique.ttf", "DejaVuSansMono.ttf",
    "DejaVuSansMono-Oblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerifCondensed.ttf",
    "DejaVuSerifCondensed-Italic.ttf",
)


# ----------------------------------------------------------------------------------------------------
# 1. the stand-in
# ----------------------------------------------------------------------------------------------------


def find_fonts() -> list[str]:
    """Paths of the DejaVu faces (via ``fc-list``, then the usual folder); empty when there are none."""
    found: dict[str, str] = {}
    try:
        out = subprocess.run(["fc-list", ":", "file"], capture_output=True, text=True, timeout=20).stdout
        for line in out.splitlines():
            p = line.split(":")[0].strip()
            found.setdefault(os.path.basename(p), p)
    except (OSError, subprocess.SubprocessError):
        pass
    for d in ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/TTF", "/usr/share/fonts/dejavu"):
        if os.path.isdir(d):
            for f in os.listdir(d):
                found.setdefault(f, os.path.join(d, f))
    return [found[n] for n in FONT_NAMES if n in found and os.path.isfile(found[n])]


_FONTS: dict[str, object] = {}


def _font(path: str | None):
    from PIL import ImageFont

    key = path or ""
    if key not in _FONTS:
        _FONTS[key] = ImageFont.truetype(path, FONT_SIZE) if path else ImageFont.load_default()
    return _FONTS[key]


def _glyph(digit: int, font_path: str | None) -> np.ndarray:
    """The digit in white on black, float32 [CANVAS, CANVAS], roughly centred."""
    from PIL import Image, ImageDraw

    if font_path is None:  # PIL's small bitmap font: draw small, scale up
        small = Image.new("L", (24, 24), 0)
        ImageDraw.Draw(small).text((12, 12), str(digit), fill=255, font=_font(None), anchor="mm")
        img = small.resize((CANVAS, CANVAS), Image.BICUBIC)
    else:
        img = Image.new("L", (CANVAS, CANVAS), 0)
        ImageDraw.Draw(img).text((CANVAS / 2, CANVAS / 2), str(digit), fill=255, font=_font(font_path),
                                 anchor="mm")
    return np.asarray(img, dtype=np.float32) / 255.0


def _disk(r: int) -> np.ndarray:
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    return x * x + y * y <= r * r + 0.5


def render_digit(digit: int, rng: np.random.Generator, fonts: list[str]) -> np.ndarray:
    """One 28 x 28 uint8 MNIST-like image of ``digit``."""
    from PIL import Image
    from scipy import ndimage as ndi

    font = fonts[int(rng.integers(len(fonts)))] if fonts else None
    g = _glyph(digit, font)
    # stroke thickness: grey dilation (thicker) or erosion (thinner) with a disk
    r = int(rng.integers(-2, 5))
    if r > 0:
        g = ndi.grey_dilation(g, footprint=_disk(r))
    elif r < 0:
        g2 = ndi.grey_erosion(g, footprint=_disk(-r))
        g = g2 if g2.sum() > 0.6 * g.sum() else g  # never break thin strokes apart
    # random affine about the centre: rotation, anisotropic scale, shear, translation
    th = np.deg2rad(rng.uniform(-15, 15))
    sx, sy = rng.uniform(0.8, 1.15), rng.uniform(0.85, 1.15)
    sh = rng.uniform(-0.3, 0.3)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    a = rot @ np.array([[1.0, sh], [0.0, 1.0]]) @ np.diag([sy, sx])  # (row, col) coordinates
    t = rng.uniform(-6, 6, size=2)
    c = np.array([CANVAS / 2, CANVAS / 2])
    inv = np.linalg.inv(a)
    g = ndi.affine_transform(g, inv, offset=c - inv @ (c + t), order=1, mode="constant")
    # mild elastic distortion (smooth random displacement field), as for handwriting wobble
    alpha, sigma = rng.uniform(0, 5), 8.0
    dy = ndi.gaussian_filter(rng.uniform(-1, 1, g.shape), sigma) * alpha / 0.05
    dx = ndi.gaussian_filter(rng.uniform(-1, 1, g.shape), sigma) * alpha / 0.05
    yy, xx = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float64)
    g = ndi.map_coordinates(g, [yy + dy, xx + dx], order=1, mode="constant")
    g = ndi.gaussian_filter(g, rng.uniform(0.5, 1.5))  # pen blur
    # MNIST normalisation: bounding box -> 20 x 20 (aspect kept, anti-aliased) -> centre of mass in 28 x 28
    ys, xs = np.nonzero(g > 0.05)
    if ys.size == 0:
        ys, xs = np.array([CANVAS // 2]), np.array([CANVAS // 2])
    box = g[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = box.shape
    k = 20.0 / max(h, w)
    nh, nw = max(1, round(h * k)), max(1, round(w * k))
    small = Image.fromarray(np.clip(box * 255, 0, 255).astype(np.uint8)).resize((nw, nh), Image.LANCZOS)
    out = np.zeros((28, 28), np.float32)
    oy, ox = (28 - nh) // 2, (28 - nw) // 2
    out[oy:oy + nh, ox:ox + nw] = np.asarray(small, np.float32)
    cy, cx = ndi.center_of_mass(out)
    jitter = rng.normal(0, 0.4, size=2)
    out = ndi.shift(out, (13.5 - cy + jitter[0], 13.5 - cx + jitter[1]), order=1, mode="constant")
    out *= 255.0 / max(float(out.max()), 1.0)  # strokes saturate at 255 like MNIST's
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _render_chunk(args: tuple[int, int, int, int, list[str]]) -> tuple[np.ndarray, np.ndarray]:
    seed, split_id, start, stop, fonts = args
    imgs = np.empty((stop - start, 28, 28), np.uint8)
    labels = np.empty(stop - start, np.uint8)
    for j, i in enumerate(range(start, stop)):
        rng = np.random.default_rng([seed, split_id, i])  # per image: independent of chunking
        labels[j] = int(rng.integers(10))
        imgs[j] = render_digit(int(labels[j]), rng, fonts)
    return imgs, labels


def make_split(n: int, split_id: int, seed: int, fonts: list[str], workers: int) -> tuple[np.ndarray, np.ndarray]:
    chunk = 1000
    jobs = [(seed, split_id, s, min(n, s + chunk), fonts) for s in range(0, n, chunk)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            parts = list(ex.map(_render_chunk, jobs))
    else:
        parts = [_render_chunk(j) for j in jobs]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def write_idx_gz(path: Path, arr: np.ndarray) -> None:
    """uint8 IDX (magic 0x0000 08 ndim, big-endian u4 sizes), gzip with a fixed mtime (reproducible md5)."""
    header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
        gz.write(header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes())
    path.write_bytes(buf.getvalue())


def md5sum(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def describe(fonts: list[str]) -> str:
    faces = f"{len(fonts)} DejaVu TrueType faces" if fonts else "PIL's default bitmap font scaled up"
    return (f"generated MNIST stand-in (not real MNIST): digits 0-9 (uniform labels) rendered with PIL from "
            f"{faces}, stroke thickness by grey dilation/erosion (disk radius -2..+4 at {CANVAS} px), random "
            "affine (rotation +-15 deg, scale 0.8-1.15 x 0.85-1.15, shear +-0.3, translation), mild elastic "
            "distortion, gaussian blur (sigma 0.5-1.5 px at high res), fitted into 20x20 (aspect kept, "
            "Lanczos) and centred by centre of mass in 28x28 (+-0.4 px jitter), strokes saturating at 255; "
            "28x28 uint8, gzip IDX files named like MNIST's")


def build_standin(work: Path, n_train: int, n_test: int, seed: int, workers: int) -> dict:
    """Write the four IDX files into ``work/files`` and the card ``work/mnist-standin.yaml`` (cached)."""
    import yaml

    files = work / "files"
    card_path = work / f"{NAME}.yaml"
    meta_path = work / "standin.json"
    want = {"n_train": n_train, "n_test": n_test, "seed": seed, "canvas": CANVAS, "version": 1}
    if meta_path.is_file() and card_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("params") == want and all((files / f).is_file() for pair in FILES.values() for f in pair):
            return meta
    fonts = find_fonts()
    files.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stats = {}
    for split_id, (split, n) in enumerate((("train", n_train), ("test", n_test))):
        imgs, labels = make_split(n, split_id, seed, fonts, workers)
        write_idx_gz(files / FILES[split][0], imgs)
        write_idx_gz(files / FILES[split][1], labels)
        x = imgs.astype(np.float64) / 255.0
        stats[split] = {"n": int(n), "mean": float(x.mean()), "std": float(x.std()), "var": float(x.var()),
                        "label_counts": np.bincount(labels, minlength=10).tolist()}
    gen_s = time.perf_counter() - t0
    entries = []
    for split in ("train", "test"):
        for kind, fname in zip(("images", "labels"), FILES[split], strict=True):
            e = {"url": f"http://127.0.0.1/{fname}", "size": (files / fname).stat().st_size,
                 "md5": md5sum(files / fname)}
            if kind == "images":
                e["modality"] = "image"
            e.update(role="data", extract=False)
            entries.append(e)
    card = {
        "name": NAME,
        "title": "MNIST stand-in (generated digits)",
        "description": describe(fonts) + f"; {n_train} training and {n_test} test images, seed {seed}.",
        "licence": "generated (no licence restrictions)",
        "citation": "generated by benchmarks/mnist_standin.py in mrivq",
        "homepage": "http://127.0.0.1/",
        "access": "open",
        "layout": "idx",
        "dims": 2,
        "modalities": ["image"],
        "files": entries,
        "options": {
            "splits": {"train": {"images": FILES["train"][0], "labels": FILES["train"][1]},
                       "test": {"images": FILES["test"][0], "labels": FILES["test"][1]}},
            "classes": [str(d) for d in range(10)],
        },
    }
    card_path.write_text(yaml.safe_dump(card, sort_keys=False, width=100))
    meta = {"params": want, "description": describe(fonts), "fonts": [os.path.basename(f) for f in fonts],
            "generate_s": round(gen_s, 1), "stats": stats}
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta


# ----------------------------------------------------------------------------------------------------
# 2. the pipeline, through the CLI
# ----------------------------------------------------------------------------------------------------


def cli(args: list[str], log: Path) -> float:
    """Run ``python -m mrivq ARGS`` in the checkout, output to ``log``; wall seconds. Raises on failure."""
    cmd = [sys.executable, "-m", "mrivq", *args]
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = "".join(open(log).readlines()[-20:])
        raise SystemExit(f"`mrivq {args[0]}` failed (exit {rc}); log {log}:\n{tail}")
    return wall


# ----------------------------------------------------------------------------------------------------
# 3. measurement
# ----------------------------------------------------------------------------------------------------


def evaluate(run_dir: Path, files: Path, data_dir: Path, batch: int = 500) -> dict:
    import torch

    import mrivq
    from mrivq.data.datasets import make_dataset
    from mrivq.data.manifest import load_manifest, select_rows, split_subjects
    from mrivq.datasets.layouts.idx import read_idx

    run = mrivq.load_run(run_dir)
    model = run.vqvae
    x_train = read_idx(files / FILES["train"][0]).astype(np.float64) / 255.0
    train_var = float(x_train.var())  # as the Keras example: np.var(x_train / 255.0)
    x_test = torch.from_numpy(read_idx(files / FILES["test"][0]).astype(np.float32) / 255.0)[:, None]

    # The pipeline's own test items must be exactly these arrays (uint8 / 255, no padding at 28 x 28).
    rows = select_rows(load_manifest(data_dir), run.preprocess.modalities)
    _, test_rows = split_subjects(rows)
    ds = make_dataset(test_rows, data_dir, run.preprocess, cache="none")
    assert len(ds) == len(x_test), (len(ds), len(x_test))
    for i in (0, len(ds) // 2, len(ds) - 1):
        j = int(ds[i]["subject"].split("-")[1])
        diff = float((torch.as_tensor(ds[i]["image"]).float() - x_test[j]).abs().max())
        assert diff < 1e-6, f"pipeline item {ds[i]['subject']} differs from the IDX array by {diff}"

    k = model.num_embeddings
    counts = torch.zeros(k, dtype=torch.long)
    se = se_clamped = 0.0
    psnrs = []
    recon = []
    with torch.no_grad():
        for s in range(0, len(x_test), batch):
            x = x_test[s:s + batch]
            idx = model.encode_indices(x)
            x_hat = model.decode_indices(idx).float()
            counts += torch.bincount(idx.flatten(), minlength=k)
            se += float(((x_hat - x) ** 2).sum())
            xc = x_hat.clamp(0, 1)
            se_clamped += float(((xc - x) ** 2).sum())
            per = ((xc - x) ** 2).flatten(1).mean(1).clamp(min=1e-10)
            psnrs.append(10 * torch.log10(1.0 / per))
            if s == 0:
                recon = xc[:16]
    n_px = x_test.numel()
    mse, mse_c = se / n_px, se_clamped / n_px
    p = counts.float() / counts.sum()
    ppl = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    return {
        "mse": mse, "mse_clamped": mse_c, "train_variance": train_var,
        "mse_over_variance": mse / train_var, "mse_over_variance_clamped": mse_c / train_var,
        "psnr_db": float(torch.cat(psnrs).mean()),
        "code_usage": float((counts > 0).float().mean()), "codes_used": int((counts > 0).sum()),
        "num_embeddings": k, "perplexity": ppl, "latent_shape": list(run.latent_shape),
        "_inputs": x_test[:16], "_recon": recon,
    }


def save_grid(path: Path, x: np.ndarray, y: np.ndarray, zoom: int = 4) -> None:
    """Row of inputs over row of reconstructions, each 28 x 28 scaled by ``zoom``, 2-px grey gutters."""
    from PIL import Image

    n, s, gap = len(x), 28 * zoom, 2
    canvas = np.full((2 * s + 3 * gap, n * s + (n + 1) * gap), 128, np.uint8)
    for r, imgs in enumerate((x, y)):
        for i in range(n):
            tile = np.kron(np.clip(np.asarray(imgs[i]).reshape(28, 28), 0, 1), np.ones((zoom, zoom)))
            y0, x0 = gap + r * (s + gap), gap + i * (s + gap)
            canvas[y0:y0 + s, x0:x0 + s] = np.round(tile * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "python": platform.python_version(), "platform": platform.platform()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mrivq-mnist-standin",
                    help="work folder (files, card, data root, runs)")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default: the preset's 30)")
    ap.add_argument("--n-train", type=int, default=60000)
    ap.add_argument("--n-test", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0, help="stand-in seed")
    ap.add_argument("--workers", type=int, default=2, help="processes generating the stand-in")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="vqvae2d-mnist")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="passed to `mrivq train --set`")
    ap.add_argument("--eval-only", action="store_true", help="measure the existing run, don't train")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "mnist_standin"),
                    help="path prefix for .json and .png ('none': don't write)")
    a = ap.parse_args()

    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    tag = f"n{a.n_train}-{a.n_test}-s{a.seed}"
    sw = work / tag
    meta = build_standin(sw, a.n_train, a.n_test, a.seed, a.workers)
    st = meta["stats"]["train"]
    print(f"stand-in: {sw / 'files'} (generated in {meta['generate_s']} s; "
          f"train mean {st['mean']:.4f}, var {st['var']:.4f})", file=sys.stderr, flush=True)
    root = sw / "root"
    run_dir = sw / "runs" / f"{a.preset}-e{a.epochs or 'preset'}" if not a.sets else sw / "runs" / (
        f"{a.preset}-e{a.epochs or 'preset'}-" + hashlib.md5("|".join(a.sets).encode()).hexdigest()[:8])
    fetch_args = ["fetch", str(sw / f"{NAME}.yaml"), "--root", str(root), "--from", str(sw / "files")]
    train_args = ["train", "--dataset", NAME, "--root", str(root), "--dims", "2", "--preset", a.preset,
                  "--stage", "vqvae", "--out", str(run_dir), "--device", a.device]
    if a.epochs:
        train_args += ["--epochs", str(a.epochs)]
    for s in a.sets:
        train_args += ["--set", s]
    wall = None
    if not a.eval_only:
        cli(fetch_args, sw / "fetch.log")
        if run_dir.exists():
            shutil.rmtree(run_dir)  # our own previous run of this configuration
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        wall = cli(train_args, sw / "train.log")
    info = json.loads((run_dir / "run.json").read_text())
    steps = int(info.get("stages", {}).get("vqvae", {}).get("steps", 0))
    n_train = int(info.get("n_train", a.n_train))
    m = evaluate(run_dir, sw / "files", root / NAME)
    inputs, recon = m.pop("_inputs"), m.pop("_recon")
    bs = 128
    epochs_run = steps * bs / n_train if n_train else None
    result = {
        "standin": meta["description"] + f"; {a.n_train} train + {a.n_test} test images, seed {a.seed}",
        "standin_stats": {s: {k: v for k, v in d.items() if k != "label_counts"} for s, d in meta["stats"].items()},
        "preset": a.preset, "overrides": a.sets,
        "epochs": round(epochs_run, 3) if epochs_run else None, "epochs_requested": a.epochs or 30,
        "batch_size": bs, "steps": steps, "wall_s": round(wall, 1) if wall else None,
        "s_per_step": round(wall / steps, 4) if wall and steps else None,
        **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in m.items()},
        "target": TARGET, "passes": m["mse_over_variance"] <= TARGET,
        "measured_on": f"the {a.n_test} test images, uint8/255 in [0, 1]; variance of the {a.n_train} training "
                       "images; mse = mean over all test pixels of (decoder output - input)^2 (unclamped, as Keras)",
        "commands": ["python -m mrivq " + " ".join(fetch_args), "python -m mrivq " + " ".join(train_args)],
        "run_dir": str(run_dir),
        "machine": {**machine(), "loadavg_before": [round(v, 2) for v in load_before],
                    "loadavg_after": [round(v, 2) for v in os.getloadavg()], "device": a.device},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if a.results != "none":
        prefix = Path(a.results)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        Path(str(prefix) + ".json").write_text(text + "\n")
        save_grid(Path(str(prefix) + ".png"), inputs.numpy(), recon.numpy())


if __name__ == "__main__":
    main()
