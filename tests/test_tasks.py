"""Task layouts, condition forms, and the mixture: weights, curriculum, equal-length batches, resume."""
import collections

import numpy as np
import pytest

from videolm import mixture, tasks
from videolm.vocab import VocabLayout

LAYOUT = VocabLayout(text_size=40, video_bits=8, audio_levels=2, audio_codes=16)
S = VocabLayout.special
T, H, W, FRAMES = 3, 2, 2, 10  # latent video [3, 2, 2], audio [2 levels, 10 frames]


def make_example(seed=0, text_len=4):
    rng = np.random.default_rng(seed)
    video = rng.integers(0, 256, (T, H, W))
    return {
        "text": rng.integers(0, 40, (text_len,)),
        "video": video,
        "image": video[:1],
        "audio": rng.integers(0, 16, (2, FRAMES)),
        "control": rng.integers(0, 256, (T, H, W)),
        "inpaint": rng.integers(0, 256, (T, H, W)),
        "outpaint": rng.integers(0, 256, (T, H, W)),
    }


def _span(tokens, open_name, close_name):
    tokens = list(tokens)
    start = tokens.index(S(open_name)) + 1
    return tokens[start:tokens.index(S(close_name), start)]


def test_every_task_layout():
    ex = make_example()
    text = LAYOUT.text_ids(ex["text"]).tolist()
    video = LAYOUT.video_ids(ex["video"].reshape(-1)).tolist()
    audio = LAYOUT.audio_ids(ex["audio"]).reshape(-1).tolist()
    rng = np.random.default_rng(1)
    for name in tasks.TASKS:
        seq = tasks.build(name, ex, LAYOUT, rng=rng)
        prefix, target = seq.prefix.tolist(), seq.target.tolist()
        task = tasks.get_task(name)
        assert prefix[:2] == [S("<bos>"), VocabLayout.task(task.output)], name
        assert prefix[-1] == S("<res_0>"), name
        assert seq.prefix_len == len(prefix) and len(seq) == len(prefix) + len(target)
        assert (S("<bot_i>") in prefix) == task.has_text, name
        if task.has_text:
            assert _span(prefix, "<bot_i>", "<eot_i>") == text
        # no output marker in the prefix, no input marker in the target
        assert not {S("<bov_o>"), S("<boa_o>"), S("<eos>")} & set(prefix), name
        assert not {S("<bov_i>"), S("<boa_i>"), S("<bot_i>")} & set(target), name
        if task.output == "image":
            assert target == [S("<bov_o>")] + video[:H * W]  # no <eov_o>/<eos>: can continue into video
        elif task.output == "audio":
            assert target == [S("<boa_o>")] + audio + [S("<eoa_o>"), S("<eos>")]
        elif task.output == "video":
            assert target == [S("<bov_o>")] + video + [S("<eov_o>"), S("<eos>")]
        else:
            assert target == [S("<bov_o>")] + video + [S("<eov_o>"), S("<boa_o>")] + audio + [S("<eoa_o>"), S("<eos>")]


def test_inputs_in_prefix():
    ex = make_example()
    ids = lambda codes: LAYOUT.video_ids(np.asarray(codes).reshape(-1)).tolist()
    assert _span(tasks.build("i2v", ex, LAYOUT).prefix, "<bov_i>", "<eov_i>") == ids(ex["image"])
    assert _span(tasks.build("inpaint", ex, LAYOUT).prefix, "<bov_i>", "<eov_i>") == ids(ex["inpaint"])
    assert _span(tasks.build("outpaint", ex, LAYOUT).prefix, "<bov_i>", "<eov_i>") == ids(ex["outpaint"])
    stylized = tasks.build("stylize", ex, LAYOUT).prefix.tolist()
    assert _span(stylized, "<bov_i>", "<eov_i>") == [S("<source>")] + ids(ex["control"])
    a2v = tasks.build("a2v", ex, LAYOUT).prefix
    assert _span(a2v, "<boa_i>", "<eoa_i>") == LAYOUT.audio_ids(ex["audio"]).reshape(-1).tolist()
    # continuation: context is a leading run of latent frames (and the audio of the same time)
    for seed in range(6):
        rng = np.random.default_rng(seed)
        seq = tasks.build("av_continuation", ex, LAYOUT, rng=rng)
        context = _span(seq.prefix, "<bov_i>", "<eov_i>")
        k = len(context) // (H * W)
        assert 1 <= k < T and context == ids(ex["video"][:k])
        audio_context = _span(seq.prefix, "<boa_i>", "<eoa_i>")
        frames = len(audio_context) // 2
        assert frames == int(np.floor(FRAMES * (1 + 4 * (k - 1)) / (1 + 4 * (T - 1))))
        assert audio_context == LAYOUT.audio_ids(ex["audio"][:, :frames]).reshape(-1).tolist()


def test_condition_forms_and_errors():
    ex = make_example()
    full = tasks.build("i2v", ex, LAYOUT)
    no_text = tasks.build("i2v", ex, LAYOUT, condition="no_text")
    none = tasks.build("i2v", ex, LAYOUT, condition="none")
    assert _span(no_text.prefix, "<bot_i>", "<eot_i>") == []
    assert _span(no_text.prefix, "<bov_i>", "<eov_i>") == _span(full.prefix, "<bov_i>", "<eov_i>")
    assert none.prefix.tolist() == [S("<bos>"), S("<task_video>"), S("<bot_i>"), S("<eot_i>"), S("<res_0>")]
    assert np.array_equal(full.target, none.target) and np.array_equal(full.target, no_text.target)
    with pytest.raises(ValueError, match="unknown task 'nope'; known tasks: unconditional, t2v"):
        tasks.build("nope", ex, LAYOUT)
    with pytest.raises(ValueError, match="missing \\['audio'\\]"):
        tasks.build("a2v", {"video": ex["video"]}, LAYOUT)
    with pytest.raises(ValueError, match="video codes must lie in"):
        tasks.build("t2v", dict(ex, video=ex["video"] + 256), LAYOUT)


WEIGHTS = {"t2i": 1.0, "t2v": 1.0, "i2v": 1.0, "future": 1.0, "v2a": 1.0, "av_continuation": 1.0}


def test_mixture_hits_weights_and_curriculum():
    mix = mixture.MixtureConfig(weights=WEIGHTS)
    early = mixture.task_probabilities(mix, 0, 1000)
    late = mixture.task_probabilities(mix, 250, 1000)
    assert early["t2i"] == pytest.approx(0.9) and late["t2i"] == pytest.approx(0.1)
    assert late["t2v"] == pytest.approx(0.9 / 5)
    counts = collections.Counter(mixture.step_task(mix, 0, s, 40_000) for s in range(10_000, 30_000))
    for name, p in mixture.task_probabilities(mix, 20_000, 40_000).items():
        assert counts[name] / 20_000 == pytest.approx(p, abs=0.015), name
    early_images = sum(mixture.step_task(mix, 0, s, 40_000) == "t2i" for s in range(0, 4000))
    assert early_images / 4000 == pytest.approx(0.9, abs=0.02)
    with pytest.raises(ValueError, match="unknown task"):
        mixture.MixtureConfig(weights={"t2x": 1.0})


def test_batches_equal_length_dropout_and_resume():
    examples = [make_example(i, text_len=3 + i % 3) for i in range(60)]
    lengths = [len(e["text"]) for e in examples]
    mix = mixture.MixtureConfig(weights=WEIGHTS, text_dropout=0.0, uncond_dropout=0.0)
    batches = mixture.MixtureBatches(examples, lengths, LAYOUT, mix, batch_size=8, num_steps=50, seed=3)
    for step in range(20):
        batch = batches[step]
        assert mixture.padding_fraction(batch) == 0.0  # one bucket, one context length per batch
        assert batch["tokens"].shape[0] == 8 and len(set(batch["prefix_len"].tolist())) == 1
    # condition dropout produces the unconditional forms
    dropped = mixture.MixtureBatches(examples, lengths, LAYOUT, mixture.MixtureConfig(weights={"t2v": 1.0}, uncond_dropout=1.0),
                                     batch_size=4, num_steps=5, seed=0)[0]
    expected = tasks.unconditional_prefix("t2v")
    assert all(row[:len(expected)].tolist() == expected for row in dropped["tokens"])
    # two processes build disjoint halves of the same global batch
    halves = [mixture.MixtureBatches(examples, lengths, LAYOUT, mix, batch_size=8, num_steps=50, seed=3,
                                     process_index=p, process_count=2)[7] for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["tokens"] for h in halves]), batches[7]["tokens"])
    # the grain iterator resumes where it stopped
    it = mixture.make_iterator(batches)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it)["tokens"] for _ in range(2)]
    resumed = mixture.make_iterator(batches)
    resumed.set_state(state)
    for tokens in expected:
        np.testing.assert_array_equal(next(resumed)["tokens"], tokens)


def test_validation_batches_and_unigram_baseline():
    examples = [make_example(i, text_len=3 + i % 3) for i in range(10)]
    batches = list(mixture.task_batches(examples, "t2v", LAYOUT, batch_size=4))
    assert len(batches) == 2 and batches[0]["tokens"].shape[0] == 4
    first = tasks.build("t2v", examples[0], LAYOUT, rng=np.random.default_rng([0, 0]))
    np.testing.assert_array_equal(batches[0]["tokens"][0, :len(first)], first.tokens)
    assert batches[0]["segment_ids"][0].sum() == len(first)
    # constant video codes: targets are <bov_o>, 12 equal codes, <eov_o>, <eos>: entropy of (12, 1, 1, 1)/15
    constant = [dict(e, video=np.zeros_like(e["video"])) for e in examples]
    p = np.array([12, 1, 1, 1]) / 15
    entropy = float(-(p * np.log(p)).sum())
    assert mixture.unigram_baseline(constant, constant, "unconditional", LAYOUT) == pytest.approx(entropy, abs=0.02)
    spread = mixture.unigram_baseline(examples, examples, "unconditional", LAYOUT)
    assert 2.0 < spread < np.log(256) + 0.5
