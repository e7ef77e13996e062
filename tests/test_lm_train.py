"""LM training loop: synthetic data layout, resume with identical losses, layout mismatch refused."""
import numpy as np
import pytest

from videolm import configlib, runlog
from videolm.lm_data import SyntheticSequences, vocab_layout
from videolm.train import evaluate, train
from videolm.vocab import VocabLayout, VocabMismatchError

OVERRIDES = ("data.dataset=synthetic", "model.width=32", "model.depth=2", "model.num_heads=4", "model.num_kv_heads=2", "model.mlp_dim=64",
             "vocab.video_tokenizer_config=", "vocab.audio_tokenizer_config=",
             "vocab.text_size=8", "vocab.video_bits=4", "vocab.audio_levels=2", "vocab.audio_codes=8",
             "data.batch_size=8", "data.num_examples=64", "data.eval_examples=16", "data.text_len=3",
             "data.image_tokens=4", "data.video_frames=2", "data.audio_frames=2", "data.image_codes=8",
             "train.num_steps=4", "train.log_every=1", "train.eval_every=2", "train.checkpoint_every=2",
             "train.warmup_steps=1", "eval.num_batches=1", "eval.batch_size=8")


def _config(*extra):
    return configlib.load_config("configs/lm.py:tiny", OVERRIDES + extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and a run interrupted after step 2 then resumed (8 data-parallel devices)."""
    root = tmp_path_factory.mktemp("lm")
    config = _config()
    whole, resumed = str(root / "whole"), str(root / "resumed")
    train(config, whole)
    train(config, resumed, stop_at_step=2)
    train(config, resumed)
    return config, whole, resumed


def _losses(workdir, split="train"):
    return {row["step"]: row["loss"] for row in runlog.read_metrics(workdir, split)}


def test_resume_continues_with_identical_losses(runs):
    _, whole, resumed = runs
    expected, got = _losses(whole), _losses(resumed)
    assert sorted(expected) == [1, 2, 3, 4] and sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):  # the steps run after the restart: same data, same state
        assert got[step] == expected[step], (step, got[step], expected[step])
    assert _losses(whole, "eval").keys() == {2, 4}
    assert expected[4] < expected[1]


def test_evaluate_reports_per_modality(runs):
    config, whole, _ = runs
    result = evaluate(config, whole)
    assert result["step"] == 4
    for key in ("loss", "accuracy", "video_nll", "audio_nll", "special_nll"):
        assert np.isfinite(result[key]), key
    np.testing.assert_allclose(result["loss"], _losses(whole, "eval")[4], rtol=1e-5)


def test_vocabulary_mismatch_is_refused(runs):
    _, whole, _ = runs
    other = _config("vocab.video_bits=5")
    with pytest.raises(VocabMismatchError, match="video_bits: checkpoint .* has 4, tokenizers give 5"):
        train(other, whole)
    with pytest.raises(VocabMismatchError, match="video_bits"):
        evaluate(other, whole)


def test_synthetic_sequences_have_the_videopoet_layout():
    config = _config()
    layout = vocab_layout(config.vocab)
    source = SyntheticSequences(layout, num_examples=10, text_len=3, image_tokens=4, video_frames=3,
                                audio_frames=2, image_codes=8)
    ex = source[7]
    tokens, prefix = ex["tokens"], int(ex["prefix_len"])
    sp = VocabLayout.special
    assert tokens[0] == sp("<bos>") and tokens[prefix - 1] == sp("<res_0>") and tokens[prefix] == sp("<bov_o>")
    assert tokens[-1] == sp("<eos>") and len(tokens) == source.length
    image = layout.to_video_codes(tokens[prefix - 6:prefix - 2])
    video = layout.to_video_codes(tokens[prefix + 1:prefix + 13]).reshape(3, 4)
    shift = int(layout.to_text_pieces(tokens[3])) % 3 - 1
    for f in range(3):
        np.testing.assert_array_equal(video[f], np.roll(image, f * shift))
    np.testing.assert_array_equal(source[7]["tokens"], tokens)  # deterministic
    # The paper's text route: placeholders in the sequence, the pieces' embeddings beside it.
    embedded = SyntheticSequences(layout, num_examples=10, text_len=3, image_tokens=4, video_frames=3,
                                  audio_frames=2, image_codes=8, text_embed_dim=5)[7]
    assert np.all(embedded["tokens"][3:6] == sp("<text_emb>")) and embedded["text_embeddings"].shape == (3, 5)
    np.testing.assert_array_equal(np.delete(embedded["tokens"], [3, 4, 5]), np.delete(tokens, [3, 4, 5]))
    assert not np.array_equal(source[8]["tokens"], tokens)
    with pytest.raises(IndexError):
        source[10]


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="data.batch_size=6 must be divisible by the 8 data-parallel shards"):
        train(_config("data.batch_size=6"), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="data.dataset 'webvid' is not available to the LM; known: tokens, synthetic"):
        train(_config("data.dataset=webvid"), str(tmp_path / "b"))
    with pytest.raises(ValueError, match="data.tokens_dir is empty"):
        train(_config("data.dataset=tokens"), str(tmp_path / "c"))
    with pytest.raises(FileNotFoundError, match="holds no layout.json"):
        train(_config("data.dataset=tokens", f"data.tokens_dir={tmp_path}"), str(tmp_path / "d"))
