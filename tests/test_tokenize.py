"""Token shards: contents equal the tokenizers' outputs, masks, determinism, resume, task round trip."""
import os

import numpy as np
import pytest
from flax import nnx

from tokenizers.magvit.api import VideoTokenizer
from tokenizers.soundstream.api import AudioTokenizer
from tokenizers.soundstream.model import build_codec
from videolm import configlib, parallel, tasks, tokenize
from videolm.data.soundshapes import WorldConfig, generate_clip
from videolm.text import train_sentencepiece
from videolm.vocab import VocabLayout

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")
WORLD = WorldConfig(height=32, width=32, num_frames=9, fps=8.0, sample_rate=16000)


@pytest.fixture(scope="module")
def toolkit():
    video_config = configlib.load_config(os.path.join(CONFIGS, "tokenizer_video.py:tiny"))
    audio_config = configlib.load_config(os.path.join(CONFIGS, "tokenizer_audio.py:tiny"))
    video_config.model.update(base_channels=8, num_groups=8)  # small: the plumbing is what is tested
    video = VideoTokenizer(video_config.model, seed=1)  # untrained weights: the plumbing is what is tested
    audio = AudioTokenizer(parallel.init_jitted(lambda: build_codec(audio_config.model, rngs=nnx.Rngs(2))),
                           WORLD.sample_rate)
    clips = [dict(generate_clip(WORLD, "train", i), index=i) for i in range(6)]
    text = train_sentencepiece([c["caption"] for c in clips] * 4, 40)
    layout = VocabLayout(text_size=40, video_bits=video.codebook_bits, audio_levels=audio.num_levels,
                         audio_codes=audio.codebook_size)

    def encode(examples):
        return tokenize.encode_batch(examples, video, audio, text, inpaint_fraction=0.5, outpaint_border=0.25,
                                     max_text_len=64)
    return dict(video=video, audio=audio, clips=clips, text=text, layout=layout, encode=encode)


def test_records_are_the_tokenizers_outputs(toolkit):
    video, clips = toolkit["video"], toolkit["clips"]
    records = toolkit["encode"](clips[:2])
    stack = lambda key: np.stack([r[key] for r in records])  # noqa: E731
    videos = np.stack([c["video"] for c in clips[:2]])
    # batch-2 calls reuse the encoder compiled for the records
    np.testing.assert_array_equal(stack("video"), video.encode_batch(videos))
    np.testing.assert_array_equal(stack("control"), video.encode_batch(np.stack([c["control"] for c in clips[:2]])))
    # the first frame alone gives the first latent frame of the clip (the encoder is causal)
    np.testing.assert_array_equal(stack("image"), video.encode_batch(videos[:, :1]))
    np.testing.assert_array_equal(stack("image"), stack("video")[:, :1])
    masked = videos.copy()
    masked[:, :, 8:24, 8:24] = 128  # the central half of each side
    np.testing.assert_array_equal(stack("inpaint"), video.encode_batch(masked))
    border = videos.copy()
    border[:, :, :8], border[:, :, 24:], border[:, :, :, :8], border[:, :, :, 24:] = 128, 128, 128, 128
    np.testing.assert_array_equal(stack("outpaint"), video.encode_batch(border))
    assert not np.array_equal(stack("inpaint"), stack("video"))
    np.testing.assert_array_equal(stack("audio"), toolkit["audio"].encode(np.stack([c["audio"] for c in clips[:2]])))
    for clip, record in zip(clips[:2], records):
        assert toolkit["text"].decode(record["text"].tolist()) == clip["caption"]


def test_shards_deterministic_resumable_and_feed_tasks(toolkit, tmp_path):
    clips, encode = toolkit["clips"], toolkit["encode"]
    calls = []

    def counting_encode(examples):
        calls.append(len(examples))
        return encode(examples)

    out_a = str(tmp_path / "a")
    summary = tokenize.tokenize_split(clips, out_a, num_shards=3, batch_size=2, encode=counting_encode, progress=False)
    assert summary == {"shards": 3, "written": 3, "skipped": 0, "examples": 6} and sum(calls) == 6
    # an interrupted run: one shard lost; the re-run writes only that shard
    lost = os.path.join(out_a, tokenize.shard_name(1, 3))
    os.remove(lost + ".json")
    calls.clear()
    summary = tokenize.tokenize_split(clips, out_a, num_shards=3, batch_size=2, encode=counting_encode, progress=False)
    assert summary["written"] == 1 and summary["skipped"] == 2 and sum(calls) == 2
    # a second process layout writes the same records
    out_b = str(tmp_path / "b")
    for p in range(2):
        tokenize.tokenize_split(clips, out_b, num_shards=3, batch_size=4, encode=encode, process_index=p,
                                process_count=2, progress=False)
    a = tokenize.TokenShards(str(tmp_path), "a")
    b = tokenize.TokenShards(str(tmp_path), "b")
    assert len(a) == len(b) == 6 and a.text_lengths == b.text_lengths
    for i in range(6):
        for field in tokenize.FIELDS:
            np.testing.assert_array_equal(a[i][field], b[i][field])
        assert a[i]["caption"] == clips[i]["caption"] and a[i]["index"] == i
    # a task's target decodes to the tokenizer's reconstruction of the clip
    layout, video = toolkit["layout"], toolkit["video"]
    seq = tasks.build("t2v", a[0], layout)
    codes = layout.to_video_codes(seq.target[1:-2]).reshape(a[0]["video"].shape)
    np.testing.assert_array_equal(video.decode(codes), video.decode(a[0]["video"]))
    np.testing.assert_array_equal(a[0]["video"], video.encode_batch(np.stack([clips[0]["video"], clips[1]["video"]]))[0])
    os.remove(os.path.join(out_a, tokenize.shard_name(2, 3) + ".json"))
    with pytest.raises(ValueError, match="did not finish"):
        tokenize.TokenShards(str(tmp_path), "a")
    with pytest.raises(FileNotFoundError, match="run `videolm tokenize` first"):
        tokenize.TokenShards(str(tmp_path), "test")
