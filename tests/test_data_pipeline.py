"""The grain input pipeline: batching, determinism, epochs, process sharding, resume."""
import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from videolm.data import pipeline, registry
from videolm.data.soundshapes import WorldConfig, generate_clip

SMALL_WORLD = WorldConfig(height=32, width=32, num_frames=9)


class IndexSource:
    """A cheap source whose example i carries i everywhere, to check which examples are read."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"index": np.int64(i), "video": np.full((2, 4, 4, 3), i % 256, np.uint8), "text": f"clip {i}"}


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.fixture(scope="module")
def soundshapes_source():
    return pipeline.make_source("soundshapes", "train", world=SMALL_WORLD, num_examples=6)


def test_soundshapes_source_matches_the_generator(soundshapes_source):
    assert len(soundshapes_source) == 6
    example = soundshapes_source[4]
    clip = generate_clip(SMALL_WORLD, "train", 4)
    assert set(example) == {"video", "audio", "text", "control"}
    assert example["video"].dtype == np.uint8 and example["video"].shape == (9, 32, 32, 3)
    assert example["audio"].dtype == np.float32 and example["audio"].shape == (SMALL_WORLD.num_samples,)
    np.testing.assert_array_equal(example["video"], clip["video"])
    np.testing.assert_array_equal(example["control"], clip["control"])
    np.testing.assert_array_equal(example["audio"], clip["audio"])
    assert example["text"] == clip["caption"]
    np.testing.assert_array_equal(soundshapes_source[4]["video"], example["video"])  # deterministic
    with pytest.raises(IndexError, match="out of range"):
        soundshapes_source[6]


def test_batches_stack_examples_and_strings(soundshapes_source):
    it = pipeline.make_iterator(soundshapes_source, batch_size=3, seed=0, shuffle=False)
    batch = next(it)
    assert batch["video"].shape == (3, 9, 32, 32, 3) and batch["video"].dtype == np.uint8
    assert batch["audio"].shape == (3, SMALL_WORLD.num_samples) and batch["audio"].dtype == np.float32
    assert batch["text"].shape == (3,) and batch["text"].dtype.kind == "U"
    for i in range(3):  # shuffle=False keeps the source order
        assert batch["text"][i] == soundshapes_source[i]["text"]
        np.testing.assert_array_equal(batch["video"][i], soundshapes_source[i]["video"])


def test_one_epoch_reads_every_example_once_and_epochs_reshuffle():
    source = IndexSource(10)
    it = pipeline.make_iterator(source, batch_size=4, seed=3, num_epochs=1, drop_remainder=False)
    batches = list(it)
    assert [len(b["index"]) for b in batches] == [4, 4, 2]
    order = np.concatenate([b["index"] for b in batches])
    assert sorted(order) == list(range(10))
    assert list(order) != list(range(10))  # shuffled
    two = np.concatenate([b["index"] for b in pipeline.make_iterator(
        source, batch_size=5, seed=3, num_epochs=2)])
    assert sorted(two[:10]) == sorted(two[10:]) == list(range(10))
    assert list(two[:10]) != list(two[10:])  # each epoch is shuffled differently
    dropped = list(pipeline.make_iterator(source, batch_size=4, seed=3, num_epochs=1))
    assert [len(b["index"]) for b in dropped] == [4, 4]


def test_same_seed_same_batches_other_seed_other_order():
    source = IndexSource(32)
    a = take(pipeline.make_iterator(source, batch_size=4, seed=7), 12)
    b = take(pipeline.make_iterator(source, batch_size=4, seed=7), 12)
    c = take(pipeline.make_iterator(source, batch_size=4, seed=8), 12)
    assert_same_batches(a, b)
    assert any(not np.array_equal(x["index"], y["index"]) for x, y in zip(a, c))


def test_resume_from_iterator_state_gives_the_same_batches():
    source = IndexSource(13)
    it = pipeline.make_iterator(source, batch_size=3, seed=5)
    take(it, 6)  # crosses an epoch boundary (13 examples, 3 per batch)
    state = it.get_state()
    expected = take(it, 9)
    resumed = pipeline.make_iterator(source, batch_size=3, seed=5)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 9), expected)


def test_resume_through_orbax_with_grain_checkpoint_handler(tmp_path):
    source = IndexSource(11)
    it = pipeline.make_iterator(source, batch_size=2, seed=1)
    take(it, 4)
    manager = ocp.CheckpointManager(tmp_path / "ckpt", item_handlers={"data": grain.checkpoint.CheckpointHandler()})
    manager.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = take(it, 8)
    fresh = pipeline.make_iterator(source, batch_size=2, seed=1)
    restored = manager.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    manager.close()
    assert_same_batches(take(restored["data"], 8), expected)


def test_resume_through_the_run_checkpointer(tmp_path):
    from videolm.checkpoint import Checkpointer, abstract_like
    source = IndexSource(9)
    it = pipeline.make_iterator(source, batch_size=2, seed=2)
    take(it, 3)
    state = {"w": np.arange(3, dtype=np.float32)}
    with Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(3, state, data_iterator=it)
    expected = take(it, 6)
    fresh = pipeline.make_iterator(source, batch_size=2, seed=2)
    with Checkpointer(str(tmp_path)) as ckpt:
        ckpt.restore(abstract_like(state), data_iterator=fresh)
    assert_same_batches(take(fresh, 6), expected)


def test_process_shards_are_disjoint_equal_and_cover_the_data():
    source = IndexSource(23)
    seen = []
    for process in range(4):
        it = pipeline.make_iterator(source, batch_size=5, seed=0, num_epochs=1, drop_remainder=False,
                                    process_index=process, process_count=4)
        seen.append(np.concatenate([b["index"] for b in it]))
    assert all(len(s) == 5 for s in seen)  # 23 // 4 each: every process runs the same steps
    union = np.concatenate(seen)
    assert len(set(union)) == len(union) == 20
    assert set(union) == set(range(20))
    assert all(set(s) == set(range(p, 20, 4)) for p, s in enumerate(seen))


def test_default_shard_is_this_jax_process():
    import jax
    source = IndexSource(6)
    default = list(pipeline.make_iterator(source, batch_size=2, seed=4, num_epochs=1))
    explicit = list(pipeline.make_iterator(source, batch_size=2, seed=4, num_epochs=1,
                                           process_index=jax.process_index(), process_count=jax.process_count()))
    assert_same_batches(default, explicit)


class AddNoise(grain.transforms.RandomMap):
    def random_map(self, element, rng):
        return dict(element, noise=rng.normal(size=3).astype(np.float32))


def test_transforms_plain_and_random_are_deterministic():
    source = IndexSource(8)
    plain = next(pipeline.make_iterator(source, batch_size=4, seed=0, shuffle=False,
                                        transform=lambda ex: dict(ex, double=ex["index"] * 2)))
    np.testing.assert_array_equal(plain["double"], 2 * plain["index"])
    a = take(pipeline.make_iterator(source, batch_size=4, seed=9, transform=AddNoise()), 4)
    b = take(pipeline.make_iterator(source, batch_size=4, seed=9, transform=AddNoise()), 4)
    assert_same_batches(a, b)
    assert not np.array_equal(a[0]["noise"], a[2]["noise"])  # a fresh draw per element and epoch


def test_worker_processes_give_the_same_batches_and_resume(soundshapes_source):
    expected = take(pipeline.make_iterator(soundshapes_source, batch_size=2, seed=3), 4)
    it = pipeline.make_iterator(soundshapes_source, batch_size=2, seed=3, worker_count=2)
    try:
        assert_same_batches(take(it, 2), expected[:2])
        state = it.get_state()
    finally:
        it.close()
    resumed = pipeline.make_iterator(soundshapes_source, batch_size=2, seed=3, worker_count=2)
    try:
        resumed.set_state(state)
        assert_same_batches(take(resumed, 2), expected[2:])
    finally:
        resumed.close()


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=2, num_epochs=0), "num_epochs"),
    (dict(batch_size=2, seed=-1), "seed"),
    (dict(batch_size=2, worker_count=-1), "worker_count"),
    (dict(batch_size=2, process_index=4, process_count=4), "process_index"),
    (dict(batch_size=5, num_epochs=1), "larger than"),
])
def test_bad_iterator_arguments_raise(kwargs, match):
    kwargs = {"seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        pipeline.make_iterator(IndexSource(4), **kwargs)


def test_bad_source_arguments_raise():
    with pytest.raises(ValueError, match="num_examples"):
        pipeline.make_source("soundshapes", "train")
    with pytest.raises(ValueError, match="unknown split"):
        pipeline.make_source("soundshapes", "training", num_examples=2)
    with pytest.raises(ValueError, match="unknown dataset"):
        pipeline.make_source("kinetics9000", "train")
    assert "soundshapes" in registry.dataset_names()
