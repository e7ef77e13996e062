"""Audio tokenizer training: the loss falls, resume is exact, evaluation and the benchmark run.

One tiny run (8 fake devices, data parallel) is shared by the tests of this module.
"""
import json
import os
import shutil

import numpy as np
import pytest
from flax import nnx

from tokenizers.soundstream import train as ss_train
from tokenizers.soundstream.api import AudioTokenizer
from videolm import checkpoint, configlib, parallel, runlog

STEPS = 6


def tiny_test_config():
    c = configlib.load_config("configs/tokenizer_audio.py:tiny")
    c.model.update(channels=2, latent_dim=8, num_levels=2, codebook_size=16, kmeans_iterations=2,
                   dead_code_threshold=0.1)
    c.discriminator.update(stft_channels=2, stft_n_fft=128, stft_hop=64, stft_channel_mults=(1,),
                           wave_scales=1, wave_channels=4, wave_downsamples=1, wave_max_channels=8)
    c.loss.update(mel_scales=(64, 256), num_mels=16, adversarial_start_step=0)
    c.data.update(num_train_examples=64, batch_size=8, crop_samples=1280)
    c.train.update(num_steps=STEPS, log_every=1, checkpoint_every=3, keep_checkpoints=3,
                   learning_rate=3e-3, disc_learning_rate=1e-3, warmup_steps=1, max_train_seconds=0.0)
    c.eval.update(num_examples=4, batch_size=4, num_spectrograms=1)
    c.bench.update(batch_size=2, steps=1, train_steps=1, warmup=0)
    return c


@pytest.fixture(scope="module")
def config():
    return tiny_test_config()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, config):
    workdir = str(tmp_path_factory.mktemp("audio_tok") / "run")
    ss_train.train(config, workdir)
    return workdir


def _rows(workdir):
    return {r["step"]: {k: v for k, v in r.items() if k != "seconds"} for r in runlog.read_metrics(workdir)}


def test_run_logs_every_step_and_keeps_checkpoints(run_dir):
    rows = _rows(run_dir)
    assert sorted(rows) == list(range(1, STEPS + 1))
    for row in rows.values():
        assert np.isfinite(row["loss"]) and np.isfinite(row["d_loss"])
    steps = sorted(int(d) for d in os.listdir(os.path.join(run_dir, "checkpoints")) if d.isdigit())
    assert steps == [3, 6]
    saved = json.load(open(os.path.join(run_dir, "config.json")))
    assert saved["kind"] == "audio_tokenizer"


def test_resume_gives_identical_losses(run_dir, config, tmp_path):
    """Restart from the step-3 checkpoint: steps 4..6 repeat the uninterrupted run exactly."""
    resumed = str(tmp_path / "resumed")
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", str(STEPS)))
    os.remove(os.path.join(resumed, "metrics.jsonl"))
    ss_train.train(config, resumed)
    original, again = _rows(run_dir), _rows(resumed)
    assert sorted(again) == [4, 5, 6]
    for step in (4, 5, 6):
        assert again[step] == original[step], step


def test_a_few_steps_on_one_batch_lower_the_loss(run_dir, config):
    """The compiled step, repeated on one fixed batch from the step-3 state, lowers the loss."""
    mesh = parallel.make_mesh(dict(config.mesh))
    rules = tuple(config.logical_axis_rules)
    ckpt = checkpoint.Checkpointer(run_dir)
    graphdef, state = parallel.abstract_state(lambda: ss_train.TrainState(config, nnx.Rngs(0)), mesh, rules)
    restored, _ = ckpt.restore(nnx.to_pure_dict(state), step=3)
    ckpt.close()
    nnx.replace_by_pure_dict(state, restored)
    batch = parallel.shard_batch(next(ss_train.train_iterator(config)), mesh, rules)
    with parallel.use_mesh(mesh, rules):
        step_fn = ss_train.jitted_train_step(config, graphdef, state, mesh)
        losses = []
        for i in range(8):
            state, metrics = step_fn(state, batch["audio"], np.int32(3 + i))
            losses.append(float(metrics["mel_loss"]))
    # every step on the fixed batch lowers the mel loss, and 8 steps take off at least a tenth
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.9 * losses[0], losses


def test_evaluate_and_tokenizer_from_workdir(run_dir, config):
    from tokenizers.soundstream.evaluate import evaluate
    result = evaluate(config, run_dir)
    assert result["num_clips"] == 4 and result["step"] == STEPS
    assert len(result["codebook_usage"]) == 2 and len(result["codebook_perplexity"]) == 2
    assert all(0 < u <= 1 for u in result["codebook_usage"])
    assert all(1 <= p <= 16 for p in result["codebook_perplexity"])
    assert result["bitrate_bps"] == pytest.approx(2 * 4 * 50.0)      # 2 levels x log2(16) x 50 Hz
    assert result["frames_per_clip"] == 106
    for key in ("spectral_distance_db", "si_sdr_db", "pitch_error_cents", "onset_f1"):
        assert result[key] is not None and np.isfinite(result[key]), key
    assert os.path.exists(os.path.join(run_dir, "eval", "spectrogram_00.png"))

    tok = AudioTokenizer.from_workdir(run_dir)
    wave = np.random.default_rng(0).normal(size=34000).astype(np.float32) * 0.1
    codes = tok.encode(wave)
    assert codes.shape == (2, 106) and codes.dtype == np.int32
    assert tok.decode(codes).shape == (106 * 320,)
    assert tok.decode(codes[:1]).shape == (106 * 320,)


def test_bench_reports_throughput_against_peak(config):
    from tokenizers.soundstream.bench import bench
    result = bench(config)
    for key in ("encode_seconds_per_s", "decode_seconds_per_s", "train_steps_per_s", "achieved_gflops",
                "peak_gflops", "fraction_of_peak"):
        assert result[key] > 0, key
    assert result["fraction_of_peak"] == pytest.approx(result["achieved_gflops"] / result["peak_gflops"])


def test_bad_config_values_raise(config):
    bad = tiny_test_config()
    bad.data.crop_samples = 1000
    with pytest.raises(ValueError, match="crop_samples"):
        ss_train.validate_config(bad)
    bad = tiny_test_config()
    bad.model.quantizer_dropout = 1.5
    with pytest.raises(ValueError, match="quantizer_dropout"):
        ss_train.validate_config(bad)
