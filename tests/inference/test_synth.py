"""synth on a run whose prior stopped before its end says so, in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from tests.helpers import mrivq_main


def test_synth_on_a_prior_that_stopped_early_says_how_far_it_got(trained_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["prior"]["train"]["max_steps"] = 12  # as asked; the checkpoint is at step 6 and the stage not done
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    info = json.loads((run / "run.json").read_text())
    info["stages"]["prior"]["done"] = False
    (run / "run.json").write_text(json.dumps(info))
    res = mrivq_main("synth", "--run", str(run), "--count", "1", "--out", str(tmp_path / "s"), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    notes = [x for x in res.stderr.splitlines() if "stopped at step" in x]
    assert len(notes) == 1 and "stopped at step 6 of 12" in notes[0] and "--resume" in notes[0], res.stderr
    finished = mrivq_main("synth", "--run", str(trained_run), "--count", "1", "--out", str(tmp_path / "t"),
                          "--device", "cpu")
    assert finished.returncode == 0 and "stopped at step" not in finished.stderr
