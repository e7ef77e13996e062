"""Video and audio tokenizers: MAGVIT-v2 (causal 3D CNN + LFQ) and SoundStream (RVQ)."""
import videolm  # noqa: F401  (foundation settings)
