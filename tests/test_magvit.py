"""The causal 3D CNN tokenizer: shapes, causality, image = first frame, inflation, API, paper config."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tokenizers.magvit import inflate, layers, lfq
from tokenizers.magvit import model as model_lib
from tokenizers.magvit.api import VideoTokenizer

SMALL = dict(base_channels=4, channel_multipliers=(1, 2, 2), num_res_blocks=1,
             temporal_downsample=(True, True), codebook_bits=6, num_groups=2)


def _video(key, frames, size=16, batch=1):
    return jax.random.uniform(jax.random.key(key), (batch, frames, size, size, 3), minval=-1, maxval=1)


@pytest.fixture(scope="module")
def small():
    """A small tokenizer and its jitted encoder/decoder (shared by the tests of this file)."""
    model = model_lib.create(lambda: model_lib.MagvitTokenizer(**SMALL, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    encode = jax.jit(lambda v: nnx.merge(graphdef, state).encode(v))
    decode = jax.jit(lambda zq: nnx.merge(graphdef, state).decoder(zq))
    return model, encode, decode


def test_token_shape_formulas():
    paper = (False, True, True)
    assert model_lib.token_shape(17, 128, 128, paper) == (5, 16, 16)
    assert model_lib.token_shape(1, 128, 128, paper) == (1, 16, 16)
    assert model_lib.token_shape(33, 64, 96, paper) == (9, 8, 12)
    assert model_lib.token_shape(17, 64, 64, (True, True)) == (5, 16, 16)
    assert model_lib.latent_frames(9, (True, True)) == 3
    with pytest.raises(ValueError, match="1 \\+ 4"):
        model_lib.token_shape(16, 128, 128, paper)
    with pytest.raises(ValueError, match="multiples of 8"):
        model_lib.token_shape(17, 100, 128, paper)


def test_model_output_shapes_match_formula(small):
    model, encode, decode = small
    for frames in (1, 9):
        z = encode(_video(frames, frames))
        t, h, w = model_lib.token_shape(frames, 16, 16, SMALL["temporal_downsample"])
        assert z.shape == (1, t, h, w, SMALL["codebook_bits"])
        assert z.dtype == jnp.float32
        recon = decode(lfq.quantize(z)[0])
        assert recon.shape == (1, frames, 16, 16, 3)


def test_encoder_is_causal(small):
    _, encode, _ = small
    video = _video(1, 9)
    z = encode(video)
    for t in range(1, 9):
        changed = video.at[:, t:].set(_video(2, 9)[:, t:])
        z2 = encode(changed)
        first_affected = (t + 3) // 4          # latent j covers frames 4j-3..4j
        # No token (nor latent value) of an earlier latent frame changes.
        np.testing.assert_array_equal(z2[:, :first_affected], z[:, :first_affected])
        assert not np.array_equal(z2[:, first_affected:], z[:, first_affected:])


def test_image_tokens_equal_first_frame_tokens(small):
    _, encode, _ = small
    video = _video(3, 9)
    z_image, z_video = encode(video[:, :1])[:, 0], encode(video)[:, 0]
    # Same math on differently shaped arrays: equal up to float rounding, and the same tokens.
    np.testing.assert_allclose(z_image, z_video, atol=1e-5)
    np.testing.assert_array_equal(lfq.quantize(z_image)[1], lfq.quantize(z_video)[1])


def test_decoder_is_causal(small):
    _, encode, decode = small
    zq = lfq.quantize(encode(_video(4, 9)))[0]
    flipped = zq.at[:, -1].multiply(-1.0)
    y, y2 = decode(zq), decode(flipped)
    # Output frames 0..4 come from latent frames 0..1 only.
    np.testing.assert_array_equal(y[:, :5], y2[:, :5])
    assert not np.array_equal(y[:, 5:], y2[:, 5:])
    # Decoding the first latent frame alone gives the first output frame.
    np.testing.assert_allclose(decode(zq[:, :1])[:, 0], y[:, 0], atol=1e-5)


@pytest.mark.parametrize("strides", [(1, 1, 1), (2, 2, 2), (1, 2, 2)])
@pytest.mark.parametrize("causal", [True, False])
def test_conv_impls_agree(strides, causal):
    x = jax.random.normal(jax.random.key(5), (2, 9, 8, 8, 5))
    k = jax.random.normal(jax.random.key(6), (3, 3, 3, 5, 7))
    ref = layers.conv3d(x, k, strides, causal=causal, impl="xla3d")
    frames = (9 - 1) // strides[0] + 1
    assert ref.shape == (2, frames, 8 // strides[1], 8 // strides[2], 7)
    for impl in ("fold_time", "sum2d"):
        np.testing.assert_allclose(layers.conv3d(x, k, strides, causal=causal, impl=impl), ref,
                                   atol=1e-4, rtol=1e-4)


def test_conv_against_direct_sum():
    """The causal convolution against an explicit loop over kernel taps (front time padding)."""
    x = np.asarray(jax.random.normal(jax.random.key(7), (1, 4, 5, 5, 2)))
    k = np.asarray(jax.random.normal(jax.random.key(8), (3, 3, 3, 2, 3)))
    xp = np.pad(x, ((0, 0), (2, 0), (1, 1), (1, 1), (0, 0)))
    ref = np.zeros((1, 4, 5, 5, 3))
    for t in range(4):
        for i in range(5):
            for j in range(5):
                patch = xp[0, t:t + 3, i:i + 3, j:j + 3]
                ref[0, t, i, j] = np.einsum("thwc,thwco->o", patch, k)
    np.testing.assert_allclose(layers.conv3d(jnp.asarray(x), jnp.asarray(k), impl="fold_time"), ref,
                               atol=1e-4)


def test_group_norm_statistics_are_per_frame():
    x = jax.random.normal(jax.random.key(9), (2, 3, 4, 4, 8)) * jnp.arange(1, 4)[None, :, None, None, None]
    y = layers.frame_group_norm(x, 2)
    grouped = np.asarray(y).reshape(2, 3, 4, 4, 2, 4)
    np.testing.assert_allclose(grouped.mean(axis=(2, 3, 5)), 0.0, atol=1e-5)
    np.testing.assert_allclose(grouped.var(axis=(2, 3, 5)), 1.0, atol=1e-3)


def test_causal_time_index_maps_frames_to_covering_latent():
    np.testing.assert_array_equal(layers.causal_time_index(17, 5),
                                  [0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4])
    np.testing.assert_array_equal(layers.causal_time_index(9, 5), [0, 1, 1, 2, 2, 3, 3, 4, 4])
    np.testing.assert_array_equal(layers.causal_time_index(1, 1), [0])


def test_inflated_model_reproduces_image_model():
    image_model = model_lib.create(lambda: model_lib.MagvitTokenizer(
        **dict(SMALL, temporal_kernel=1, temporal_downsample=(False, False)), rngs=nnx.Rngs(1)))
    video_model = model_lib.create(lambda: model_lib.MagvitTokenizer(**SMALL, rngs=nnx.Rngs(2)))
    inflate.inflate_params(nnx.state(image_model, nnx.Param), video_model)
    image_encode = nnx.jit(lambda m, v: m.encode(v))
    decode = nnx.jit(lambda m, zq: m.decoder(zq))
    image = _video(10, 1)
    z_img = image_encode(image_model, image)
    np.testing.assert_allclose(image_encode(video_model, image), z_img, atol=1e-5)
    # A static video: every latent frame is the image's latent, every decoded frame the image's.
    static = jnp.tile(image, (1, 9, 1, 1, 1))
    z_vid = image_encode(video_model, static)
    np.testing.assert_allclose(z_vid, jnp.tile(z_img, (1, 3, 1, 1, 1)), atol=1e-5)
    zq = lfq.quantize(z_img)[0]
    decoded_image = decode(image_model, zq)
    decoded_video = decode(video_model, jnp.tile(zq, (1, 3, 1, 1, 1)))
    np.testing.assert_allclose(decoded_video, jnp.tile(decoded_image, (1, 9, 1, 1, 1)), atol=1e-4)


def test_inflation_rejects_mismatched_models():
    image_model = nnx.eval_shape(lambda: model_lib.MagvitTokenizer(
        **dict(SMALL, base_channels=8, temporal_kernel=1, temporal_downsample=(False, False)), rngs=nnx.Rngs(1)))
    video_model = nnx.eval_shape(lambda: model_lib.MagvitTokenizer(**SMALL, rngs=nnx.Rngs(2)))
    with pytest.raises(ValueError, match="inflate"):
        inflate.inflate_params(nnx.state(image_model, nnx.Param), video_model)


class _ModelConfig(dict):
    __getattr__ = dict.__getitem__


def test_api_encode_decode_shapes_and_errors():
    config = _ModelConfig(SMALL, temporal_kernel=3, conv_impl="fold_time", dtype="float32")
    tok = VideoTokenizer(config, seed=0)
    assert tok.vocab_size == 2 ** SMALL["codebook_bits"]
    assert tok.token_shape(17, 64, 64) == (5, 16, 16)
    video = np.random.RandomState(0).randint(0, 256, (9, 16, 16, 3)).astype(np.uint8)
    tokens = tok.encode(video)
    assert tokens.shape == (3, 4, 4) and tokens.dtype == np.int32
    assert tokens.min() >= 0 and tokens.max() < tok.vocab_size
    image_tokens = tok.encode(video[0])
    assert image_tokens.shape == (1, 4, 4)
    np.testing.assert_array_equal(image_tokens[0], tokens[0])
    decoded = tok.decode(tokens)
    assert decoded.shape == (9, 16, 16, 3) and decoded.dtype == np.uint8
    assert tok.decode(image_tokens).shape == (1, 16, 16, 3)
    assert tok.encode_batch(np.stack([video, video])).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="1 \\+ 4"):
        tok.encode(video[:8])
    with pytest.raises(ValueError, match="\\[-1, 1\\]"):
        tok.encode(video.astype(np.float32))
    with pytest.raises(ValueError, match="tokens must lie"):
        tok.decode(np.full((1, 4, 4), tok.vocab_size))
    with pytest.raises(ValueError, match="\\[t, h, w\\]"):
        tok.decode(tokens[0])


def test_paper_config_builds_abstractly_and_steps():
    """VideoPoet's tokenizer: parameter count, 17x128x128 -> 5x16x16, and one abstract train step."""
    from tokenizers.magvit.train import TrainModels, StepConfig, train_step
    from tokenizers.magvit.losses import LossConfig
    from videolm import configlib
    config = configlib.load_config("configs/tokenizer_video.py:paper")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: TrainModels(config, nnx.Rngs(0))))
    tokenizer_params = sum(x.size for x in jax.tree.leaves(state["tokenizer"]))
    disc_params = sum(x.size for x in jax.tree.leaves(state["discriminator"]))
    print(f"paper tokenizer parameters: {tokenizer_params:,}; discriminator: {disc_params:,}")
    assert 100e6 < tokenizer_params < 600e6
    tok_shape = model_lib.token_shape(17, 128, 128, config.model.temporal_downsample)
    assert tok_shape == (5, 16, 16) and 2 ** config.model.codebook_bits == 2 ** 18
    cfg = StepConfig(loss=LossConfig.from_config(config.loss, config.lfq), ema_decay=0.999, with_gan=True)
    video = jax.ShapeDtypeStruct((1, 17, 128, 128, 3), jnp.uint8)
    new_state, metrics = jax.eval_shape(
        lambda s, v: train_step(graphdef, s, v, jax.random.key(0), None, cfg=cfg), state, video)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert metrics["loss"].shape == () and "r1_penalty" in metrics and "gan_g_loss" in metrics
    z = jax.eval_shape(lambda s, v: nnx.merge(graphdef, s).tokenizer.encode(v.astype(jnp.float32)), state, video)
    assert z.shape == (1, 5, 16, 16, 18)


@pytest.mark.parametrize("variant, tokens", [("tiny", (5, 16, 16)), ("demo", (5, 8, 8))])
def test_cpu_configs_build_with_their_token_shape(variant, tokens):
    """The CPU variants: 17x64x64 clips, their token grid from the config alone and from the model."""
    from videolm import configlib
    config = configlib.load_config(f"configs/tokenizer_video.py:{variant}")
    data = config.data
    assert (data.num_frames, data.height, data.width) == (17, 64, 64)
    assert model_lib.token_shape(17, 64, 64, config.model.temporal_downsample) == tokens
    assert 10 <= config.model.codebook_bits <= 12
    graphdef, state = nnx.split(nnx.eval_shape(lambda: model_lib.tokenizer_from_config(config.model, nnx.Rngs(0))))
    video = jax.ShapeDtypeStruct((1, 17, 64, 64, 3), jnp.float32)
    z = jax.eval_shape(lambda s, v: nnx.merge(graphdef, s).encode(v), state, video)
    assert z.shape == (1,) + tokens + (config.model.codebook_bits,)
    # Groups of several channels: a GroupNorm of one channel per group erases every per-frame
    # constant (a plain background's grey level) that the tokens must carry.
    channels = [config.model.base_channels * m for m in config.model.channel_multipliers]
    assert all(c // layers.num_groups_for(c, config.model.num_groups) >= 2 for c in channels)
