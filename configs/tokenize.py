"""Token shards for LM training: ``videolm tokenize --config configs/tokenize.py:tiny --workdir DIR``.

Runs the trained video and audio tokenizers over SoundShapes (or a registry dataset) and writes
array_record shards with each clip's caption pieces, video, first-frame, audio, control-video and
masked-video tokens (see videolm/tokenize.py). Point ``video_tokenizer_workdir`` and
``audio_tokenizer_workdir`` at the tokenizer runs (``--config.video_tokenizer_workdir=...``).
"""
import ml_collections


def get_config(arg=None):
    variant = arg or "tiny"
    if variant not in ("tiny", "paper"):
        raise ValueError(f"configs/tokenize.py: unknown variant {variant!r}; expected tiny or paper")
    size = 64 if variant == "tiny" else 128
    config = ml_collections.ConfigDict()
    config.kind = "tokenize"
    config.video_tokenizer_workdir = ""
    config.audio_tokenizer_workdir = ""
    config.data = ml_collections.ConfigDict(dict(
        dataset="soundshapes", data_dir="",
        world=dict(height=size, width=size, num_frames=17, fps=8.0, sample_rate=16000),
        splits=dict(train=2048, validation=128, test=128, compositional=128)))
    # sentencepiece: trained on the train captions unless model_path names a user's .model file.
    config.text = ml_collections.ConfigDict(dict(vocab_size=64, max_len=24, num_captions=4096, model_path=""))
    # Inpainting masks the central box (fraction of each side); outpainting the borders.
    config.masks = ml_collections.ConfigDict(dict(inpaint_fraction=0.5, outpaint_border=0.25, fill=128))
    config.shard_size = 512
    config.batch_size = 16
    if variant == "paper":
        config.text.update(vocab_size=32_000, max_len=64)
        config.data.splits = dict(train=100_000, validation=2048, test=2048, compositional=2048)
        config.shard_size = 4096
    return config
