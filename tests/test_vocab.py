"""Unified vocabulary layout and text conditioning (sentencepiece pieces, projected embeddings)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from videolm import text as text_lib
from videolm import vocab as vocab_lib
from videolm.vocab import VocabLayout, VocabMismatchError

PAPER = VocabLayout(text_size=32_000, video_bits=18, audio_levels=4, audio_codes=1024)


def test_paper_layout_ranges_are_contiguous_and_disjoint():
    assert PAPER.range_of("special") == (0, 256)
    assert PAPER.range_of("text") == (256, 256 + 32_000)
    assert PAPER.range_of("video") == (32_256, 32_256 + 2 ** 18)
    assert PAPER.range_of("audio") == (32_256 + 2 ** 18, PAPER.size)
    assert PAPER.size == 256 + 32_000 + 2 ** 18 + 4096
    levels = [PAPER.range_of(f"audio_level_{l}") for l in range(4)]
    assert levels[0][0] == PAPER.audio_offset and levels[-1][1] == PAPER.size
    assert all(a[1] == b[0] for a, b in zip(levels, levels[1:]))
    assert PAPER.padded_size(128) % 128 == 0 and PAPER.padded_size(128) - PAPER.size < 128
    assert max(vocab_lib.SPECIAL_TOKENS.values()) < 256
    assert len(set(vocab_lib.SPECIAL_TOKENS.values())) == len(vocab_lib.SPECIAL_TOKENS)
    for name in ("<bos>", "<bot_i>", "<eot_i>", "<bov_i>", "<eov_i>", "<boa_i>", "<eoa_i>", "<source>",
                 "<res_0>", "<bov_o>", "<eov_o>", "<boa_o>", "<eoa_o>", "<eos>", "<pad>"):
        assert 0 <= VocabLayout.special(name) < 256
    assert len({VocabLayout.task(t) for t in vocab_lib.TASK_OUTPUT_TYPES}) == len(vocab_lib.TASK_OUTPUT_TYPES)


def test_ids_round_trip_and_modality():
    layout = VocabLayout(text_size=50, video_bits=6, audio_levels=3, audio_codes=10)
    video = np.arange(64)
    audio = np.array([[0, 9, 3], [1, 2, 9], [9, 0, 5]])
    np.testing.assert_array_equal(layout.to_video_codes(layout.video_ids(video)), video)
    np.testing.assert_array_equal(layout.to_audio_codes(layout.audio_ids(audio)), audio)
    np.testing.assert_array_equal(layout.to_text_pieces(layout.text_ids([0, 49])), [0, 49])
    # Level l of the audio lands in its own range: the same code on two levels gives two ids.
    ids = layout.audio_ids(audio)
    for level in range(3):
        lo, hi = layout.range_of(f"audio_level_{level}")
        assert np.all((ids[level] >= lo) & (ids[level] < hi))
    all_ids = np.arange(layout.size)
    modality = layout.modality_of(all_ids)
    expected = np.repeat([vocab_lib.SPECIAL, vocab_lib.TEXT, vocab_lib.VIDEO, vocab_lib.AUDIO], [256, 50, 64, 30])
    np.testing.assert_array_equal(modality, expected)
    np.testing.assert_array_equal(layout.modality_of(jnp.asarray(all_ids), xp=jnp), expected)


def test_bad_values_are_refused_with_the_name():
    layout = VocabLayout(text_size=50, video_bits=6, audio_levels=3, audio_codes=10)
    with pytest.raises(ValueError, match="video code"):
        layout.video_ids([64])
    with pytest.raises(ValueError, match=r"audio codes: expected shape \[3, frames\]"):
        layout.audio_ids(np.zeros((2, 4), int))
    with pytest.raises(ValueError, match="not all video ids"):
        layout.to_video_codes([layout.text_offset])
    with pytest.raises(ValueError, match="text_size"):
        VocabLayout(text_size=-1, video_bits=6, audio_levels=3, audio_codes=10)
    with pytest.raises(KeyError, match="unknown special token"):
        VocabLayout.special("<nope>")


def test_json_round_trip_and_mismatch_refused(tmp_path):
    path = str(tmp_path / "vocab.json")
    PAPER.save(path)
    assert VocabLayout.load(path) == PAPER
    PAPER.check_matches(VocabLayout.load(path))
    PAPER.check_matches(PAPER.to_dict())
    other = VocabLayout(text_size=32_000, video_bits=10, audio_levels=4, audio_codes=1024)
    with pytest.raises(VocabMismatchError, match="video_bits: checkpoint has 10, tokenizers give 18"):
        PAPER.check_matches(other)
    with pytest.raises(VocabMismatchError, match="missing fields"):
        VocabLayout.from_dict({"text_size": 3})
    changed = dict(PAPER.to_dict(), special_tokens={"<pad>": 1})
    with pytest.raises(VocabMismatchError, match="special token"):
        VocabLayout.from_dict(changed)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VocabLayout.load(str(tmp_path / "missing.json"))


def test_layout_from_tokenizer_configs():
    video = ml_collections.ConfigDict({"model": {"codebook_bits": 12, "base_channels": 8}})
    audio = ml_collections.ConfigDict({"model": {"num_levels": 4, "codebook_size": 256}})
    layout = vocab_lib.layout_from_configs(64, video, audio)
    assert layout == VocabLayout(text_size=64, video_bits=12, audio_levels=4, audio_codes=256)
    with pytest.raises(ValueError, match="video codebook bits: the tokenizer config has no 'model.codebook_bits'"):
        vocab_lib.layout_from_configs(64, ml_collections.ConfigDict({"model": {"channels": 3}}), audio)
    with pytest.raises(ValueError, match="video_bits needs a tokenizer config"):
        vocab_lib.layout_from_configs(64, None, audio)


CAPTIONS = [f"a {c} {s} moves to the {d}" for c in ("red", "blue", "green", "yellow")
            for s in ("circle", "square", "triangle") for d in ("left", "right", "top", "bottom")]


def test_sentencepiece_from_captions(tmp_path):
    tok = text_lib.train_sentencepiece(CAPTIONS, vocab_size=64)
    assert 4 <= tok.vocab_size <= 64
    for caption in CAPTIONS[:5]:
        assert tok.decode(tok.encode(caption)) == caption
    layout = VocabLayout(text_size=64, video_bits=4, audio_levels=1, audio_codes=4)
    ids = text_lib.encode_caption(tok, layout, CAPTIONS[0], max_len=64)
    assert np.all(layout.modality_of(ids) == vocab_lib.TEXT)
    assert tok.decode(layout.to_text_pieces(ids)) == CAPTIONS[0]
    path = str(tmp_path / "captions.model")
    tok.save(path)
    assert text_lib.TextTokenizer.load(path).encode(CAPTIONS[3]) == tok.encode(CAPTIONS[3])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        text_lib.TextTokenizer.load(str(tmp_path / "nope.model"))
    small = VocabLayout(text_size=2, video_bits=4, audio_levels=1, audio_codes=4)
    with pytest.raises(ValueError, match="reserves text_size=2"):
        text_lib.encode_caption(tok, small, CAPTIONS[0], max_len=8)


def test_projected_text_embeddings_fill_the_placeholders():
    placeholder = VocabLayout.special("<text_emb>")
    proj = text_lib.TextEmbeddingProjection(12, 8, rngs=nnx.Rngs(0))
    tokens = np.array([[1, 3, placeholder, placeholder, placeholder, 4, 9],
                       [1, 3, placeholder, 4, 9, 9, 9]])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 7, 8)).astype(np.float32)
    emb = rng.normal(size=(2, 3, 12)).astype(np.float32)
    graphdef, state = nnx.split(proj)
    out = np.asarray(jax.jit(lambda x, e: nnx.merge(graphdef, state)(x, tokens, e, placeholder))(x, emb))
    # Reference in f64. The f32 projection sums 12 products of size ~1 in an order XLA picks, so it
    # may differ from the exact value by a few ulps of those products (~1e-6 absolute); a wrong
    # embedding in a slot would be off by ~1.
    projected = np.einsum("bnt,td->bnd", emb.astype(np.float64), np.asarray(proj.kernel[...], np.float64))
    np.testing.assert_allclose(out[0, 2:5], projected[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(out[1, 2], projected[1, 0], rtol=0, atol=1e-5)
    keep = tokens != placeholder
    np.testing.assert_array_equal(out[keep], x[keep])
    with pytest.raises(ValueError, match="at most 64"):
        proj(x, tokens, np.zeros((2, 65, 12), np.float32), placeholder)
    np.testing.assert_array_equal(text_lib.embedding_placeholders(3), [placeholder] * 3)
