"""Training the video tokenizer: loss goes down, exact resume, NaN reporting, 8 devices == 1 device,
image-stage inflation, evaluation and the benchmark (all on a very small model)."""
import json
import math
import os

import jax
import numpy as np
import pytest

from tokenizers.magvit import train as train_lib
from videolm import configlib, parallel, runlog


def small_config(**overrides):
    config = configlib.load_config("configs/tokenizer_video.py:tiny")
    config.mesh = dict(data=1, fsdp=1, tensor=1)
    config.model.update(base_channels=4, channel_multipliers=(1, 2), num_res_blocks=(1, 1),
                        temporal_downsample=(True,), codebook_bits=6, num_groups=2)
    config.discriminator.update(base_channels=2, channel_multipliers=(1, 2))
    config.loss.update(perceptual_weight=0.0, gan_start_step=2)
    config.lfq.update(entropy_anneal_steps=10)
    config.train.update(num_steps=4, learning_rate=3e-3, warmup_steps=1, crop_size=16, crop_frames=5,
                        log_every=1, checkpoint_every=2, video_every=0)
    config.data.update(height=32, width=32, batch_size=8, num_train_examples=32, read_threads=1)
    config.eval.update(num_examples=2, batch_size=2, lpips=False, fvd=False, save_frames=False)
    config.bench.update(batch_size=2, steps=1, warmup=0)
    config.init.image_stage.num_steps = 0
    for key, value in overrides.items():
        configlib.apply_override(config, f"{key}={value}")
    return config


def _rows(workdir):
    return {row["step"]: row for row in runlog.read_metrics(workdir)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run (steps 3-4 with the discriminator), checkpointed every 2 steps."""
    workdir = str(tmp_path_factory.mktemp("magvit_run"))
    config = small_config()
    train_lib.train(config, workdir)
    return config, workdir


def test_training_writes_logs_checkpoints_and_gan_metrics(trained):
    config, workdir = trained
    rows = _rows(workdir)
    assert sorted(rows) == [1, 2, 3, 4]
    assert "disc_loss" not in rows[2] and "disc_loss" in rows[3] and "r1_penalty" in rows[3]
    assert all(math.isfinite(v) for row in rows.values() for k, v in row.items() if k != "split")
    assert os.path.isdir(os.path.join(workdir, "tensorboard"))
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["kind"] == "tokenizer_video"
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert steps == [2, 4]


def test_resume_continues_with_identical_losses(trained, tmp_path):
    config, reference_dir = trained
    workdir = str(tmp_path)
    train_lib.train(small_config(**{"train.num_steps": 2}), workdir)
    assert sorted(_rows(workdir)) == [1, 2]
    train_lib.train(small_config(), workdir)               # resumes at step 2
    resumed, reference = _rows(workdir), _rows(reference_dir)
    for step in (3, 4):
        for key, value in reference[step].items():
            if key in ("elapsed_s", "split"):
                continue
            assert resumed[step][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, key)


def test_phases_switch_on_the_gan_and_perceptual_terms():
    trainer = train_lib.Trainer(small_config(**{"loss.gan_start_step": 5, "loss.perceptual_start_step": 3}))
    assert [trainer.phase(s) for s in (0, 3, 5)] == [(False, False), (False, True), (True, True)]
    # The switch-on steps are not part of the compiled step's key: one program per phase.
    assert trainer._step_config((True, True)).loss.gan_start_step == 0


def test_a_few_steps_lower_the_loss():
    config = small_config(**{"loss.gan_start_step": 1000})
    trainer = train_lib.Trainer(config)
    video = next(train_lib.train_iterator(config, config.data.batch_size))["video"]
    losses = [float(trainer.train_step(video, jax.random.key(0))["recon_loss"]) for _ in range(12)]
    assert losses[-1] < 0.7 * losses[0], losses


def test_nan_is_reported_with_its_step(tmp_path, monkeypatch):
    """Parameters turn NaN after step 3: step 4 fails naming its step and is never checkpointed."""
    original = train_lib.Trainer.train_step

    def corrupting_step(self, video, rng):
        metrics = original(self, video, rng)
        if self.step == 3:
            self.state["tokenizer"]["encoder"]["conv_in"]["kernel"][...] *= float("nan")
        return metrics

    monkeypatch.setattr(train_lib.Trainer, "train_step", corrupting_step)
    config = small_config(**{"loss.gan_start_step": 1000})
    with pytest.raises(FloatingPointError, match="step 4: non-finite loss"):
        train_lib.train(config, str(tmp_path))
    saved = sorted(os.listdir(os.path.join(str(tmp_path), "checkpoints")))
    assert "2" in saved and "4" not in saved


def test_eight_devices_give_the_same_loss_as_one(num_fake_devices):
    assert num_fake_devices == 8
    config = small_config(**{"loss.gan_start_step": 1000})
    video = next(train_lib.train_iterator(config, 8))["video"]
    one = train_lib.Trainer(config, mesh=parallel.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    eight = train_lib.Trainer(config, mesh=parallel.make_mesh({"data": 4, "fsdp": 2}))
    kernel = eight.state["tokenizer"]["encoder"]["conv_in"]["kernel"][...]
    assert len(kernel.sharding.device_set) == 8
    for _ in range(2):
        m1 = jax.device_get(one.train_step(video, jax.random.key(0)))
        m8 = jax.device_get(eight.train_step(video, jax.random.key(0)))
        for key in ("loss", "recon_loss", "entropy_loss", "codebook_entropy", "commitment_loss", "grad_norm"):
            np.testing.assert_allclose(m8[key], m1[key], rtol=2e-4, atol=2e-5, err_msg=key)


def test_image_stage_inflates_into_the_video_trainer(tmp_path):
    from flax import nnx
    from tokenizers.magvit.api import VideoTokenizer
    from videolm import checkpoint
    image_dir = str(tmp_path / "image")
    image_config = small_config(**{"train.crop_frames": 1})
    image_config.model.update(temporal_kernel=1, temporal_downsample=(False,))
    image_trainer = train_lib.Trainer(image_config)
    os.makedirs(image_dir)
    configlib.save_config(image_config, os.path.join(image_dir, "config.json"))
    with checkpoint.Checkpointer(image_dir) as ckpt:
        ckpt.save(1, image_trainer.state)
    video_config = small_config(**{"init.image_workdir": image_dir})
    trainer = train_lib.Trainer(video_config)
    train_lib.init_from_image_stage(trainer, image_dir)
    models = trainer.models()
    image_tok = VideoTokenizer.from_workdir(image_dir)
    video_tok = VideoTokenizer(video_config.model, nnx.state(models.tokenizer, nnx.Param))
    image = np.random.RandomState(1).randint(0, 256, (16, 16, 3)).astype(np.uint8)
    np.testing.assert_array_equal(video_tok.encode(image), image_tok.encode(image))
    # The EMA starts from the inflated weights too.
    for ema, param in zip(jax.tree.leaves(nnx.state(models.ema, nnx.Param)),
                          jax.tree.leaves(nnx.state(models.tokenizer, nnx.Param))):
        np.testing.assert_array_equal(ema, param)
    # ... as separate buffers: a train step (which donates the state) runs on from the inflation.
    video = next(train_lib.train_iterator(video_config, video_config.data.batch_size))["video"]
    metrics = jax.device_get(trainer.train_step(video, jax.random.key(0)))
    assert np.isfinite(metrics["loss"])


def test_image_stage_config_is_the_image_variant():
    tiny = configlib.load_config("configs/tokenizer_video.py:tiny")
    stage = train_lib.image_stage_config(tiny).to_dict()
    variant = configlib.load_config("configs/tokenizer_video.py:tiny_image").to_dict()
    for config in (stage, variant):     # what the stage settings themselves decide
        config["train"].pop("num_steps"), config["train"].pop("time_limit_s"), config["train"].pop("video_every")
        config.pop("init")
    assert stage == variant
    tiny.init.image_stage.batch_multiplier = 0
    with pytest.raises(ValueError, match="init.image_stage.batch_multiplier must be >= 1"):
        train_lib.image_stage_config(tiny)


def test_a_video_run_trains_its_image_stage_first_and_once(tmp_path):
    workdir = str(tmp_path)
    config = small_config(**{"init.image_stage.num_steps": 2, "init.image_stage.batch_multiplier": 2,
                             "train.num_steps": 2, "loss.gan_start_step": 1000})
    train_lib.train(config, workdir)
    stage_dir = os.path.join(workdir, train_lib.IMAGE_STAGE_DIR)
    with open(os.path.join(stage_dir, "config.json")) as f:
        stage = json.load(f)
    assert stage["model"]["temporal_kernel"] == 1 and stage["data"]["batch_size"] == 16
    assert sorted(_rows(stage_dir)) == [1, 2] and sorted(_rows(workdir)) == [1, 2]
    done = os.path.join(stage_dir, train_lib.IMAGE_STAGE_DONE)
    finished = os.stat(done).st_mtime_ns
    # Resuming the video run (here: two more steps) leaves the finished image stage alone.
    config.train.num_steps = 4
    train_lib.train(config, workdir)
    assert sorted(_rows(workdir)) == [1, 2, 3, 4] and sorted(_rows(stage_dir)) == [1, 2]
    assert os.stat(done).st_mtime_ns == finished


def test_api_and_evaluation_of_a_run(trained):
    from tokenizers.magvit.api import VideoTokenizer
    from tokenizers.magvit.evaluate import evaluate
    config, workdir = trained
    tok = VideoTokenizer.from_workdir(workdir)
    assert tok.token_shape(17, 32, 32) == (9, 16, 16)
    result = evaluate(config, workdir)
    assert result["step"] == 4 and result["num_examples"] == 2
    assert 0 < result["codebook_usage"] <= 1 and 1 <= result["perplexity"] <= 64
    assert math.isfinite(result["psnr"]) and -1 <= result["ssim"] <= 1
    assert result["bits_per_pixel"] == pytest.approx(9 * 16 * 16 * 6 / (17 * 32 * 32))
    assert result["first_frame/tokens_match_video"] == 1.0
    assert result["token_shape"] == [9, 16, 16]
    # The world evaluator reads the clips back: the originals' captions are recovered.
    assert 0 <= result["world/caption_exact_match"] <= 1
    assert result["world/originals/caption_exact_match"] == 1.0
    json.dumps(result)


def test_benchmark_reports_rates():
    from tokenizers.magvit.bench import bench
    result = bench(small_config(**{"data.num_frames": 5, "data.height": 16, "data.width": 16}))
    for key in ("encode_clips_per_s", "decode_clips_per_s", "train_steps_per_s", "achieved_gflops",
                "peak_gflops", "fraction_of_peak"):
        assert result[key] > 0, key
    assert result["train_gflops"] > result["encode_gflops"] > 0
