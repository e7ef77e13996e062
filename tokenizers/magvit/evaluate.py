"""Scoring a trained video tokenizer: ``evaluate(config, workdir) -> dict``.

Over the whole evaluation split (``config.eval``), with the EMA weights by default:

* fidelity: PSNR and SSIM (mean over clips), LPIPS-VGG (mean over frames), rFVD (I3D logits of
  the originals vs the reconstructions);
* the codebook: usage (fraction of the 2^bits codes used at least once over the split),
  perplexity and entropy of the token distribution, and bits per pixel (the fixed rate
  ``tokens * bits / pixels`` and the entropy rate ``tokens * H / pixels``);
* the same for first frames encoded alone as images (``first_frame/...``), and how often the image
  tokens equal the first latent frame of the video (1.0 for a causal encoder).

With ``eval.world`` (SoundShapes only) the world evaluator reads the reconstructions back
(``videolm.eval.metrics.score_clips`` against the clips' captions): ``world/caption_exact_match``
and the attribute accuracies say whether colour, shape and motion survive tokenization;
``world/originals/...`` are the same scores of the original clips (the evaluator's own ceiling).

Writes ``eval_frames.png`` (originals above reconstructions) into the workdir when asked.
"""
from __future__ import annotations

import math
import os

import numpy as np

from tokenizers.magvit import lfq
from tokenizers.magvit.api import VideoTokenizer, load_tokenizer_params
from tokenizers.magvit.train import make_source_for
from videolm.eval import metrics


class _Scores:
    """Running sums of one family of scores (videos or first frames)."""

    def __init__(self, vocab_size: int):
        self.counts = np.zeros(vocab_size, np.int64)
        self.psnr, self.ssim, self.lpips = [], [], []
        self.real_features, self.fake_features = [], []
        self.tokens = self.pixels = 0

    def add(self, real: np.ndarray, fake: np.ndarray, tokens: np.ndarray, lpips_fn, i3d) -> None:
        for r, f in zip(real, fake):
            self.psnr.append(metrics.psnr(f, r))
            self.ssim.append(metrics.ssim(f, r))
        self.counts += np.bincount(tokens.reshape(-1), minlength=len(self.counts))
        self.tokens += tokens.size
        self.pixels += real.shape[0] * math.prod(real.shape[1:4])
        real_f = real.astype(np.float32) / 127.5 - 1.0
        fake_f = fake.astype(np.float32) / 127.5 - 1.0
        if lpips_fn is not None:
            flat = lambda v: v.reshape((-1,) + v.shape[-3:])
            self.lpips.extend(np.asarray(lpips_fn(flat(fake_f), flat(real_f))).tolist())
        if i3d is not None:
            self.real_features.append(i3d(real_f))
            self.fake_features.append(i3d(fake_f))

    def result(self, bits: int) -> dict:
        from videolm.eval import perceptual
        out = {"psnr": float(np.mean(self.psnr)), "ssim": float(np.mean(self.ssim))}
        if self.lpips:
            out["lpips"] = float(np.mean(self.lpips))
        if self.real_features:
            out["rfvd"] = perceptual.frechet_distance(np.concatenate(self.real_features),
                                                      np.concatenate(self.fake_features))
        usage = lfq.codebook_usage(self.counts)
        out.update(usage)
        out["bits_per_pixel"] = self.tokens * bits / self.pixels
        out["entropy_bits_per_pixel"] = self.tokens * usage["token_entropy_bits"] / self.pixels
        out["num_tokens"] = int(self.tokens)
        return out


def _save_frames(path: str, real: np.ndarray, fake: np.ndarray, max_clips: int = 4, every: int = 4) -> None:
    from PIL import Image
    real, fake = real[:max_clips, ::every], fake[:max_clips, ::every]
    rows = []
    for r, f in zip(real, fake):
        rows.append(np.concatenate(list(r), axis=1))
        rows.append(np.concatenate(list(f), axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def world_scores(config, real: list, fake: list, captions: list) -> dict:
    """Caption agreement of reconstructions (and of the originals) read back by the world evaluator."""
    from tokenizers.magvit.train import world_config
    world = world_config(config.data)
    out = {}
    for name, videos in (("", fake), ("originals/", real)):
        scores = metrics.score_clips(world, videos=videos, captions=captions)
        caption = {k: v for k, v in scores["caption"].items() if k != "shuffled"}
        out.update({f"world/{name}caption_{k}": v for k, v in caption.items()})
        out[f"world/{name}objects_per_clip"] = scores["objects_per_clip"]
    return out


def evaluate(config, workdir: str) -> dict:
    """Scores the run in ``workdir`` on ``config.eval.split``; returns one JSON-able dict."""
    ec = config.eval
    if ec.num_examples < 2 or ec.batch_size < 1:
        raise ValueError(f"eval.num_examples must be >= 2 and eval.batch_size >= 1, got "
                         f"{ec.num_examples}, {ec.batch_size}")
    _, params = load_tokenizer_params(workdir, use_ema=ec.use_ema, config=config)
    tok = VideoTokenizer(config.model, params)
    image_model = config.model.temporal_kernel == 1
    lpips_fn = None
    if ec.lpips:
        from videolm.eval import perceptual
        lpips_fn = perceptual.lpips_vgg()
    i3d = None
    if ec.fvd and not image_model:
        from videolm.eval import perceptual
        i3d = perceptual.i3d_features()
    source = make_source_for(config.data, ec.split, ec.num_examples)
    videos = _Scores(tok.vocab_size)
    firsts = _Scores(tok.vocab_size) if ec.first_frame and not image_model else None
    first_match = []
    world = ec.get("world", False) and not image_model and config.data.dataset == "soundshapes"
    world_real, world_fake, world_captions = [], [], []
    saved = False
    for start in range(0, len(source), ec.batch_size):
        examples = [source[i] for i in range(start, min(start + ec.batch_size, len(source)))]
        real = np.stack([e["video"] for e in examples])
        if image_model:
            real = real[:, :1]
        tokens = tok.encode_batch(real)
        fake = tok.decode_batch(tokens)
        videos.add(real, fake, tokens, lpips_fn, i3d)
        if world:
            world_real.extend(real)
            world_fake.extend(fake)
            world_captions.extend(e["text"] for e in examples)
        if firsts is not None:
            first_tokens = tok.encode_batch(real[:, :1])
            firsts.add(real[:, :1], tok.decode_batch(first_tokens), first_tokens, lpips_fn, None)
            first_match.append(np.mean(first_tokens[:, 0] == tokens[:, 0]))
        if ec.save_frames and not saved:
            _save_frames(os.path.join(workdir, "eval_frames.png"), real, fake)
            saved = True
    result = videos.result(tok.codebook_bits)
    if firsts is not None:
        result.update({f"first_frame/{k}": v for k, v in firsts.result(tok.codebook_bits).items()})
        result["first_frame/tokens_match_video"] = float(np.mean(first_match))
    if world:
        result.update(world_scores(config, world_real, world_fake, world_captions))
    result.update({"split": ec.split, "num_examples": len(source), "vocab_size": tok.vocab_size,
                   "token_shape": list(tok.token_shape(*real.shape[1:4])), "use_ema": bool(ec.use_ema)})
    from videolm import checkpoint
    with checkpoint.Checkpointer(workdir) as ckpt:
        result["step"] = int(ckpt.latest_step())
    return result
