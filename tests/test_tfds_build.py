"""SoundShapes TFDS build (array_record, no TensorFlow) and read round trip."""
import argparse
import json
import sys

import numpy as np
import pytest

from videolm.data import build, pipeline, tfds_soundshapes
from videolm.data.soundshapes import SPLITS, WorldConfig, generate_clip

WORLD = WorldConfig(height=32, width=32, num_frames=17)
SIZES = dict(num_train=6, num_validation=2, num_test=2, num_compositional=3)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    summary = build.build("soundshapes", data_dir, world=WORLD, progress=False, **SIZES)
    return data_dir, summary


def test_build_writes_array_record_splits_without_tensorflow(built):
    data_dir, summary = built
    assert summary["skipped"] is False and summary["clips_per_second"] > 0
    assert summary["config"] == "32x32_17f_8fps_16khz"
    files = sorted(p.name for p in tfds_soundshapes.select_build(data_dir).iterdir())
    for split in SPLITS:
        assert any(f.startswith(f"soundshapes-{split}.array_record") for f in files), files
    assert "tensorflow" not in sys.modules
    world, sizes = tfds_soundshapes.stored_world(summary["path"])
    assert world == WORLD
    assert sizes == {"train": 6, "validation": 2, "test": 2, "compositional": 3}


@pytest.mark.parametrize("split", SPLITS)
def test_read_back_equals_the_generator(built, split):
    data_dir, _ = built
    source = pipeline.make_source("soundshapes", split, data_dir=data_dir)
    on_the_fly = pipeline.make_source("soundshapes", split, world=WORLD, num_examples=len(source))
    assert len(source) == {"train": 6, "validation": 2, "test": 2, "compositional": 3}[split]
    for i in range(len(source)):
        stored, generated = source[i], on_the_fly[i]
        assert stored.keys() == generated.keys() == {"video", "audio", "text", "control"}
        for key in ("video", "audio", "control"):
            assert stored[key].dtype == generated[key].dtype
            np.testing.assert_array_equal(stored[key], generated[key], err_msg=f"{split}[{i}] {key}")
        assert stored["text"] == generated["text"] and isinstance(stored["text"], str)


def test_stored_annotations_match_the_generator(built):
    data_dir, _ = built
    records, world = tfds_soundshapes.open_split(data_dir, "train")
    bounces = 0
    for i in range(len(records)):
        stored, clip = tfds_soundshapes.record_to_clip(records[i]), generate_clip(world, "train", i)
        assert set(stored) == set(clip) - {"masks", "split"}
        for key, value in stored.items():
            if isinstance(value, np.ndarray):
                assert value.dtype == clip[key].dtype, key
                np.testing.assert_array_equal(value, clip[key], err_msg=key)
            else:
                assert value == clip[key], key
        bounces += sum(len(times) for times in stored["bounce_times"])
    assert bounces > 0  # the ragged per-object bounce lists were exercised


def test_iterator_over_built_data(built):
    data_dir, _ = built
    source = pipeline.make_source("soundshapes", "train", data_dir=data_dir, num_examples=3)
    it = pipeline.make_iterator(source, batch_size=3, seed=0, num_epochs=1)
    (batch,) = list(it)
    assert batch["video"].shape == (3, 17, 32, 32, 3)
    assert sorted(batch["text"]) == sorted(source[i]["text"] for i in range(3))


def test_rebuild_is_skipped_or_refused_or_overwritten(tmp_path):
    small = dict(num_train=2, num_validation=0, num_test=0, num_compositional=0)
    first = build.build("soundshapes", str(tmp_path), world=WORLD, progress=False, **small)
    again = build.build("soundshapes", str(tmp_path), world=WORLD, progress=False, **small)
    assert first["skipped"] is False and again["skipped"] is True
    bigger = dict(small, num_train=3)
    with pytest.raises(FileExistsError, match="overwrite"):
        build.build("soundshapes", str(tmp_path), world=WORLD, progress=False, **bigger)
    build.build("soundshapes", str(tmp_path), world=WORLD, progress=False, overwrite=True, **bigger)
    assert len(pipeline.make_source("soundshapes", "train", data_dir=str(tmp_path))) == 3
    with pytest.raises(ValueError, match="not in the SoundShapes build"):
        pipeline.make_source("soundshapes", "test", data_dir=str(tmp_path))


def test_several_builds_need_a_choice(built, tmp_path):
    small = dict(num_train=1, num_validation=0, num_test=0, num_compositional=0)
    build.build("soundshapes", str(tmp_path), world=WORLD, progress=False, **small)
    other = WorldConfig(height=24, width=24, num_frames=17)
    build.build("soundshapes", str(tmp_path), world=other, progress=False, **small)
    with pytest.raises(ValueError, match="several SoundShapes builds"):
        pipeline.make_source("soundshapes", "train", data_dir=str(tmp_path))
    by_world = pipeline.make_source("soundshapes", "train", data_dir=str(tmp_path), world=other)
    by_name = pipeline.make_source("soundshapes", "train", data_dir=str(tmp_path), config="24x24_17f_8fps_16khz")
    assert by_world[0]["video"].shape == by_name[0]["video"].shape == (17, 24, 24, 3)
    with pytest.raises(FileNotFoundError, match="found"):
        pipeline.make_source("soundshapes", "train", data_dir=str(tmp_path), config="64x64_17f_8fps_16khz")


def test_config_names_describe_the_world():
    assert tfds_soundshapes.config_name(WorldConfig()) == "64x64_17f_8fps_16khz"
    assert tfds_soundshapes.config_name(WorldConfig(height=128, width=128, fps=12.5)) == "128x128_17f_12p5fps_16khz"
    a = tfds_soundshapes.config_name(WorldConfig(seed=1))
    b = tfds_soundshapes.config_name(WorldConfig(seed=2))
    assert a.startswith("64x64_17f_8fps_16khz_w") and a != b
    world = WorldConfig(colors=("red", "blue"), max_objects=2)
    assert tfds_soundshapes.world_from_dict(json.loads(json.dumps(tfds_soundshapes.world_to_dict(world)))) == world


def test_command_line_options(built, capsys):
    data_dir, _ = built
    parser = build.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--dataset", "soundshapes", "--data-dir", data_dir, "--resolution", "32",
                              "--num-frames", "17", "--num-train", "6", "--num-validation", "2",
                              "--num-test", "2", "--num-compositional", "3"])
    summary = build.run(args)
    assert summary["skipped"] is True  # the same world and sizes as the fixture's build
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["config"] == "32x32_17f_8fps_16khz" and printed["skipped"] is True


def test_bad_build_requests_raise(tmp_path):
    with pytest.raises(ValueError, match="tfds build ucf101"):
        build.build("ucf101", str(tmp_path))
    with pytest.raises(ValueError, match="unknown dataset"):
        build.build("kinetics", str(tmp_path))
    with pytest.raises(ValueError, match="num_train"):
        build.build("soundshapes", str(tmp_path), world=WORLD, num_train=-1)
    with pytest.raises(ValueError, match="non-empty split"):
        build.build("soundshapes", str(tmp_path), world=WORLD, num_train=0, num_validation=0, num_test=0,
                    num_compositional=0)
    with pytest.raises(ValueError, match="fps"):
        build.build("soundshapes", str(tmp_path), fps=0.0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pipeline.make_source("soundshapes", "train", data_dir=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no SoundShapes build"):
        pipeline.make_source("soundshapes", "train", data_dir=str(tmp_path))
