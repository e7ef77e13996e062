"""Scoring a trained audio tokenizer: ``videolm eval --config configs/tokenizer_audio.py:tiny --workdir DIR``.

Every clip of the eval split is encoded and decoded with all levels; the decoded audio is compared
with the original:

* ``spectral_distance_db``: multi-scale log-mel distance (dB, -40 dB relative floor), mean over clips;
  also with only the first n levels (``spectral_distance_db_levels``, n = 1 .. levels);
* ``si_sdr_db``: scale-invariant signal-to-distortion ratio, mean over clips;
* ``pitch_error_cents``: median over (clip, frame, tone) of |cents| from each tone the original
  sounds to the nearest tone found in the decoded audio (1200 when none is found), both read by
  ``videolm.eval.audio``; ``pitch_accuracy``: share within 50 cents;
* ``onset_f1`` (precision, recall): decoded clicks against the original's, +-50 ms;
* ``codebook_usage`` / ``codebook_perplexity``: per level, over all frames of the whole split;
* ``bitrate_bps`` = levels * log2(codebook_size) * frame rate.

Spectrogram PNGs (original above, decoded below) and wavs of the first clips go to ``DIR/eval``.
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from tokenizers.soundstream import losses
from tokenizers.soundstream.api import AudioTokenizer
from tokenizers.soundstream.train import audio_source, world_config
from videolm import media
from videolm.data.pipeline import make_iterator
from videolm.eval import audio as audio_eval
from videolm.eval import metrics as world_metrics


def si_sdr_db(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Scale-invariant SDR in dB of ``estimate`` against ``reference`` (both [S], zero-mean'd)."""
    reference = reference - reference.mean()
    estimate = estimate - estimate.mean()
    scale = np.dot(estimate, reference) / max(np.dot(reference, reference), 1e-12)
    target = scale * reference
    noise = estimate - target
    return float(10.0 * np.log10(max(np.dot(target, target), 1e-12) / max(np.dot(noise, noise), 1e-12)))


def compare_audio(original: np.ndarray, decoded: np.ndarray, world) -> dict:
    """Pitch errors (cents array) and onset matches of one decoded clip against its original."""
    ref = audio_eval.analyze_audio(original, world)
    out = audio_eval.analyze_audio(decoded, world)
    expected = ref.pitches_hz.T                                     # [K, T], NaN where no tone
    cents = world_metrics.pitch_errors_cents(expected, out.pitches_hz)
    hits = len(world_metrics.match_events(list(ref.onsets), list(out.onsets),
                                          world_metrics.ONSET_TOLERANCE_SECONDS))
    return {"cents": cents[np.isfinite(cents)], "onset_tp": hits, "onset_fp": len(out.onsets) - hits,
            "onset_fn": len(ref.onsets) - hits}


def code_statistics(counts: np.ndarray) -> tuple[list[float], list[float]]:
    """Usage (share of codes used at least once) and perplexity per level from counts [L, K]."""
    usage, perplexity = [], []
    for row in counts:
        p = row / max(row.sum(), 1)
        nz = p[p > 0]
        usage.append(float(np.mean(row > 0)))
        perplexity.append(float(np.exp(-np.sum(nz * np.log(nz)))))
    return usage, perplexity


def write_spectrogram_png(path: str, original: np.ndarray, decoded: np.ndarray, sample_rate: int,
                          title: str = "") -> None:
    """Original (top) and decoded (bottom) log-magnitude spectrograms, 1024-point, in dB."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def db(x):
        spec = np.abs(np.asarray(losses.stft(jnp.asarray(x[None], jnp.float32), 1024, 128))[0])
        return 20 * np.log10(np.maximum(spec, 1e-5)).T

    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True, constrained_layout=True)
    extent = (0, len(original) / sample_rate, 0, sample_rate / 2000)
    ref = db(original)
    vmax = ref.max()
    for ax, spec, name in zip(axes, (ref, db(decoded)), ("original", "decoded")):
        im = ax.imshow(spec, origin="lower", aspect="auto", extent=extent, vmin=vmax - 80, vmax=vmax,
                       cmap="magma")
        ax.set_ylabel("kHz")
        ax.set_title(f"{name} {title}".strip())
    axes[1].set_xlabel("seconds")
    fig.colorbar(im, ax=axes, label="dB")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def evaluate(config, workdir: str) -> dict:
    """Scores the latest checkpoint in ``workdir`` on ``config.eval.split``; returns the JSON dict.

    The codec is the one the run trained (``workdir/config.json``); ``config`` gives the data and
    the eval settings."""
    tok = AudioTokenizer.from_workdir(workdir)
    world = world_config(config.data)
    e = config.eval
    source = audio_source(config.data, e.split, e.num_examples)
    batches = make_iterator(source, batch_size=min(e.batch_size, len(source)), seed=config.seed,
                            shuffle=False, num_epochs=1, drop_remainder=False)
    out_dir = os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    levels, k, rate = tok.num_levels, tok.codebook_size, tok.sample_rate
    counts = np.zeros((levels, k), np.int64)
    spectral = {n: [] for n in range(1, levels + 1)}
    sdr, cents, onset = [], [], np.zeros(3, np.int64)
    scales = tuple(config.loss.mel_scales)
    clip = 0
    for batch in batches:
        audio = np.asarray(batch["audio"], np.float32)
        codes = tok.encode(audio)                                        # [B, L, T]
        for level in range(levels):
            counts[level] += np.bincount(codes[:, level].reshape(-1), minlength=k)
        n_samples = tok.num_samples(codes.shape[-1])
        target = audio[:, :n_samples]
        decoded = {}
        for n in range(1, levels + 1):
            decoded[n] = tok.decode(codes[:, :n])
            spectral[n].extend(np.asarray(losses.spectral_distance_db(
                jnp.asarray(target), jnp.asarray(decoded[n]), sample_rate=rate, scales=scales,
                num_mels=config.loss.num_mels, floor_db=config.loss.floor_db)).tolist())
        for i in range(audio.shape[0]):
            full = np.zeros_like(audio[i])
            full[:n_samples] = decoded[levels][i]
            sdr.append(si_sdr_db(target[i], decoded[levels][i]))
            scores = compare_audio(audio[i], full, world)
            cents.append(scores["cents"])
            onset += [scores["onset_tp"], scores["onset_fp"], scores["onset_fn"]]
            if clip < e.num_spectrograms:
                write_spectrogram_png(os.path.join(out_dir, f"spectrogram_{clip:02d}.png"), target[i],
                                      decoded[levels][i], rate, title=f"clip {clip}")
                media.write_wav(os.path.join(out_dir, f"clip_{clip:02d}_original.wav"), target[i], rate)
                media.write_wav(os.path.join(out_dir, f"clip_{clip:02d}_decoded.wav"),
                                np.clip(decoded[levels][i], -1, 1), rate)
            clip += 1
    cents = np.concatenate(cents) if cents else np.zeros(0)
    tp, fp, fn = (int(v) for v in onset)
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    usage, perplexity = code_statistics(counts)
    return {
        "split": e.split,
        "num_clips": clip,
        "spectral_distance_db": float(np.mean(spectral[levels])),
        "spectral_distance_db_levels": [float(np.mean(spectral[n])) for n in range(1, levels + 1)],
        "si_sdr_db": float(np.mean(sdr)),
        "pitch_error_cents": float(np.median(cents)) if cents.size else None,
        "pitch_accuracy": float(np.mean(cents <= world_metrics.PITCH_TOLERANCE_CENTS)) if cents.size else None,
        "onset_precision": precision,
        "onset_recall": recall,
        "onset_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "codebook_usage": usage,
        "codebook_perplexity": perplexity,
        "min_codebook_usage": min(usage),
        "bitrate_bps": levels * math.log2(k) * tok.frame_rate,
        "frames_per_clip": tok.num_frames(world.num_samples),
        "step": int(_latest_step(workdir)),
    }


def _latest_step(workdir: str) -> int:
    from videolm import checkpoint
    ckpt = checkpoint.Checkpointer(workdir)
    try:
        return ckpt.latest_step() or 0
    finally:
        ckpt.close()
