"""Memory and fill time of the preprocessed-volume cache at IXI scale: ``N`` phantom T1 subjects through
the ``vqvae3d-t1`` preprocessing (2 mm, 96x112x96), float32 against float16 (``train.cache_dtype``), filled
by 1 and by all cores (``train.cache_workers``). Prints JSON, with the figures scaled to 600 subjects
(the cache grows linearly with the subjects: one tensor each).

    python benchmarks/cache.py --count 60 --work /tmp/cache-bench
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from benchmarks.common import emit  # noqa: E402


def fill(root: Path, dtype: str, workers: int, cache: str) -> dict:
    from mrivq.config import presets as C
    from mrivq.data.datasets import make_dataset
    from mrivq.data.manifest import load_manifest, select_rows
    from mrivq.data.preprocess import Preprocess

    cfg = C.load_preset("vqvae3d-t1")
    pre = Preprocess.from_dict({**cfg["data"], "modalities": ["t1"]})
    rows = select_rows(load_manifest(root / "phantom"), ["t1"])
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    cache_dir = root / ".bench-cache" / f"{dtype}-{workers}" if cache == "disk" else None
    ds = make_dataset(rows, root / "phantom", pre, cache=cache, cache_dir=cache_dir, num_workers=workers,
                        cache_dtype=dtype)
    seconds = time.perf_counter() - t0
    if cache == "memory":
        nbytes = sum(c["image"].numel() * c["image"].element_size() for c in ds.base._cache)
    else:
        nbytes = sum(f.stat().st_size for f in cache_dir.rglob("*.pt"))
    return {"cache": cache, "dtype": dtype, "workers": workers, "subjects": len(rows),
            "fill_seconds": round(seconds, 1), "cache_mb": round(nbytes / 2**20, 1),
            "rss_growth_mb": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=60)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.one:
        cache, dtype, workers = args.one.split(":")
        print(json.dumps(fill(args.work, dtype, int(workers), cache)))
        return
    if not (args.work / "phantom" / "manifest.csv").is_file():
        subprocess.run([sys.executable, "-m", "mrivq", "fetch", "phantom", "--root", str(args.work), "--count",
                        str(args.count), "--shape", "96", "112", "96", "--spacing", "2"], check=True)
    rows = []
    cores = os.cpu_count() or 1
    for cache, dtype, workers in (("memory", "float32", 1), ("memory", "float32", cores),
                                  ("memory", "float16", cores), ("disk", "float32", cores),
                                  ("disk", "float16", cores)):
        res = subprocess.run([sys.executable, __file__, "--work", str(args.work), "--one",
                              f"{cache}:{dtype}:{workers}"], capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    scale = 600 / rows[0]["subjects"]
    at600 = {f"{r['cache']} {r['dtype']} x{r['workers']}": {"cache_gb": round(r["cache_mb"] * scale / 1024, 2),
                                                            "fill_minutes": round(r["fill_seconds"] * scale / 60, 1)}
             for r in rows}
    emit({"rows": rows, "scaled_to_600_subjects": at600}, args.out)

if __name__ == "__main__":
    main()
