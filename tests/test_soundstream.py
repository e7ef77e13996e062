"""SoundStream codec: causality, shapes from the config, the causal upsampler, losses, discriminators, API."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tokenizers.soundstream import discriminators, losses
from tokenizers.soundstream import train as ss_train
from tokenizers.soundstream.api import AudioTokenizer
from tokenizers.soundstream.model import CausalUpsample, SoundStream, build_codec
from videolm import configlib, parallel

STRIDES = (2, 4, 5, 8)
HOP = 320


@pytest.fixture(scope="module")
def codec():
    audio = jax.random.normal(jax.random.key(0), (4, 32 * HOP)) * 0.3   # 128 latents > 16 codes

    def build():
        model = SoundStream(channels=2, latent_dim=8, strides=STRIDES, num_levels=3, codebook_size=16,
                            rngs=nnx.Rngs(0))
        # The decoder head starts at zero (silent); give it the non-zero weights of a trained one.
        head = model.decoder.head.conv.kernel
        head[...] = 0.3 * jax.random.normal(jax.random.key(5), head.shape)
        model.quantizer.initialize(model.encoder(audio), jax.random.key(1))
        return model

    return parallel.init_jitted(build)


@pytest.fixture(scope="module")
def encode_fn(codec):
    graphdef, state = nnx.split(codec)
    return jax.jit(lambda x: nnx.merge(graphdef, state).encoder(x))


@pytest.fixture(scope="module")
def decode_fn(codec):
    graphdef, state = nnx.split(codec)
    return jax.jit(lambda z: nnx.merge(graphdef, state).decoder(z))


def test_encoder_is_causal(encode_fn):
    samples = 12 * HOP
    x = np.asarray(jax.random.normal(jax.random.key(2), (1, samples)) * 0.3)
    n = 5 * HOP + 17                        # change every sample from n on
    y = x.copy()
    y[:, n:] = np.random.default_rng(0).normal(size=(1, samples - n)) * 0.3
    zx, zy = np.asarray(encode_fn(jnp.asarray(x))), np.asarray(encode_fn(jnp.asarray(y)))
    untouched = n // HOP                    # frames t with (t + 1) * hop <= n see only samples < n
    np.testing.assert_array_equal(zx[:, :untouched], zy[:, :untouched])
    assert np.abs(zx[:, untouched] - zy[:, untouched]).max() > 0   # frame 5 covers sample n


def test_decoder_is_causal(decode_fn):
    z = np.asarray(jax.random.normal(jax.random.key(3), (1, 10, 8)))
    j = 4
    w = z.copy()
    w[:, j:] += 1.0
    ax, aw = np.asarray(decode_fn(jnp.asarray(z))), np.asarray(decode_fn(jnp.asarray(w)))
    np.testing.assert_array_equal(ax[:, :j * HOP], aw[:, :j * HOP])
    assert np.abs(ax[:, j * HOP:] - aw[:, j * HOP:]).max() > 0


@pytest.mark.parametrize("size,hop", [("tiny", 320), ("demo", 640), ("paper", 320)])
def test_frame_counts_and_shapes_follow_the_config(size, hop):
    config = configlib.load_config(f"configs/tokenizer_audio.py:{size}")
    m = config.model
    samples = 34000                          # 2.125 s at 16 kHz
    frames = samples // hop
    spec = jax.ShapeDtypeStruct((2, samples), jnp.float32)

    def run(x):
        model = build_codec(m, rngs=nnx.Rngs(0))
        codes = model.encode(x)
        return model.hop, model.encoder(x), codes, model.decode(codes)

    latents, codes, audio = jax.eval_shape(lambda x: run(x)[1:], spec)
    assert nnx.eval_shape(lambda: build_codec(m, rngs=nnx.Rngs(0))).hop == hop
    assert latents.shape == (2, frames, m.latent_dim)
    assert codes.shape == (2, frames, m.num_levels) and codes.dtype == jnp.int32
    assert audio.shape == (2, frames * hop)
    if size == "paper":
        assert (m.num_levels, m.codebook_size, config.data.world.sample_rate) == (4, 1024, 16000)


def test_demo_config_gives_about_a_hundred_tokens_per_clip():
    """The CPU demo's LM reads 53 frames x 2 levels = 106 audio tokens per 2.125 s clip."""
    config = configlib.load_config("configs/tokenizer_audio.py:demo")
    m = config.model
    codec = nnx.eval_shape(lambda: build_codec(m, rngs=nnx.Rngs(0)))
    frames = ss_train.world_config(config.data).num_samples // codec.hop
    assert (frames, m.num_levels) == (53, 2) and 100 <= frames * m.num_levels <= 130
    assert not ss_train.uses_discriminator(config.loss)
    ss_train.validate_config(config)


def test_causal_upsample_is_a_cropped_transposed_convolution():
    s, cin, cout, frames = 4, 3, 2, 6
    up = parallel.init_jitted(lambda: CausalUpsample(cin, cout, s, rngs=nnx.Rngs(0)))
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, frames, cin)))
    # The kernel-2 conv's taps (x[t - 1], x[t]) as a transposed-conv kernel W [2s, cin, cout]:
    # W[r] = tap 1 (x[t]) for output phase r, W[s + r] = tap 0 (x[t - 1]).
    k4 = np.asarray(up.conv.conv.kernel[...]).reshape(2, cin, s, cout)
    w = np.concatenate([k4[1].transpose(1, 0, 2), k4[0].transpose(1, 0, 2)])
    bias = np.asarray(up.conv.conv.bias[...]).reshape(s, cout)
    # ConvTranspose(k=2s, stride=s): out[t * s + j] += x[t] @ W[j]; keep the first frames * s outputs.
    ref = np.zeros((2, (frames + 1) * s, cout))
    for t in range(frames):
        for j in range(2 * s):
            ref[:, t * s + j] += x[:, t] @ w[j]
    ref = ref[:, :frames * s] + np.tile(bias, (frames, 1))[None]
    np.testing.assert_allclose(np.asarray(up(jnp.asarray(x))), ref, rtol=1e-5, atol=1e-5)


def test_mel_filterbank_covers_the_spectrum():
    fb = losses.mel_filterbank(16000, 1024, 64)
    assert fb.shape == (513, 64)
    assert np.all(fb >= 0) and fb.max() <= 1.0
    assert np.all(fb.max(0) > 0.5)           # every filter catches at least one bin near its peak
    inner = fb[5:500].sum(1)                 # overlapping triangles tile the inner band
    assert np.all(inner > 0.5) and np.all(inner < 1.5)


def test_mel_loss_zero_on_identity_and_floor_ignores_quiet_noise():
    t = np.arange(8000) / 16000
    tone = 0.3 * np.sin(2 * np.pi * 440 * t)
    quiet = tone + 3e-4 * np.random.default_rng(0).normal(size=t.shape)   # noise ~60 dB under the tone
    detuned = 0.3 * np.sin(2 * np.pi * 440 * 2 ** (100 / 1200) * t)      # a semitone sharp
    x = jnp.asarray(np.stack([tone, tone]), jnp.float32)
    y = jnp.asarray(np.stack([quiet, detuned]), jnp.float32)
    kwargs = dict(sample_rate=16000, scales=(256, 512, 1024))
    assert float(losses.multiscale_mel_loss(x, x, **kwargs)) == 0.0
    dist = np.asarray(losses.spectral_distance_db(x, y, **kwargs))
    assert dist[0] < 0.5 * dist[1]          # quiet noise scores better than a wrong pitch ...
    no_floor = np.asarray(losses.spectral_distance_db(x, y, floor_db=-200.0, **kwargs))
    assert no_floor[0] > 2 * no_floor[1]    # ... which without the relative floor it would not
    # The floor is added, not clamped: a silent reconstruction still gets a gradient.
    silent = 1e-6 * jax.random.normal(jax.random.key(0), x.shape)
    grad = jax.grad(lambda y: jnp.sum(losses.spectral_distance_db(x, y, **kwargs)))(silent)
    assert np.abs(np.asarray(grad)).max() > 0
    with pytest.raises(ValueError, match="equal shape"):
        losses.multiscale_mel_loss(x, y[:, :-1], **kwargs)


def test_mel_counts_per_scale():
    scales = (64, 256, 1024)
    assert losses.mels_per_scale(scales, 32) == (32, 32, 32)
    assert losses.mels_per_scale(scales, [10, 40, 160]) == (10, 40, 160)
    with pytest.raises(ValueError, match="one per mel scale"):
        losses.mels_per_scale(scales, (10, 40))
    t = np.arange(4096) / 16000
    x = jnp.asarray(0.3 * np.sin(2 * np.pi * 440 * t)[None], jnp.float32)
    y = jnp.asarray(0.3 * np.sin(2 * np.pi * 470 * t)[None], jnp.float32)
    kwargs = dict(sample_rate=16000, scales=scales, num_mels=(10, 40, 160))
    assert float(losses.multiscale_mel_loss(x, x, **kwargs)) == 0.0
    # Each scale is scored with its own mel count: the loss is the mean of the one-scale losses.
    each = [float(losses.multiscale_mel_loss(x, y, sample_rate=16000, scales=(n,), num_mels=m))
            for n, m in zip(scales, (10, 40, 160))]
    np.testing.assert_allclose(float(losses.multiscale_mel_loss(x, y, **kwargs)), np.mean(each), rtol=1e-5)
    assert len(set(np.round(each, 6))) == 3
    assert float(losses.multiscale_mel_loss(x, y, **dict(kwargs, num_mels=160))) != np.mean(each)


def test_discriminators_give_logits_and_features():
    d = parallel.init_jitted(lambda: discriminators.Discriminators(
        stft_channels=4, stft_n_fft=128, stft_hop=32, stft_channel_mults=(1, 2), wave_scales=2,
        wave_channels=4, wave_downsamples=2, wave_max_channels=16, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(0), (2, 1280))
    outputs = jax.jit(lambda x: d(x))(x)
    assert len(outputs) == 3                # one STFT + two waveform scales
    stft_logits, stft_features = outputs[0]
    assert stft_logits.shape == (2, 1280 // 32 // 2, 1, 1) and len(stft_features) == 3
    for logits, features in outputs[1:]:
        assert logits.shape[0] == 2 and logits.shape[-1] == 1 and len(features) == 4
    grads = jax.jit(jax.grad(lambda x: sum(jnp.sum(o[0]) for o in d(x))))(x)
    assert np.all(np.isfinite(np.asarray(grads))) and np.abs(np.asarray(grads)).max() > 0


def test_api_encode_decode_and_levels(codec):
    tok = AudioTokenizer(codec, sample_rate=16000)
    assert tok.num_frames(34000) == 106 and tok.vocab_size == 48
    wave = np.asarray(jax.random.normal(jax.random.key(4), (3 * HOP + 100,))) * 0.3
    codes = tok.encode(wave)
    assert codes.shape == (3, 3) and codes.dtype == np.int32
    assert codes.min() >= 0 and codes.max() < 16
    audio = tok.decode(codes)
    assert audio.shape == (3 * HOP,) and audio.dtype == np.float32
    coarse = tok.decode(codes[:1])
    assert coarse.shape == (3 * HOP,) and not np.allclose(coarse, audio)
    batch = tok.encode(np.stack([wave, wave]))
    np.testing.assert_array_equal(batch[1], codes)
    np.testing.assert_array_equal(tok.unflatten(tok.flatten(codes)), codes)
    with pytest.raises(ValueError, match="levels"):
        tok.decode(np.zeros((4, 3), np.int32))
    with pytest.raises(ValueError, match="codes must lie"):
        tok.decode(np.full((2, 3), 16, np.int32))
    with pytest.raises(ValueError, match="shorter than one hop"):
        tok.encode(np.zeros(100, np.float32))


def test_decoder_starts_silent_and_the_waveform_term_moves_it():
    """The head starts at zero; at exactly zero output |STFT| is flat, so the spectral loss alone
    gives the head no gradient and a mel-only codec stays silent. The L2 term the tiny configs
    carry does give one."""
    model = SoundStream(channels=2, latent_dim=8, strides=STRIDES, num_levels=2, codebook_size=16,
                        rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    t = np.arange(4 * HOP) / 16000
    audio = jnp.asarray(0.25 * np.sin(2 * np.pi * 440 * t)[None], jnp.float32)

    def losses_of(params):
        m = nnx.merge(graphdef, params, rest)
        y = m.decoder(m.encoder(audio))
        mel = losses.multiscale_mel_loss(audio, y, sample_rate=16000, scales=(64, 256))
        return mel, jnp.mean(jnp.square(y - audio)), y

    _, _, y = jax.jit(losses_of)(params)
    assert float(jnp.abs(y).max()) == 0.0
    head = lambda g: np.asarray(g["decoder"]["head"]["conv"]["kernel"][...])
    mel_grad, l2_grad = jax.jit(lambda p: (jax.grad(lambda q: losses_of(q)[0])(p),
                                           jax.grad(lambda q: losses_of(q)[1])(p)))(params)
    assert np.all(np.isfinite(head(mel_grad))) and np.abs(head(mel_grad)).max() == 0.0
    assert np.abs(head(l2_grad)).max() > 0
