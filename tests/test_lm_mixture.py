"""LM training on token shards with the task mixture: per-task validation against the unigram
baseline, bounded padding and shapes, resume from the workdir."""
import json
import os

import numpy as np
import pytest

from videolm import configlib, lm_data, runlog, tokenize
from videolm.train import evaluate, train
from videolm.vocab import VocabLayout

LAYOUT = VocabLayout(text_size=16, video_bits=6, audio_levels=2, audio_codes=8)
T, H, W, AUDIO_FRAMES = 3, 2, 2, 6


def _record(rng, index):
    """A clip's tokens where the outputs follow the inputs (the video repeats its first frame,
    the audio its caption's first piece), so a model can beat the unigram baseline."""
    text = rng.integers(0, LAYOUT.text_size, rng.integers(3, 5))
    image = rng.integers(0, 2 ** LAYOUT.video_bits, (1, H, W))
    video = np.repeat(image, T, axis=0)
    audio = np.full((LAYOUT.audio_levels, AUDIO_FRAMES), text[0] % LAYOUT.audio_codes)
    noise = lambda: rng.integers(0, 2 ** LAYOUT.video_bits, (T, H, W)).astype(np.int32)  # noqa: E731
    return {"index": index, "caption": "", "text": text.astype(np.int32), "video": video.astype(np.int32),
            "image": image.astype(np.int32), "audio": audio.astype(np.int32), "control": noise(),
            "inpaint": noise(), "outpaint": noise()}


@pytest.fixture(scope="module")
def tokens_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    LAYOUT.save(str(root / "layout.json"))
    rng = np.random.default_rng(0)
    for split, count in (("train", 64), ("validation", 16)):
        os.makedirs(root / split)
        tokenize.write_shard(str(root / split / tokenize.shard_name(0, 1)), [_record(rng, i) for i in range(count)])
    return str(root)


OVERRIDES = ("model.width=32", "model.depth=1", "model.num_heads=2", "model.num_kv_heads=1", "model.mlp_dim=64",
             "model.attention_impl=xla", "data.batch_size=8", "data.length_multiple=8", "train.num_steps=4",
             "train.log_every=1", "train.eval_every=2", "train.checkpoint_every=2", "train.warmup_steps=1",
             "eval.num_batches=1", "eval.batch_size=8")


def _config(tokens_dir, *extra):
    config = configlib.load_config("configs/lm.py:tiny", OVERRIDES + (f"data.tokens_dir={tokens_dir}",) + extra)
    # three tasks keep the test's compiled shapes few
    config.mixture.weights = dict(t2v=1.0, t2i=1.0, v2a=1.0)
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokens_dir):
    root = tmp_path_factory.mktemp("lm_mixture")
    config = _config(tokens_dir)
    whole, resumed = str(root / "whole"), str(root / "resumed")
    train(config, whole)
    train(config, resumed, stop_at_step=2)
    train(config, resumed)
    return config, whole, resumed


def test_layout_comes_from_the_shards(tokens_dir):
    config = _config(tokens_dir)
    assert lm_data.build_layout(config) == LAYOUT


def test_batches_follow_the_mixture_with_bounded_shapes(tokens_dir):
    config = _config(tokens_dir, "train.num_steps=40")
    batches = lm_data.mixture_batches(config, LAYOUT)
    names = set()
    for step in range(40):
        batch = batches[step]
        assert batch["tokens"].shape[0] == 8 and batch["tokens"].shape[1] % 8 == 0
        names.add(lm_data.task_of(config, batch))
    assert names == {"t2v", "t2i", "v2a"}
    # image tasks dominate the first quarter of the run (the curriculum), video tasks the rest
    early = [lm_data.task_of(config, batches[s]) for s in range(10)]
    assert early.count("t2i") >= 6


def test_eval_sets_share_one_length(tokens_dir):
    sets = lm_data.eval_sets(_config(tokens_dir), LAYOUT)
    assert set(sets) == {"t2v", "t2i", "v2a"}
    lengths = {b["tokens"].shape for batches in sets.values() for b in batches}
    assert len(lengths) == 1 and lengths.pop()[1] % 8 == 0


def test_mixture_run_logs_per_task_and_resumes(runs):
    config, whole, resumed = runs
    rows = runlog.read_metrics(whole, "train")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert 0.0 <= row["padding_fraction"] < 0.5 and row["compiled_shapes"] >= 1
        assert sum(key.endswith("/loss") for key in row) == 1  # the step's task
    expected = {r["step"]: r["loss"] for r in rows}
    got = {r["step"]: r["loss"] for r in runlog.read_metrics(resumed, "train")}
    assert got[3] == expected[3] and got[4] == expected[4]
    baseline = runlog.read_metrics(whole, "baseline")[0]
    evals = runlog.read_metrics(whole, "eval")
    assert [r["step"] for r in evals] == [2, 4]
    for task in ("t2v", "t2i", "v2a"):
        assert baseline[f"{task}/unigram_loss"] > 0
        assert np.isfinite(evals[-1][f"{task}/loss"]) and 0 <= evals[-1][f"{task}/accuracy"] <= 1


def test_evaluate_reports_each_task_and_its_baseline(runs):
    config, whole, _ = runs
    result = evaluate(config, whole)
    assert result["step"] == 4
    evals = runlog.read_metrics(whole, "eval")[-1]
    for task in ("t2v", "t2i", "v2a"):
        np.testing.assert_allclose(result[f"{task}/loss"], evals[f"{task}/loss"], rtol=1e-5)
        assert result[f"{task}/unigram_loss"] > 0
    json.dumps(result)


def test_time_limit_stops_with_a_checkpoint(tokens_dir, tmp_path):
    config = _config(tokens_dir, "train.time_limit_s=1e-6", "train.num_steps=50")
    train(config, str(tmp_path))
    rows = runlog.read_metrics(str(tmp_path), "train")
    assert [r["step"] for r in rows] == [1]  # stopped after the first step, logged it
    assert [r["step"] for r in runlog.read_metrics(str(tmp_path), "eval")] == [1]
    from videolm import checkpoint
    assert checkpoint.Checkpointer(str(tmp_path)).latest_step() == 1
