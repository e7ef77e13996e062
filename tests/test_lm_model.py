"""The prefix-LM transformer: mask semantics, attention implementations, fused loss, configs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from videolm import configlib
from videolm.model import attention as attn
from videolm.model import loss as loss_lib
from videolm.model import masks
from videolm.model.transformer import PrefixLM, count_params
from videolm.vocab import VocabLayout

SMALL = dict(vocab_size=300, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64, qk_norm=True,
             attention_impl="xla")
SEQ, PREFIX = 12, 5


def make_model(seed=0, **kwargs):
    """A PrefixLM with numpy-random parameters (no initialiser to compile: keeps tests fast)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: PrefixLM(**kwargs, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def fill(path, a):
        value = rng.normal(0.0, 0.1 if "scale" in jax.tree_util.keystr(path) else 0.3, a.shape)
        return jnp.asarray(value + ("scale" in jax.tree_util.keystr(path)), a.dtype)
    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, abstract))


@pytest.fixture(scope="module")
def model_fn():
    graphdef, state = nnx.split(make_model(**SMALL))

    @jax.jit
    def logits(tokens, prefix_len):
        return nnx.merge(graphdef, state)(tokens, prefix_len=prefix_len)
    return logits


def test_prefix_lm_mask_by_perturbation(model_fn):
    tokens = jax.random.randint(jax.random.key(0), (1, SEQ), 0, 300)
    prefix = jnp.array([PREFIX])
    base = model_fn(tokens, prefix)

    def changed(pos):
        perturbed = tokens.at[0, pos].set((tokens[0, pos] + 1) % 300)
        diff = jnp.abs(model_fn(perturbed, prefix) - base).max(axis=-1)[0]  # per query position
        return np.asarray(diff > 1e-5)

    # A prefix token is seen by every position (prefix ones included, bidirectionally).
    assert changed(PREFIX - 1).all()
    assert changed(0).all()
    # An output token is seen only by itself and later positions: no prefix position sees it.
    j = PREFIX + 3
    np.testing.assert_array_equal(changed(j), np.arange(SEQ) >= j)
    # With prefix 0 the model is plain causal: the last prefix token is not seen by earlier ones.
    causal = model_fn(tokens, jnp.array([0]))
    assert jnp.abs(causal[0, :PREFIX - 1] - base[0, :PREFIX - 1]).max() > 1e-4


def test_mask_formula_and_segments():
    prefix = jnp.array([3, 0])
    seg = jnp.array([[1, 1, 1, 1, 2, 2], [1, 1, 2, 2, 2, 0]])
    mask = np.asarray(masks.prefix_lm_mask(6, prefix, seg))[:, 0]
    for b in range(2):
        for i in range(6):
            for j in range(6):
                expected = (j <= i or j < int(prefix[b])) and seg[b, i] == seg[b, j]
                assert mask[b, i, j] == expected, (b, i, j)


def test_attention_implementations_agree():
    b, s, h, kvh, d = 2, 10, 4, 2, 8
    rng = np.random.default_rng(1)
    q = rng.normal(size=(b, s, h, d)).astype(np.float32)
    k = rng.normal(size=(b, s, kvh, d)).astype(np.float32)
    v = rng.normal(size=(b, s, kvh, d)).astype(np.float32)
    prefix = jnp.array([4, 0])
    seg = jnp.array([[1] * 6 + [2] * 4, [1] * 10])
    run = jax.jit(attn.attention, static_argnames="impl")
    ref = run(q, k, v, prefix_len=prefix, segment_ids=seg, impl="reference")
    xla = run(q, k, v, prefix_len=prefix, segment_ids=seg, impl="xla")
    np.testing.assert_allclose(xla, ref, atol=2e-5)
    pallas = run(q, k, v, prefix_len=prefix, segment_ids=seg, impl="pallas")  # interpret mode on CPU
    np.testing.assert_allclose(pallas, ref, atol=2e-5)
    # Chunked: query blocks of attn.CHUNK over the keys they can see; prefixes that end before,
    # inside and after the first block, a partial last block, with and without segments.
    s2 = 2 * attn.CHUNK + 8
    q2, k2, v2 = (rng.normal(size=(3, s2, h, d)).astype(np.float32) for _ in range(3))
    k2, v2 = k2[:, :, :kvh], v2[:, :, :kvh]
    prefix2 = jnp.array([attn.CHUNK - 3, attn.CHUNK + 40, 0])
    seg2 = jnp.sort(jnp.asarray(rng.integers(1, 4, (3, s2))), axis=1)
    for segments in (None, seg2):
        ref2 = run(q2, k2, v2, prefix_len=prefix2, segment_ids=segments, impl="reference")
        chunked = run(q2, k2, v2, prefix_len=prefix2, segment_ids=segments, impl="chunked")
        np.testing.assert_allclose(chunked, ref2, atol=2e-5)
    # Brute force (numpy): query 2 of row 0 attends keys 0..3 (prefix 4, same segment); GQA pairs heads.
    kk, vv = np.repeat(k[0, :4], 2, axis=1), np.repeat(v[0, :4], 2, axis=1)
    scores = np.einsum("hd,khd->hk", q[0, 2], kk) / d ** 0.5
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(ref[0, 2], np.einsum("hk,khd->hd", probs, vv), atol=2e-5)
    assert attn.resolve_impl("auto") == ("xla" if jax.default_backend() == "cpu" else "pallas")
    with pytest.raises(ValueError, match="attention_impl 'flash' is not one of"):
        attn.attention(q, k, v, impl="flash")
    with pytest.raises(ValueError, match="prefix_len must have shape"):
        attn.attention(q, k, v, prefix_len=jnp.array([1, 2, 3]))


def test_output_mask_and_loss_ignore_prefix_and_padding():
    weights = masks.output_mask(6, jnp.array([3]), jnp.array([[1, 1, 1, 1, 1, 0]]), jnp.array([[1, 1, 1, 1, 0, 0]]))
    # Input t predicts token t+1: outputs are tokens 3.. (targets of t >= 2); token 5 is padding.
    np.testing.assert_array_equal(weights[0], [0, 0, 1, 1, 0, 0])
    h = jax.random.normal(jax.random.key(0), (1, 6, 8))
    w = jax.random.normal(jax.random.key(1), (8, 20))
    targets = jnp.array([[1, 2, 3, 4, 5, 6]])
    loss = jax.jit(lambda t: loss_lib.lm_loss(h, w, t, weights)[0])
    base = loss(targets)
    assert loss(targets.at[0, 0].set(9).at[0, 1].set(9).at[0, 4].set(9).at[0, 5].set(9)) == base
    assert loss(targets.at[0, 2].set(9)) != base


@pytest.mark.parametrize("chunk", [0, 5])
def test_fused_loss_matches_reference_values_and_gradients(chunk):
    b, s, d, v = 2, 11, 16, 40
    keys = jax.random.split(jax.random.key(2), 4)
    h = jax.random.normal(keys[0], (b, s, d))
    w = jax.random.normal(keys[1], (d, v)) * 0.3
    targets = jax.random.randint(keys[2], (b, s), 0, v)
    weights = (jax.random.uniform(keys[3], (b, s)) > 0.3).astype(jnp.float32)
    fused = lambda h, w, wt: loss_lib.fused_cross_entropy(h, w, targets, wt, z_loss=1e-2, chunk_size=chunk)[0]  # noqa
    ref = lambda h, w, wt: loss_lib.reference_cross_entropy(h, w, targets, wt, z_loss=1e-2)  # noqa
    (v_fused, g_fused), (v_ref, g_ref) = (jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(h, w, weights)
                                          for f in (fused, ref))
    np.testing.assert_allclose(v_fused, v_ref, rtol=1e-5)
    for a, r in zip(g_fused, g_ref):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5)
    _, nll, _, correct = jax.jit(lambda: loss_lib.fused_cross_entropy(h, w, targets, weights, chunk_size=chunk))()
    logits = jnp.einsum("bsd,dv->bsv", h, w, precision="highest")
    np.testing.assert_allclose(nll, -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0],
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(correct, (logits.argmax(-1) == targets).astype(jnp.float32))


def test_per_modality_metrics():
    layout = VocabLayout(text_size=4, video_bits=2, audio_levels=1, audio_codes=4)  # 256 + 4 + 4 + 4 ids
    targets = jnp.array([[1, 257, 261, 265, 262]])  # special, text, video, audio, video
    weights = jnp.ones((1, 5))
    h = jax.random.normal(jax.random.key(0), (1, 5, 8))
    w = jax.random.normal(jax.random.key(1), (8, 268))
    _, metrics = jax.jit(lambda: loss_lib.lm_loss(h, w, targets, weights, layout))()
    _, nll, _, _ = jax.jit(lambda: loss_lib.fused_cross_entropy(h, w, targets, weights))()
    assert metrics["video_tokens"] == 2 and metrics["audio_tokens"] == 1 and metrics["text_tokens"] == 1
    np.testing.assert_allclose(metrics["video_nll"], (nll[0, 2] + nll[0, 4]) / 2, rtol=1e-6)
    np.testing.assert_allclose(metrics["audio_nll"], nll[0, 3], rtol=1e-6)


def _loss_and_grads(model_kwargs, tokens, prefix):
    model = make_model(3, **model_kwargs)

    def loss_fn(model):
        h = model.hidden(tokens[:, :-1], prefix_len=prefix)
        weights = masks.output_mask(tokens.shape[1] - 1, prefix)
        return loss_lib.lm_loss(h, model.head[...], tokens[:, 1:], weights)[0]
    return jax.jit(nnx.value_and_grad(loss_fn))(model)


def test_scan_unrolled_and_remat_agree():
    tokens = jax.random.randint(jax.random.key(4), (2, SEQ + 1), 0, 300)
    prefix = jnp.array([PREFIX, 2])
    base_loss, base_grads = _loss_and_grads(SMALL, tokens, prefix)
    for variant in (dict(scan_layers=False, remat_policy="proj"),):
        loss, grads = _loss_and_grads({**SMALL, **variant}, tokens, prefix)
        np.testing.assert_allclose(loss, base_loss, rtol=1e-6)
        for a, r in zip(jax.tree.leaves(grads), jax.tree.leaves(base_grads)):
            np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-6)


def test_text_embeddings_reach_the_outputs():
    graphdef, state = nnx.split(make_model(**SMALL, text_embed_dim=6))
    slot = VocabLayout.special("<text_emb>")
    tokens = jnp.array([[1, 3, slot, slot, 4, 5, 6, 7]])
    emb = np.random.default_rng(0).normal(size=(1, 2, 6)).astype(np.float32)
    run = jax.jit(lambda e: nnx.merge(graphdef, state)(tokens, prefix_len=jnp.array([5]), text_embeddings=e))
    out, out2 = run(emb), run(emb + np.array([0.0, 1.0])[None, :, None])
    assert jnp.abs(out2 - out)[0, -1].max() > 1e-4  # the last output sees the second embedding
    with pytest.raises(ValueError, match="no text projection"):
        jax.eval_shape(lambda: PrefixLM(**SMALL, rngs=nnx.Rngs(0))(tokens, text_embeddings=emb))


def test_bad_model_settings_are_refused():
    for change, message in ((dict(num_kv_heads=3), "multiple of num_kv_heads"),
                            (dict(remat_policy="some"), "remat_policy 'some'"),
                            (dict(attention_impl="fast"), "attention_impl 'fast'")):
        with pytest.raises(ValueError, match=message):
            nnx.eval_shape(lambda: PrefixLM(**{**SMALL, **change}, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("size", ["300m", "1b", "8b"])
def test_paper_sizes_parameter_counts(size):
    import importlib.util
    spec = importlib.util.spec_from_file_location("lm_config", "configs/lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = configlib.load_config(f"configs/lm.py:{size}")
    from videolm.lm_data import vocab_layout
    from videolm.train import model_kwargs
    layout = vocab_layout(config.vocab)
    kwargs = model_kwargs(config, layout)
    abstract = nnx.eval_shape(lambda: PrefixLM(**kwargs, rngs=nnx.Rngs(0)))
    counts = count_params(nnx.state(abstract, nnx.Param))
    width, depth, mlp = config.model.width, config.model.depth, config.model.mlp_dim
    heads, kv, hd = config.model.num_heads, config.model.num_kv_heads, width // config.model.num_heads
    per_layer = width * hd * (2 * heads + 2 * kv) + 3 * width * mlp + 2 * width
    assert counts["params_nonembedding"] == depth * per_layer + width + width * kwargs["vocab_size"]
    assert abs(depth * per_layer / module.NOMINAL_PARAMS[size] - 1) < 0.1
    assert kwargs["vocab_size"] >= 256 + 2 ** 18 + 4096


def test_tiny_config_takes_its_vocabulary_from_the_tokenizer_configs():
    from videolm.lm_data import vocab_layout
    config = configlib.load_config("configs/lm.py:tiny")
    layout = vocab_layout(config.vocab)
    video = configlib.load_config("configs/tokenizer_video.py:tiny")
    audio = configlib.load_config("configs/tokenizer_audio.py:tiny")
    assert layout.video_bits == video.model.codebook_bits
    assert (layout.audio_levels, layout.audio_codes) == (audio.model.num_levels, audio.model.codebook_size)
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        configlib.load_config("configs/lm.py:huge")

