"""Sampling: KV-cache decode vs full forward, top-k/top-p, constraints, guidance, batching, long video."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from videolm import sampling, tasks
from videolm.model import decode
from videolm.model.transformer import PrefixLM
from videolm.vocab import VocabLayout

MODEL = dict(vocab_size=300, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64, qk_norm=True,
             attention_impl="xla")
VOCAB = VocabLayout(text_size=4, video_bits=4, audio_levels=2, audio_codes=4)  # 284 ids < 300
N = 11  # target tokens of every generate call here (one compiled program per batch shape)
LOGIT_ATOL = 1e-4


def make_model(seed=0, **overrides):
    """A PrefixLM with numpy-random parameters (no initialiser to compile)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: PrefixLM(**{**MODEL, **overrides}, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def fill(path, a):
        is_scale = "scale" in jax.tree_util.keystr(path)
        return jnp.asarray(rng.normal(0.0, 0.1 if is_scale else 0.3, a.shape) + is_scale, a.dtype)
    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, abstract))


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, VOCAB.size, 9).astype(np.int32), rng.integers(0, VOCAB.size, 5).astype(np.int32)]


@pytest.fixture(scope="module")
def forced_logits(model):
    """jit(prefill + steps) of a left-padded batch: logits of every target position."""
    graphdef, state = nnx.split(model)

    def run(tokens, pad_len, prefix_slots):
        return decode.teacher_forced_logits(nnx.merge(graphdef, state), tokens, pad_len, prefix_slots)
    return jax.jit(run, static_argnums=2)


def _full_logits(model, row, prefix_len):
    return np.asarray(model(jnp.asarray(row)[None], prefix_len=jnp.array([prefix_len])))[0]


def _teacher_forced(forced_logits, prompts, outputs):
    """Per-step logits [B, N, V] of each prompt followed by its generated tokens (left-padded)."""
    rows = [np.concatenate([p, o]) for p, o in zip(prompts, outputs)]
    prefix_slots = max(p.size for p in prompts)
    tokens, pad_len = sampling.left_pad(rows, prefix_slots + outputs.shape[1])
    return np.asarray(forced_logits(tokens, pad_len, prefix_slots))


# ------------------------------------------------------------------------ cache == full forward


@pytest.mark.parametrize("layer_loop", ["scan", "unrolled"])
def test_cached_logits_equal_full_forward(model, prompts, layer_loop):
    rng = np.random.default_rng(1)
    targets = rng.integers(0, VOCAB.size, (2, 7)).astype(np.int32)
    rows = [np.concatenate([p, t]) for p, t in zip(prompts, targets)]
    tokens, pad_len = sampling.left_pad(rows, 9 + 7)
    graphdef, state = nnx.split(model)
    cached = jax.jit(lambda s, t, p: decode.teacher_forced_logits(nnx.merge(graphdef, s), t, p, 9,
                                                                  layer_loop=layer_loop))(state, tokens, pad_len)
    for b, prompt in enumerate(prompts):
        full = _full_logits(model, rows[b], prompt.size)  # each row alone, unpadded
        expected = full[prompt.size - 1:-1]  # position i predicts token i + 1: the 7 targets
        np.testing.assert_allclose(np.asarray(cached[b]), expected, atol=LOGIT_ATOL, rtol=0)
    assert np.abs(np.asarray(cached[0]) - np.asarray(cached[1])).max() > 0.1  # different rows differ


# ------------------------------------------------------------------------ cached == uncached tokens

GREEDY = sampling.SamplingConfig(temperature=0.0)
SAMPLED = sampling.SamplingConfig(temperature=1.0, top_k=40, top_p=0.95, seed=(11, 12))


@pytest.fixture(scope="module")
def decoded(model, prompts):
    """Cached and uncached tokens of the two-prompt batch for the greedy and the sampled settings."""
    out = {}
    for name, config in (("greedy", GREEDY), ("sampled", SAMPLED)):
        for use_cache in (True, False):
            out[name, use_cache] = sampling.generate(model, prompts, num_tokens=N, sampling=config, vocab=VOCAB,
                                                     use_cache=use_cache)
    return out


@pytest.mark.parametrize("name", ["greedy", "sampled"])
def test_cached_decode_equals_uncached(decoded, name):
    cached, uncached = decoded[name, True], decoded[name, False]
    assert cached.shape == (2, N) and cached.dtype == np.int32
    np.testing.assert_array_equal(cached, uncached)


def test_cache_layouts_agree_on_tokens(model, prompts, decoded):
    scan = sampling.generate(model, prompts, num_tokens=N, sampling=GREEDY, vocab=VOCAB, layer_loop="scan")
    unrolled = sampling.generate(model, prompts, num_tokens=N, sampling=GREEDY, vocab=VOCAB, layer_loop="unrolled")
    np.testing.assert_array_equal(scan, unrolled)
    np.testing.assert_array_equal(unrolled, decoded["greedy", True])


def test_greedy_is_argmax_and_sampling_differs(decoded, forced_logits, prompts):
    logits = _teacher_forced(forced_logits, prompts, decoded["greedy", True])
    np.testing.assert_array_equal(decoded["greedy", True], logits[..., :VOCAB.size].argmax(-1))
    assert (decoded["sampled", True] != decoded["greedy", True]).any()


def test_same_seed_reproduces_and_other_seed_differs(model, prompts, decoded):
    again = sampling.generate(model, prompts, num_tokens=N, sampling=SAMPLED, vocab=VOCAB)
    np.testing.assert_array_equal(again, decoded["sampled", True])
    other = sampling.generate(model, prompts, num_tokens=N, sampling=dataclasses.replace(SAMPLED, seed=(5, 6)),
                              vocab=VOCAB)
    assert (other != again).any()


def test_batched_prompts_equal_each_alone(model, prompts, decoded):
    for b, prompt in enumerate(prompts):
        for name, config in (("sampled", dataclasses.replace(SAMPLED, seed=(SAMPLED.seed[b],))),
                             ("greedy", GREEDY)):
            alone = sampling.generate(model, [prompt], num_tokens=N, sampling=config, vocab=VOCAB)
            np.testing.assert_array_equal(alone[0], decoded[name, True][b], err_msg=f"{name} row {b}")


# ------------------------------------------------------------------------ top-k / top-p


def _reference_kept(logits, top_k, top_p):
    """numpy: ids kept by top-k then top-p (nucleus on the renormalised top-k distribution)."""
    order = np.argsort(-logits, kind="stable")
    kept = np.zeros(logits.shape, bool)
    kept[order[:top_k] if top_k else order] = True
    if top_k:
        kept |= logits >= logits[order[top_k - 1]]  # ties with the k-th
    probs = np.where(kept, np.exp(logits - logits.max()), 0.0)
    probs /= probs.sum()
    sorted_probs = probs[order]
    before = np.cumsum(sorted_probs) - sorted_probs
    nucleus = np.zeros(logits.shape, bool)
    nucleus[order[(before < top_p) & (sorted_probs > 0)]] = True
    return kept & nucleus


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.6), (8, 0.5)])
def test_filter_logits_matches_reference_distribution(top_k, top_p):
    rng = np.random.default_rng(top_k)
    logits = rng.normal(0, 2.0, (4, 50)).astype(np.float32)
    allowed = rng.random((4, 50)) < 0.8
    filtered = np.asarray(sampling.filter_logits(jnp.asarray(logits), jnp.asarray(allowed), temperature=0.7,
                                                 top_k=jnp.int32(top_k), top_p=jnp.float32(top_p)))
    probs = np.asarray(jax.nn.softmax(filtered, axis=-1))
    for row in range(4):
        masked = np.where(allowed[row], logits[row] / 0.7, -np.inf)
        kept = _reference_kept(masked, top_k, top_p)
        assert kept.sum() >= 1 and (not top_k or kept.sum() <= top_k)
        assert (probs[row][~kept] == 0).all()
        expected = np.where(kept, np.exp(masked - masked.max()), 0.0)
        np.testing.assert_allclose(probs[row], expected / expected.sum(), atol=1e-6)


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.5)])
def test_top_k_top_p_never_emit_excluded_tokens(model, forced_logits, top_k, top_p):
    rng = np.random.default_rng(2)
    prompt = rng.integers(0, VOCAB.size, 9).astype(np.int32)
    config = sampling.SamplingConfig(temperature=1.5, top_k=top_k, top_p=top_p, seed=4)
    out = sampling.generate(model, [prompt, prompt], num_tokens=N, sampling=config, vocab=VOCAB)
    # Many draws: the two rows use different keys; repeat with more seeds for coverage.
    outs = [out] + [sampling.generate(model, [prompt, prompt], num_tokens=N, sampling=dataclasses.replace(
        config, seed=s), vocab=VOCAB) for s in (5, 6)]
    distinct = set()
    for out in outs:
        logits = _teacher_forced(forced_logits, [prompt, prompt], out)
        for b in range(2):
            for n in range(N):
                masked = logits[b, n].copy() / 1.5
                masked[VOCAB.size:] = -np.inf
                kept = _reference_kept(masked, top_k, top_p)
                assert kept[out[b, n]], f"step {n}: token {out[b, n]} is outside the top-k/top-p set"
                distinct.add((n, int(out[b, n])))
    assert len(distinct) > N  # the draws are not all the same sequence


# ------------------------------------------------------------------------ constraints


def test_constrained_decoding_stays_in_range(model, prompts):
    layout = sampling.TargetLayout("video_audio", video_shape=(1, 1, 2), audio_shape=(2, 2))
    assert layout.length == N
    constraint = layout.constraint(VOCAB)
    hot = sampling.SamplingConfig(temperature=3.0, seed=(1, 2))
    out = sampling.generate(model, prompts, num_tokens=N, allowed=layout, sampling=hot, vocab=VOCAB)
    assert constraint.allows(out).all()
    parts = layout.split(VOCAB, out[0])
    assert parts["video"].shape == (1, 1, 2) and parts["audio"].shape == (2, 2)
    # Unconstrained, the same model leaves those ranges.
    free = sampling.generate(model, prompts, num_tokens=N, sampling=hot, vocab=VOCAB)
    assert not constraint.allows(free).all()


def test_boolean_mask_constraint(model, prompts):
    rng = np.random.default_rng(3)
    mask = rng.random((N, VOCAB.size)) < 0.05
    mask[np.arange(N), rng.integers(0, VOCAB.size, N)] = True
    out = sampling.generate(model, prompts, num_tokens=N, allowed=mask,
                            sampling=sampling.SamplingConfig(temperature=3.0, seed=(3, 4)), vocab=VOCAB)
    assert mask[np.arange(N)[None], out].all()


def test_forced_tokens_are_emitted_and_fed(model, prompts, decoded):
    forced = np.full((2, N), -1, np.int32)
    forced[:, 2] = 7
    out = sampling.generate(model, prompts, num_tokens=N, sampling=GREEDY, vocab=VOCAB, forced=forced)
    assert (out[:, 2] == 7).all()
    np.testing.assert_array_equal(out[:, :2], decoded["greedy", True][:, :2])
    ref = sampling.generate(model, prompts, num_tokens=N, sampling=GREEDY, vocab=VOCAB, forced=forced,
                            use_cache=False)
    np.testing.assert_array_equal(out, ref)


def _example(rng, video_shape=(2, 2, 2), audio_shape=(2, 3)):
    video = rng.integers(0, VOCAB.video_size, video_shape)
    return {"text": rng.integers(0, VOCAB.text_size, 3), "video": video, "image": video[:1],
            "audio": rng.integers(0, VOCAB.audio_codes, audio_shape),
            **{k: rng.integers(0, VOCAB.video_size, video_shape) for k in ("control", "inpaint", "outpaint")}}


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_target_layout_matches_tasks(task):
    rng = np.random.default_rng(0)
    example = _example(rng)
    seq = tasks.build(task, example, VOCAB, rng=rng)
    layout = sampling.target_layout(task, video_shape=(2, 2, 2), audio_shape=(2, 3))
    assert layout.length == seq.target.size
    assert layout.constraint(VOCAB).allows(seq.target).all()
    parts = layout.split(VOCAB, seq.target)
    if "video" in parts:
        np.testing.assert_array_equal(parts["video"], example["image" if task == "t2i" else "video"])
    if "audio" in parts:
        np.testing.assert_array_equal(parts["audio"], example["audio"])
    # Forcing the known leading frames reproduces the target there (and every special token).
    video, audio = parts.get("video"), parts.get("audio")
    forced = layout.forced(VOCAB, video=None if video is None else video[:1],
                           audio=None if audio is None else audio[:, :2])
    known = forced >= 0
    np.testing.assert_array_equal(forced[known], seq.target[known])
    specials = sum(count == 1 for _, count, _, _ in layout.segments(VOCAB))
    expected = specials + (0 if video is None else video[:1].size) + (0 if audio is None else audio[:, :2].size)
    assert known.sum() == expected
    # Any other token at a special position is refused.
    wrong = seq.target.copy()
    wrong[0] = VocabLayout.special("<eos>")
    assert not layout.constraint(VOCAB).allows(wrong)[0]


# ------------------------------------------------------------------------ guidance


def test_guidance_scale_one_equals_conditional(model, prompts, decoded):
    uncond = [np.array([1, 16, 31], np.int32)] * 2
    guided = sampling.generate(model, prompts, num_tokens=N, sampling=SAMPLED, vocab=VOCAB, uncond_prefixes=uncond)
    np.testing.assert_array_equal(guided, decoded["sampled", True])


def test_guidance_combines_both_branches(model, prompts, forced_logits):
    uncond = [np.array([1, 16, 31], np.int32), np.array([1, 17, 4, 31], np.int32)]
    config = sampling.SamplingConfig(temperature=0.0, guidance_scale=3.0)
    out = sampling.generate(model, prompts, num_tokens=N, sampling=config, vocab=VOCAB, uncond_prefixes=uncond)
    cond_logits = _teacher_forced(forced_logits, prompts, out)[..., :VOCAB.size]
    uncond_logits = _teacher_forced(forced_logits, uncond, out)[..., :VOCAB.size]
    expected = (uncond_logits + 3.0 * (cond_logits - uncond_logits)).argmax(-1)
    np.testing.assert_array_equal(out, expected)
    assert (out != cond_logits.argmax(-1)).any()  # guidance changed something


# ------------------------------------------------------------------------ long video


class CausalToyTokenizer:
    """Frames of one flat colour per latent frame: latent 0 is frame 0, latent j >= 1 frames 4j-3..4j."""

    time_factor = 4

    def encode(self, frames):
        frames = np.asarray(frames)
        assert (frames.shape[0] - 1) % self.time_factor == 0
        return frames[::self.time_factor, :2, :2, 0].astype(np.int32)  # [t, 2, 2] codes

    def decode(self, codes):
        codes = np.asarray(codes)
        frames = np.concatenate([codes[:1], np.repeat(codes[1:], self.time_factor, axis=0)])
        return np.repeat(frames[..., None], 3, axis=-1).astype(np.uint8)  # [1 + 4(t-1), 2, 2, 3]


def test_extend_video_joins_keep_last_second_as_prefix(model):
    toy = CausalToyTokenizer()
    rng = np.random.default_rng(4)
    first = rng.integers(0, VOCAB.video_size, (3, 2, 2)).astype(np.int32)
    assert sampling.context_latent_frames(1.0, fps=8) == 3  # 9 frames: the last 1.125 s at 8 fps
    k = 2  # clips here have 3 latent frames (9 frames); condition on the last 2 (5 frames)
    result = sampling.extend_video(model, first, num_frames=23, vocab=VOCAB, encode=toy.encode, decode=toy.decode,
                                   context_latent_frames=k, sampling=sampling.SamplingConfig(seed=7))
    assert result.frames.shape == (23, 2, 2, 3)
    # 9 frames, then 4 * (3 - k) new frames per generated clip: 13, 17, 21, 25 >= 23.
    assert len(result.chunk_tokens) == 1 + 4
    for i, (context, prefix) in enumerate(zip(result.context_tokens, result.prefixes)):
        previous, chunk = result.chunk_tokens[i], result.chunk_tokens[i + 1]
        # The context is the previous clip's last k latent frames (its last second) ...
        np.testing.assert_array_equal(context, previous[-k:])
        # ... it is the future-prediction prefix of tasks.py ...
        np.testing.assert_array_equal(prefix, tasks.head(tasks.get_task("future"))
                                      + tasks.visual_in(VOCAB, previous[-k:]) + tasks.res(tasks.TaskOptions()))
        # ... and the new clip starts with it.
        np.testing.assert_array_equal(chunk[:k], context)
    # No jump at the joins: the frames are the decoded clips laid end to end.
    expected = np.concatenate([toy.decode(result.chunk_tokens[0])]
                              + [toy.decode(c)[1 + 4 * (k - 1):] for c in result.chunk_tokens[1:]])[:23]
    np.testing.assert_array_equal(result.frames, expected)
    # Reproducible from the seed.
    again = sampling.extend_video(model, first, num_frames=23, vocab=VOCAB, encode=toy.encode, decode=toy.decode,
                                  context_latent_frames=k, sampling=sampling.SamplingConfig(seed=7))
    np.testing.assert_array_equal(again.frames, result.frames)


# ------------------------------------------------------------------------ bad input


def test_bad_inputs_raise_clear_errors(model, prompts):
    def gen(**kwargs):
        args = dict(num_tokens=N, sampling=GREEDY, vocab=VOCAB)
        return sampling.generate(model, kwargs.pop("prefixes", prompts), **{**args, **kwargs})

    with pytest.raises(ValueError, match="needs uncond_prefixes"):
        gen(sampling=sampling.SamplingConfig(guidance_scale=2.0))
    with pytest.raises(ValueError, match="1 uncond_prefixes for 2 prefixes"):
        gen(uncond_prefixes=[prompts[0]])
    with pytest.raises(ValueError, match="seeds for 2 prompts"):
        gen(sampling=sampling.SamplingConfig(seed=(1, 2, 3)))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 300\)"):
        gen(prefixes=[np.array([1, 400])])
    with pytest.raises(ValueError, match="non-empty 1-D integer"):
        gen(prefixes=[np.array([], np.int32)])
    with pytest.raises(ValueError, match="num_tokens must be a positive int"):
        gen(num_tokens=0)
    with pytest.raises(ValueError, match="not allowed there"):
        gen(allowed=sampling.TargetLayout("video", video_shape=(1, 2, 3)), num_tokens=9,
            forced=np.array([5] + [-1] * 8))
    with pytest.raises(ValueError, match="covers 9 positions"):
        gen(allowed=sampling.TargetLayout("video", video_shape=(1, 2, 3)))
    with pytest.raises(ValueError, match="bool mask"):
        gen(allowed=np.ones((N, 3), np.int32))
    with pytest.raises(ValueError, match="no id is allowed"):
        gen(allowed=np.zeros((N, 300), bool))
    with pytest.raises(ValueError, match="layer_loop"):
        gen(layer_loop="vmap")
    with pytest.raises(ValueError, match="temperature"):
        sampling.SamplingConfig(temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        sampling.SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="needs video_shape"):
        sampling.TargetLayout("video")
    with pytest.raises(ValueError, match="one latent frame"):
        sampling.TargetLayout("image", video_shape=(2, 2, 2))
    with pytest.raises(ValueError, match="unknown task"):
        sampling.target_layout("t2x", video_shape=(1, 2, 2))
    toy = CausalToyTokenizer()
    first = np.zeros((3, 2, 2), np.int32)
    with pytest.raises(ValueError, match=r"context_latent_frames=3 must be in \[1, 3\)"):
        sampling.extend_video(model, first, num_frames=20, vocab=VOCAB, encode=toy.encode, decode=toy.decode,
                              context_latent_frames=3)
    with pytest.raises(ValueError, match="expected \\(2, 2, 2\\)"):
        sampling.extend_video(model, first, num_frames=20, vocab=VOCAB, encode=lambda f: np.zeros((1, 2, 2)),
                              decode=toy.decode, context_latent_frames=2)
