"""Token shards: a dataset run once through the trained tokenizers, stored for LM training.

    videolm tokenize --config configs/tokenize.py:tiny --workdir DIR

writes under ``DIR/tokens``::

    text.model                      the sentencepiece model (trained on the train captions)
    layout.json                     the unified vocabulary layout (videolm.vocab)
    {split}/shard-00003-of-00008.array_record   records: one tokenized clip each (msgpack)
    {split}/shard-00003-of-00008.json           the shard's summary: count, caption lengths

Each record holds what ``videolm.tasks`` reads (``text``, ``video``, ``image``, ``audio``,
``control``, ``inpaint``, ``outpaint``, in tokenizer codes) plus the ``caption`` and the source
``index``. Shards are written atomically (temporary file, then rename) and a re-run skips shards
that are complete, so an interrupted run resumes. With several JAX processes, process ``p``
writes the shards ``k`` with ``k % process_count == p``; each process encodes its batches with
the batch split over its local devices.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Protocol

import grain
import jax
import numpy as np
import tqdm
from array_record.python import array_record_module
from flax import serialization

from videolm import configlib
from videolm import text as text_lib
from videolm.vocab import VocabLayout

FIELDS = ("text", "video", "image", "audio", "control", "inpaint", "outpaint")


class VideoEncoder(Protocol):
    def encode_batch(self, videos: np.ndarray) -> np.ndarray: ...  # uint8 [B, T, H, W, 3] -> int32 [B, t, h, w]


class AudioEncoder(Protocol):
    def encode(self, waveform: np.ndarray) -> np.ndarray: ...  # float32 [B, S] -> int32 [B, L, f]


# ------------------------------------------------------------------------------ masked clips


def inpaint_mask(height: int, width: int, fraction: float) -> np.ndarray:
    """bool [H, W]: True inside the central box of ``fraction`` of each side (the part to fill)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"inpaint fraction must lie in (0, 1), got {fraction}")
    mask = np.zeros((height, width), bool)
    h, w = max(1, round(height * fraction)), max(1, round(width * fraction))
    top, left = (height - h) // 2, (width - w) // 2
    mask[top:top + h, left:left + w] = True
    return mask


def outpaint_mask(height: int, width: int, border: float) -> np.ndarray:
    """bool [H, W]: True on the borders, ``border`` of each side wide (the part to fill)."""
    if not 0.0 < border < 0.5:
        raise ValueError(f"outpaint border must lie in (0, 0.5), got {border}")
    return ~inpaint_mask(height, width, 1.0 - 2.0 * border)


def apply_mask(video: np.ndarray, mask: np.ndarray, fill: int = 128) -> np.ndarray:
    """The clip uint8 [..., T, H, W, 3] with ``mask`` [H, W] painted ``fill`` in every frame."""
    out = np.array(video, copy=True)
    out[..., mask, :] = fill
    return out


# ------------------------------------------------------------------------------ encoding


def encode_batch(clips: list[Mapping[str, Any]], video_tokenizer: VideoEncoder, audio_tokenizer: AudioEncoder,
                 text_tokenizer: text_lib.TextTokenizer, *, inpaint_fraction: float, outpaint_border: float,
                 max_text_len: int, mask_fill: int = 128) -> list[dict]:
    """Tokenizes a list of clips (``video``, ``audio``, ``caption``/``text``, ``control``)."""
    videos = np.stack([np.asarray(c["video"], np.uint8) for c in clips])
    _, _, height, width, _ = videos.shape
    # One encoder call per kind of clip: the clip, its control video, its masked versions, and
    # its first frame alone (an image is a one-frame video).
    video_tokens = np.asarray(video_tokenizer.encode_batch(videos))
    image_tokens = np.asarray(video_tokenizer.encode_batch(videos[:, :1]))
    control_tokens = np.asarray(video_tokenizer.encode_batch(np.stack([np.asarray(c["control"], np.uint8) for c in clips])))
    inpaint = np.asarray(video_tokenizer.encode_batch(apply_mask(videos, inpaint_mask(height, width, inpaint_fraction), mask_fill)))
    outpaint = np.asarray(video_tokenizer.encode_batch(apply_mask(videos, outpaint_mask(height, width, outpaint_border), mask_fill)))
    audio_tokens = np.asarray(audio_tokenizer.encode(np.stack([np.asarray(c["audio"], np.float32) for c in clips])))
    records = []
    for i, clip in enumerate(clips):
        caption = str(clip.get("caption", clip.get("text", "")))
        pieces = np.asarray(text_tokenizer.encode(caption)[:max_text_len], np.int32)
        records.append({
            "text": pieces, "video": video_tokens[i].astype(np.int32), "image": image_tokens[i].astype(np.int32),
            "audio": audio_tokens[i].astype(np.int32), "control": control_tokens[i].astype(np.int32),
            "inpaint": inpaint[i].astype(np.int32), "outpaint": outpaint[i].astype(np.int32),
            "caption": caption, "index": int(clip.get("index", -1)),
        })
    return records


# ------------------------------------------------------------------------------ shards


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}"


def write_shard(path: str, records: Iterable[dict]) -> dict:
    """Writes an array_record file atomically and its JSON summary; returns the summary."""
    tmp = f"{path}.array_record.tmp"
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    lengths = []
    for record in records:
        writer.write(serialization.msgpack_serialize(record))
        lengths.append(int(len(record["text"])))
    writer.close()
    os.replace(tmp, f"{path}.array_record")
    summary = {"num_records": len(lengths), "text_lengths": lengths}
    configlib.write_json(f"{path}.json", summary)
    return summary


def _decode_record(raw: bytes) -> dict:
    record = serialization.msgpack_restore(raw)
    if isinstance(record.get("caption"), bytes):
        record["caption"] = record["caption"].decode()
    return record


class TokenShards:
    """A grain random-access source over one split's token shards (records as dicts of arrays)."""

    def __init__(self, tokens_dir: str, split: str):
        directory = os.path.join(tokens_dir, split)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"no token shards for split {split!r} in {tokens_dir} "
                                    f"(expected {directory}; run `videolm tokenize` first)")
        summaries = sorted(f for f in os.listdir(directory) if f.startswith("shard-") and f.endswith(".json"))
        if not summaries:
            raise FileNotFoundError(f"{directory} holds no complete shard")
        counts = {int(name.split("-of-")[1].split(".")[0]) for name in summaries}
        expected = counts.pop() if len(counts) == 1 else None
        if expected is None or len(summaries) != expected:
            raise ValueError(f"{directory}: {len(summaries)} complete shards of {sorted(counts) or expected}; "
                             "the tokenize run did not finish (run it again to resume)")
        self.paths = [os.path.join(directory, s[:-len(".json")] + ".array_record") for s in summaries]
        self.text_lengths: list[int] = []
        for s in summaries:
            with open(os.path.join(directory, s)) as f:
                self.text_lengths.extend(json.load(f)["text_lengths"])
        self._source = grain.sources.ArrayRecordDataSource(self.paths)
        if len(self._source) != len(self.text_lengths):
            raise ValueError(f"{directory}: shard summaries list {len(self.text_lengths)} records, "
                             f"the shards hold {len(self._source)}")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        return _decode_record(self._source[index])

    def __repr__(self) -> str:
        return f"TokenShards({len(self.paths)} shards, {len(self)} records)"


def load_layout(tokens_dir: str) -> VocabLayout:
    return VocabLayout.load(os.path.join(tokens_dir, "layout.json"))


def load_text_tokenizer(tokens_dir: str) -> text_lib.TextTokenizer:
    return text_lib.TextTokenizer.load(os.path.join(tokens_dir, "text.model"))


def tokenize_split(source, split_dir: str, *, num_shards: int, batch_size: int, encode, process_index: int = 0,
                   process_count: int = 1, progress: bool = True) -> dict:
    """Encodes ``source`` (random access) into ``num_shards`` shards, skipping complete ones.

    ``encode(list of examples) -> list of records``. Shard ``k`` covers a contiguous range of
    examples; this process writes the shards ``k % process_count == process_index``.
    """
    os.makedirs(split_dir, exist_ok=True)
    n = len(source)
    bounds = np.linspace(0, n, num_shards + 1).astype(int)
    mine = [k for k in range(num_shards) if k % process_count == process_index]
    todo = [k for k in mine if not os.path.exists(os.path.join(split_dir, shard_name(k, num_shards) + ".json"))]
    total = int(sum(bounds[k + 1] - bounds[k] for k in todo))
    bar = tqdm.tqdm(total=total, desc=os.path.basename(split_dir), disable=not progress, dynamic_ncols=True)
    for k in todo:
        records = []
        for start in range(bounds[k], bounds[k + 1], batch_size):
            stop = min(start + batch_size, bounds[k + 1])
            examples = []
            for i in range(start, stop):
                example = dict(source[i])
                example.setdefault("index", i)
                examples.append(example)
            records.extend(encode(examples))
            bar.update(stop - start)
        write_shard(os.path.join(split_dir, shard_name(k, num_shards)), records)
    bar.close()
    return {"shards": num_shards, "written": len(todo), "skipped": len(mine) - len(todo), "examples": n}


# ------------------------------------------------------------------------------ the command


def _captions(source, limit: int) -> list[str]:
    return [str(source[i].get("caption", source[i].get("text", ""))) for i in range(min(limit, len(source)))]


def run(config, workdir: str) -> dict:
    """``videolm tokenize``: text model, layout, then every split's shards (resumable)."""
    from tokenizers.magvit.api import VideoTokenizer
    from tokenizers.soundstream.api import AudioTokenizer
    from videolm.data import pipeline
    from videolm.data.soundshapes import WorldConfig

    for name in ("video_tokenizer_workdir", "audio_tokenizer_workdir"):
        if not config.get(name):
            raise ValueError(f"config.{name} is empty: expected the workdir of a trained tokenizer")
    os.makedirs(workdir, exist_ok=True)
    configlib.save_config(config, os.path.join(workdir, "config.json"))  # generate finds the tokenizers here
    data = config.data
    world = WorldConfig(**data.world.to_dict()) if data.dataset == "soundshapes" else None
    sources = {split: pipeline.make_source(data.dataset, split, data_dir=data.data_dir or None, world=world,
                                           num_examples=count)
               for split, count in data.splits.items()}
    for split, source in sources.items():
        if len(source) < data.splits[split]:
            raise ValueError(f"split {split!r} has {len(source)} examples, fewer than the {data.splits[split]} asked for")

    text_path = os.path.join(workdir, "text.model")
    if config.text.model_path:
        text_tokenizer = text_lib.TextTokenizer.load(config.text.model_path)
    elif os.path.exists(text_path):
        text_tokenizer = text_lib.TextTokenizer.load(text_path)
    else:
        text_tokenizer = text_lib.train_sentencepiece(_captions(sources["train"], config.text.num_captions),
                                                      config.text.vocab_size)
    if not os.path.exists(text_path):
        text_tokenizer.save(text_path)

    video_tokenizer = VideoTokenizer.from_workdir(config.video_tokenizer_workdir)
    audio_tokenizer = AudioTokenizer.from_workdir(config.audio_tokenizer_workdir)
    layout = VocabLayout(text_size=config.text.vocab_size, video_bits=int(video_tokenizer.codebook_bits),
                         audio_levels=int(audio_tokenizer.num_levels), audio_codes=int(audio_tokenizer.codebook_size))
    if text_tokenizer.vocab_size > layout.text_size:
        raise ValueError(f"the text model has {text_tokenizer.vocab_size} pieces, more than text.vocab_size="
                         f"{config.text.vocab_size}")
    layout_path = os.path.join(workdir, "layout.json")
    if os.path.exists(layout_path):
        VocabLayout.load(layout_path).check_matches(layout, what=f"token shards in {workdir}")
    else:
        layout.save(layout_path)

    def encode(examples):
        return encode_batch(examples, video_tokenizer, audio_tokenizer, text_tokenizer,
                            inpaint_fraction=config.masks.inpaint_fraction,
                            outpaint_border=config.masks.outpaint_border, max_text_len=config.text.max_len,
                            mask_fill=config.masks.fill)

    process_index, process_count = jax.process_index(), jax.process_count()
    summary = {"layout": layout.to_dict(), "splits": {}}
    for split, source in sources.items():
        num_shards = max(1, -(-len(source) // config.shard_size))
        summary["splits"][split] = tokenize_split(
            source, os.path.join(workdir, split), num_shards=num_shards, batch_size=config.batch_size,
            encode=encode, process_index=process_index, process_count=process_count)
    return summary
