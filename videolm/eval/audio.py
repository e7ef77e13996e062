"""Reads a SoundShapes soundtrack back from its samples: the tones' pitch tracks and the clicks.

Pitch: one windowed spectrum centred on each video frame's time; the strongest spectral peaks in
the world's pitch range (up to ``max_objects`` of them, so simultaneous tones are resolved) are
refined by parabolic interpolation of the log magnitude; the share of each window's energy near
those peaks (``tonal_ratio``) measures how clean the tones are. Onsets: the clicks are short bursts
far above every tone, so the envelope of a band around the click frequency shows them as peaks.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy import signal

from videolm.data import soundshapes

WINDOW_SECONDS = 0.128
_ZERO_PAD = 4
# Half the width of a Hann window's main lobe is 2 / WINDOW_SECONDS = 15.6 Hz.
_PEAK_HALF_WIDTH_HZ = 20.0
# A spectral peak counts as a tone when its amplitude is at least this fraction of the frame's
# strongest peak, at least _MIN_AMPLITUDE (full scale = 1) and well above the frame's noise floor.
_RELATIVE_PEAK = 0.2
_MIN_AMPLITUDE = 0.02
_FLOOR_FACTOR = 8.0
_ENVELOPE_SECONDS = 0.002
_MIN_ONSET_GAP_SECONDS = 0.06
_MIN_ONSET_LEVEL = 0.05
_ONSET_FLOOR_FACTOR = 4.0


@dataclasses.dataclass
class AudioAnalysis:
    frame_times: np.ndarray   # float [T] seconds: centres of the analysis windows (video frame times)
    pitches_hz: np.ndarray    # float32 [T, K] detected tone frequencies, ascending, NaN-padded
    amplitudes: np.ndarray    # float32 [T, K] their amplitudes (a full-scale sine has 1)
    onsets: np.ndarray        # float [M] click times in seconds
    tonal_ratio: float        # share of the windows' energy within the detected tones' peaks

    @property
    def num_tones(self) -> np.ndarray:
        return np.isfinite(self.pitches_hz).sum(-1)


def _check_audio(audio) -> np.ndarray:
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f'audio must be mono [S], got shape {audio.shape}')
    if not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(f'audio must be float in [-1, 1], got {audio.dtype}')
    if not np.all(np.isfinite(audio)):
        raise ValueError('audio has NaN or inf samples')
    return audio.astype(np.float64)


def analyze_audio(audio: np.ndarray, config: soundshapes.WorldConfig) -> AudioAnalysis:
    """Pitch tracks at the video frame times and click onsets of a float [S] soundtrack."""
    audio = _check_audio(audio)
    frame_times = np.arange(config.num_frames) / config.fps
    pitches, amplitudes, tonal_ratio = pitch_tracks(audio, config, frame_times)
    return AudioAnalysis(frame_times, pitches, amplitudes, detect_onsets(audio, config), tonal_ratio)


def pitch_tracks(audio: np.ndarray, config: soundshapes.WorldConfig, times: np.ndarray):
    """(pitches_hz, amplitudes, tonal_ratio): float32 [len(times), max_objects] each, NaN where no
    tone, and the share of the windows' energy within +-_PEAK_HALF_WIDTH_HZ of the detected tones."""
    rate = config.sample_rate
    size = int(round(WINDOW_SECONDS * rate)) | 1
    half = size // 2
    window = np.hanning(size)
    padded = np.pad(audio, (half, half))
    starts = np.round(np.asarray(times) * rate).astype(int)
    starts = np.clip(starts, 0, len(audio))
    frames = np.stack([padded[s:s + size] for s in starts]) * window
    nfft = 1 << int(np.ceil(np.log2(size * _ZERO_PAD)))
    magnitude = np.abs(np.fft.rfft(frames, nfft)) * (2.0 / window.sum())   # sine amplitude units
    freqs = np.fft.rfftfreq(nfft, 1.0 / rate)

    low = 0.8 * min(soundshapes.shape_pitch_hz(config, s, config.height) for s in config.shapes)
    high = min(1.25 * config.max_pitch_hz, 0.45 * rate)
    band = np.flatnonzero((freqs >= low) & (freqs <= high))
    k = config.max_objects
    power = magnitude ** 2
    tonal = np.zeros_like(power, bool)
    out_hz = np.full((len(times), k), np.nan, np.float32)
    out_amp = np.full((len(times), k), np.nan, np.float32)
    for t, spectrum in enumerate(magnitude):
        floor = np.median(spectrum[band])
        peaks, _ = signal.find_peaks(spectrum[band])
        if len(peaks) == 0:
            continue
        peaks = band[peaks]
        strongest = spectrum[peaks].max()
        keep = peaks[(spectrum[peaks] >= max(_RELATIVE_PEAK * strongest, _MIN_AMPLITUDE,
                                             _FLOOR_FACTOR * floor))]
        keep = keep[np.argsort(spectrum[keep])[::-1][:k]]
        found = sorted(_refine(spectrum, freqs, p) for p in keep)
        for j, (hz, amp) in enumerate(found):
            out_hz[t, j], out_amp[t, j] = hz, amp
            tonal[t] |= np.abs(freqs - hz) <= _PEAK_HALF_WIDTH_HZ
    total = power.sum()
    tonal_ratio = float(power[tonal].sum() / total) if total > 0 else 0.0
    return out_hz, out_amp, tonal_ratio


def _refine(spectrum, freqs, peak):
    """Parabolic interpolation of the log magnitude around a peak bin: (Hz, amplitude)."""
    a, b, c = np.log(spectrum[peak - 1:peak + 2] + 1e-12)
    denom = a - 2 * b + c
    offset = 0.0 if denom == 0 else float(np.clip(0.5 * (a - c) / denom, -0.5, 0.5))
    step = freqs[1] - freqs[0]
    return freqs[peak] + offset * step, float(np.exp(b - 0.25 * (a - c) * offset))


def detect_onsets(audio: np.ndarray, config: soundshapes.WorldConfig) -> np.ndarray:
    """Click times (seconds): peaks of the RMS envelope in the clicks' band (tones lie far below),
    timed at the envelope's half-height rise."""
    rate = config.sample_rate
    low = max(1.5 * config.max_pitch_hz, 0.8 * config.click_hz)
    high = min(1.2 * config.click_hz, 0.49 * rate)
    sos = signal.butter(4, (low, high), 'bandpass', fs=rate, output='sos')
    high = signal.sosfilt(sos, audio)
    length = max(1, int(_ENVELOPE_SECONDS * rate))
    envelope = np.sqrt(np.convolve(high ** 2, np.ones(length) / length, mode='same'))
    level = max(_MIN_ONSET_LEVEL, _ONSET_FLOOR_FACTOR * float(np.median(envelope)))
    peaks, _ = signal.find_peaks(envelope, height=level,
                                 distance=max(1, int(_MIN_ONSET_GAP_SECONDS * rate)))
    onsets = []
    for p in peaks:
        start = p
        while start > 0 and envelope[start - 1] >= 0.5 * envelope[p]:
            start -= 1
        onsets.append(start / rate)
    return np.array(onsets)
