"""What the command groups share: the consoles and the options several commands take."""

from __future__ import annotations

import typer
from rich.console import Console

out = Console()
err = Console(stderr=True)

RootOpt = typer.Option(None, "--root", help="Data root (default: $MRIVQ_DATA, else a per-user data folder).")
# = mrivq.inference.heal.HealOptions' defaults (not imported here: the CLI starts fast);
# benchmarks/anomaly.py chose them
HEAL_THRESHOLD, HEAL_SMOOTH = 0.05, 2.0
# healing's options, shared by `score --heal` and `eval --anomaly`
HealThresholdOpt = typer.Option(HEAL_THRESHOLD, "--threshold", help="Healing: redraw codes whose probability "
                                "under the prior is below this.")
HealResamplesOpt = typer.Option(4, "--resamples", help="Healing: healed versions averaged.")
HealZscoreOpt = typer.Option(0.0, "--zscore", help="Healing: flag codes this many SDs above their position's NLL "
                             "on the training codes, instead of --threshold (0: off).")
HealSmoothOpt = typer.Option(HEAL_SMOOTH, "--smooth", help="Healing: Gaussian sigma (voxels) of the maps.")
HealCalibrateOpt = typer.Option(None, "--calibrate/--no-calibrate", help="Healing: compare the input with "
                                "reconstructions through the run's intensity calibration (default: when the run "
                                "has one; raw measures alike).", show_default=False)
HealNormalizeOpt = typer.Option(None, "--normalize/--no-normalize", help="Healing: residuals as per-voxel z-scores "
                                "against the reconstruction residuals of the run's healthy validation scans "
                                "(default: for 3D runs whose dataset or stored reference is there; measured "
                                "better).", show_default=False)
RunOpt = typer.Option(None, "--run", help="Run folder (default: the most recent under ./runs).")


def human_size(n: int | float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
