"""Dataset registry: catalog datasets on mock data, clip sampling, resizing, the TensorFlow error."""
import importlib.util

import numpy as np
import pytest
import tensorflow_datasets as tfds

from videolm.data import registry
from videolm.data.soundshapes import WorldConfig, generate_clip

HAS_TF = importlib.util.find_spec("tensorflow") is not None


def test_bair_on_mock_catalog_data_maps_to_the_example_dict():
    options = dict(num_frames=6, frame_stride=2, resolution=32, clip_start="center")
    with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
        source = registry.make_source("bair_robot_pushing_small", "train", **options)
        raw = tfds.data_source("bair_robot_pushing_small", split="train")
        assert len(source) == 3
        for i in range(3):
            example = source[i]
            assert set(example) == {"video", "text"}
            assert example["video"].shape == (6, 32, 32, 3) and example["video"].dtype == np.uint8
            assert example["text"] == ""
            frames = raw[i]["image_main"]                      # [30, 64, 64, 3]
            start = (frames.shape[0] - 12) // 2                # centre window of 6 frames x stride 2
            expected = registry.resize_video(frames[start:start + 12:2], (32, 32))
            np.testing.assert_array_equal(example["video"], expected)
        assert len(registry.make_source("bair_robot_pushing_small", "test", num_examples=2)) == 2


@pytest.mark.skipif(HAS_TF, reason="TensorFlow is installed")
@pytest.mark.parametrize("name", ["ucf101", "moving_mnist"])
def test_catalog_dataset_needing_tensorflow_names_the_extra(name):
    with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
        with pytest.raises(ImportError, match=r"videolm\[tf\]") as error:
            registry.make_source(name, registry.CATALOG[name].splits[0])
    assert name in str(error.value)


def test_ucf101_mapping_on_a_mock_record():
    labels = [line.strip() for line in open(tfds.core.tfds_path("video/ucf101_labels.txt"))]
    rng = np.random.default_rng(0)
    raw = {"video": rng.integers(0, 256, (40, 48, 64, 3), dtype=np.uint8), "label": np.int64(3)}
    options = registry.ClipOptions(num_frames=17, frame_stride=2, resolution=32)
    example = registry.catalog_example(raw, 0, dataset="ucf101", label_names=labels, options=options)
    assert example["text"] == "baby crawling" == registry.humanize_label(labels[3])
    assert example["video"].shape == (17, 32, 32, 3)
    # 48x64 -> shorter side 32 (32x43), centre crop of width 32.
    np.testing.assert_array_equal(example["video"], registry.resize_video(raw["video"][0:34:2], (32, 32)))


def test_moving_mnist_grey_frames_become_rgb():
    raw = {"image_sequence": np.random.default_rng(1).integers(0, 256, (20, 64, 64, 1), dtype=np.uint8)}
    example = registry.catalog_example(raw, 5, dataset="moving_mnist", label_names=None,
                                       options=registry.ClipOptions(num_frames=17))
    assert example["video"].shape == (17, 64, 64, 3) and example["text"] == ""
    for c in range(3):
        np.testing.assert_array_equal(example["video"][..., c], raw["image_sequence"][:17, ..., 0])


def test_humanize_label():
    assert registry.humanize_label("ApplyEyeMakeup") == "apply eye makeup"
    assert registry.humanize_label("YoYo") == "yo yo"
    assert registry.humanize_label("push_ups") == "push ups"


def test_clip_windows_first_center_random():
    video = np.arange(30, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    first, _, _ = registry.sample_frames(video, registry.ClipOptions(num_frames=5, frame_stride=3), 0)
    assert list(first[:, 0, 0, 0]) == [0, 3, 6, 9, 12]
    center, _, _ = registry.sample_frames(video, registry.ClipOptions(num_frames=5, clip_start="center"), 0)
    assert list(center[:, 0, 0, 0]) == [12, 13, 14, 15, 16]
    starts = set()
    for index in range(40):
        opts = registry.ClipOptions(num_frames=4, frame_stride=2, clip_start="random", seed=11)
        clip, start, span = registry.sample_frames(video, opts, index)
        again, _, _ = registry.sample_frames(video, opts, index)
        np.testing.assert_array_equal(clip, again)                   # fixed per (seed, index)
        assert span == 8 and 0 <= start <= 30 - 8
        assert list(clip[:, 0, 0, 0]) == list(range(start, start + 8, 2))
        starts.add(start)
    assert len(starts) > 5


def test_short_video_repeats_its_last_frame():
    video = np.arange(4, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    clip, _, _ = registry.sample_frames(video, registry.ClipOptions(num_frames=6), 0)
    assert list(clip[:, 0, 0, 0]) == [0, 1, 2, 3, 3, 3]


def test_resize_keeps_aspect_by_cropping_the_centre():
    video = np.zeros((2, 32, 64, 3), np.uint8)
    video[:, :, :, 0] = np.arange(64, dtype=np.uint8)[None, None, :]
    out = registry.resize_video(video, (32, 32))  # no scaling needed: the centre 32 columns
    np.testing.assert_array_equal(out, video[:, :, 16:48])
    flat = registry.resize_video(np.full((3, 50, 70, 3), 77, np.uint8), (20, 24))
    assert flat.shape == (3, 20, 24, 3) and np.all(flat == 77)
    grey = registry.resize_video(np.full((1, 8, 8, 1), 9, np.uint8), (4, 4))
    assert grey.shape == (1, 4, 4, 1) and np.all(grey == 9)


def test_soundshapes_clip_options_cut_audio_to_the_same_span():
    world = WorldConfig(height=32, width=32, num_frames=12)
    source = registry.make_source("soundshapes", "validation", world=world, num_examples=3,
                                  num_frames=4, frame_stride=2, clip_start="center", resolution=16)
    clip = generate_clip(world, "validation", 1)
    example = source[1]
    samples_per_frame = world.sample_rate / world.fps
    start = (12 - 8) // 2
    assert example["video"].shape == example["control"].shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(example["video"], registry.resize_video(clip["video"][start:start + 8:2], (16, 16)))
    first, count = round(start * samples_per_frame), round(8 * samples_per_frame)
    np.testing.assert_array_equal(example["audio"], clip["audio"][first:first + count])
    assert example["text"] == clip["caption"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_frames=0), "num_frames"),
    (dict(frame_stride=0), "frame_stride"),
    (dict(clip_start="middle"), "clip_start"),
    (dict(resolution=(32,)), "resolution"),
    (dict(resolution=-4), "resolution"),
])
def test_bad_clip_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        registry.make_source("soundshapes", "train", num_examples=2, **kwargs)


def test_bad_catalog_requests_raise():
    with pytest.raises(ValueError, match="unknown split"):
        registry.make_source("moving_mnist", "train")
    with pytest.raises(ValueError, match="soundshapes only"):
        registry.make_source("bair_robot_pushing_small", "train", world=WorldConfig())
    with pytest.raises(ValueError, match="expected uint8"):
        registry.catalog_example({"image_main": np.zeros((2, 4, 4, 3), np.float32)}, 0,
                                 dataset="bair_robot_pushing_small", label_names=None,
                                 options=registry.ClipOptions())
