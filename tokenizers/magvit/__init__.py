"""MAGVIT-v2 video tokenizer: causal 3D CNN + lookup-free quantization.

``model`` (encoder/decoder), ``layers`` (causal conv, per-frame GroupNorm, adaptive GroupNorm,
depth-to-space), ``lfq`` (quantizer and entropy loss), ``discriminator``, ``losses``, ``train``
(``train(config, workdir)``), ``evaluate``, ``bench``, ``inflate`` (2D image stage -> 3D) and
``api`` (``VideoTokenizer``: encode / decode for the rest of videolm).
"""
