"""RunLog writes readable metrics and stops on non-finite values; benchmark JSON line."""
import json

import numpy as np
import pytest

from videolm import benchmark, runlog


def test_scalars_written_and_nan_reported_with_step(tmp_path):
    with runlog.RunLog(str(tmp_path), total_steps=3, show_progress=False) as log:
        log.scalars(1, {"loss": 2.0, "acc": np.float32(0.5)})
        log.video(1, "recon", np.zeros((1, 2, 8, 8, 3), np.float32))
        with pytest.raises(runlog.NonFiniteError, match="step 2.*loss"):
            log.scalars(2, {"loss": float("nan")})
    rows = runlog.read_metrics(str(tmp_path))
    assert rows == [{"step": 1, "split": "train", "loss": 2.0, "acc": 0.5}]
    assert (tmp_path / "tensorboard").is_dir()


def test_emit_prints_one_json_line(capsys):
    benchmark.emit({"a": np.float32(1.5), "b": 2})
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(line) == {"a": 1.5, "b": 2}
    timing = benchmark.time_fn(lambda: np.ones(3), steps=3, warmup=1)
    assert len(timing["times_s"]) == 3 and timing["min_s"] <= timing["median_s"]
