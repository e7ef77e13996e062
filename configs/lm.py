"""The VideoPoet prefix LM: ``get_config('tiny' | 'bench' | '300m' | '1b' | '8b')``.

``tiny`` trains on this CPU in minutes; ``bench`` is the benchmark row (width 512, 8 layers,
vocabulary 8192, sequence 512 with a 128-token prefix, batch 8); ``300m``, ``1b`` and ``8b`` are
the paper's three sizes (non-embedding parameters), with the paper's vocabulary (256 special
ids, 32k text pieces, 2^18 video codes, 4 x 1,024 audio codes). Sharding lives here: the mesh shape and the logical-to-mesh rules.
"""
import os

import ml_collections

_HERE = os.path.dirname(os.path.abspath(__file__))


def _tokenizer(name, variant):
    return f"{os.path.join(_HERE, name)}:{variant}"

# Logical axis -> mesh axis. Parameters: FSDP over 'embed', tensor parallelism over heads, MLP
# and vocabulary. Activations: batch over data x fsdp, heads/MLP over tensor.
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("layers", None),
    ("head_dim", None),
    ("norm", None),
    ("text_embed", None),
    ("length", None),
    ("act_embed", None),
)

# name: (width, depth, heads, kv_heads, mlp_dim, mesh)
SIZES = {
    "tiny": (128, 3, 4, 2, 384, dict(data=-1, fsdp=1, tensor=1)),
    "bench": (512, 8, 8, 8, 2048, dict(data=1, fsdp=1, tensor=1)),
    "300m": (1024, 24, 16, 16, 2816, dict(data=-1, fsdp=8, tensor=1)),
    "1b": (2048, 20, 16, 16, 5632, dict(data=-1, fsdp=16, tensor=1)),
    "8b": (4096, 36, 32, 8, 14336, dict(data=-1, fsdp=32, tensor=4)),
}
# Parameters of the transformer layers (no embedding, no output projection) each size is meant
# to have; checked by tests within 10%.
NOMINAL_PARAMS = {"300m": 300e6, "1b": 1e9, "8b": 8e9}


def get_config(arg=None):
    size = arg or "tiny"
    if size not in SIZES:
        raise ValueError(f"configs/lm.py: unknown size {size!r}; expected one of {', '.join(SIZES)}")
    width, depth, heads, kv_heads, mlp_dim, mesh = SIZES[size]
    config = ml_collections.ConfigDict()
    config.kind = "lm"
    config.size = size
    config.seed = 0
    config.mesh = mesh
    config.logical_axis_rules = LOGICAL_AXIS_RULES

    # The unified vocabulary: video bits and audio levels x codes come from the tokenizer configs
    # named here (configs/X.py:arg); with a name left empty, from the fields here.
    config.vocab = ml_collections.ConfigDict(dict(
        text_size=64, video_bits=0, audio_levels=0, audio_codes=0,
        video_tokenizer_config=_tokenizer("tokenizer_video.py", "tiny"),
        audio_tokenizer_config=_tokenizer("tokenizer_audio.py", "tiny"), pad_to_multiple=128))
    config.model = ml_collections.ConfigDict(dict(
        width=width, depth=depth, num_heads=heads, num_kv_heads=kv_heads, mlp_dim=mlp_dim, qk_norm=False,
        rope_base=10000.0, norm_eps=1e-6, dtype="float32", param_dtype="float32", remat_policy="none",
        scan_layers=True, attention_impl="auto", text_embed_dim=0))

    # data.dataset 'tokens': the shards of `videolm tokenize` in data.tokens_dir (the vocabulary
    # then comes from their layout.json, not from config.vocab), trained on the task mixture;
    # 'synthetic': sequences of VideoPoet's layout with structure to learn (videolm/lm_data.py):
    # <bos> <task> <bot_i> text <eot_i> <bov_i> image <eov_i> <res> | <bov_o> video <eov_o>
    # <boa_o> audio <eoa_o> <eos>, where the video moves the image and the audio follows the text.
    # Sequence lengths are rounded up to length_multiple: fewer distinct shapes to compile.
    config.data = ml_collections.ConfigDict(dict(
        dataset="tokens", tokens_dir="", batch_size=8, length_multiple=16,
        num_examples=50_000, eval_examples=512, text_len=8, image_tokens=16, video_frames=4, audio_frames=6,
        image_codes=32))
    # The task mixture (videolm/mixture.py): relative weights within the image tasks and within the
    # video tasks; image tasks take image_share_early of the steps for the first
    # curriculum_fraction of the run, then image_share_late (the paper: 90% / 25%, then 10%).
    # Condition dropout trains the unconditional forms classifier-free guidance contrasts.
    config.mixture = ml_collections.ConfigDict(dict(
        weights=dict(unconditional=1.0, t2v=2.0, t2i=1.0, i2v=2.0, future=1.0, inpaint=1.0, outpaint=1.0,
                     stylize=1.0, a2v=1.0, v2a=1.0, av_continuation=1.0),
        curriculum_fraction=0.25, image_share_early=0.9, image_share_late=0.1, text_dropout=0.1,
        uncond_dropout=0.05))
    config.tasks = ml_collections.ConfigDict(dict(
        max_text_len=32, res_token=0, min_context_frames=1, stylize_first_frame_prob=0.5))
    config.train = ml_collections.ConfigDict(dict(
        num_steps=500, log_every=25, checkpoint_every=250, eval_every=250, keep_checkpoints=2,
        learning_rate=3e-3, warmup_steps=50, end_learning_rate_fraction=0.1, weight_decay=0.1,
        b1=0.9, b2=0.95, eps=1e-8, grad_clip=1.0, z_loss=1e-4, loss_chunk_size=0,
        time_limit_s=0.0))  # > 0: stop (evaluate and checkpoint) after this many seconds of training
    # Validation: num_batches batches of batch_size per task of the mixture (of the synthetic set).
    config.eval = ml_collections.ConfigDict(dict(num_batches=1, batch_size=16))
    # `videolm bench lm`: one timed training step of this shape on random tokens.
    config.bench = ml_collections.ConfigDict(dict(batch_size=8, seq_len=512, prefix_len=128, steps=5, warmup=2))

    if size == "bench":
        # 256 special + 256 text + 2^12 video + 4 x 896 audio = 8192 ids, the benchmark row.
        config.vocab.update(text_size=256, video_bits=12, audio_levels=4, audio_codes=896,
                            video_tokenizer_config="", audio_tokenizer_config="")
        # Measured on this CPU: chunked attention skips the masked blocks (~25% less attention time);
        # saving only matmul outputs ('dots') beats saving everything (fewer stacked residuals).
        config.model.update(attention_impl="chunked", remat_policy="dots")
        config.data.update(dataset="synthetic", batch_size=8, text_len=32, image_tokens=64, video_frames=5, audio_frames=16)
        config.train.update(learning_rate=3e-4, num_steps=100, warmup_steps=10)
    elif size != "tiny":
        # The paper: 2^18 video codes, 4 x 1,024 audio codes; 32k sentencepiece pieces (about 300k
        # ids in all). --config.model.text_embed_dim=2048 adds the T5-XL embedding projection.
        config.vocab.update(text_size=32_000, video_tokenizer_config=_tokenizer("tokenizer_video.py", "paper"),
                            audio_tokenizer_config=_tokenizer("tokenizer_audio.py", "paper"))
        config.model.update(dtype="bfloat16", remat_policy="dots_no_batch")
        config.tasks.update(max_text_len=64)
        config.data.update(batch_size=256, length_multiple=128, text_len=64, image_tokens=256, video_frames=5, audio_frames=106,
                           image_codes=2 ** 18)
        config.train.update(num_steps=500_000, learning_rate=3e-4 if size != "8b" else 1.5e-4,
                            warmup_steps=5000, loss_chunk_size=512, log_every=100, checkpoint_every=2000,
                            eval_every=2000)
        config.bench.update(batch_size=16, seq_len=2048, prefix_len=384)
    return config
