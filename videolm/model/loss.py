"""Output-only cross-entropy with the logits fused into the loss.

The vocabulary is large (about 300k ids at the paper's scale), so the [B, S, V] logits are the
biggest activation of the model. ``fused_cross_entropy`` never keeps them: it walks the sequence in
chunks, and for each chunk computes the logits, the log-sum-exp, the loss and, when differentiated,
the gradients with respect to the hidden states and the output projection right away (the loss
is a weighted sum, so its gradient is known up to the scalar cotangent). The backward pass is one
multiplication; no logits are recomputed or stored.

Weights select the tokens that count: 1 at output positions, 0 at prefix and padding (see
``masks.output_mask``). The optional z-loss ``z * lse**2`` keeps the log-normaliser near 0.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from videolm import vocab as vocab_lib


def _split_chunks(x, chunk: int):
    """[B, S, ...] -> [S // chunk, B, chunk, ...] (S padded with zeros to a multiple of chunk)."""
    b, s = x.shape[:2]
    pad = -s % chunk
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((b, (s + pad) // chunk, chunk) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _merge_chunks(x, seq_len: int):
    """Inverse of ``_split_chunks``: [n, B, chunk, ...] -> [B, seq_len, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    x = x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])
    return x[:, :seq_len]


def _chunk_logits(h, w, targets):
    logits = jnp.einsum("bcd,dv->bcv", h, w, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return logits, lse, lse - target_logit, correct


def _forward(h, w, targets, weights, z_loss, chunk, with_grads):
    seq_len = h.shape[1]
    chunk = seq_len if chunk <= 0 else min(chunk, seq_len)
    xs = (_split_chunks(h, chunk), _split_chunks(targets, chunk), _split_chunks(weights, chunk))

    def body(dw, x):
        h_c, t_c, w_c = x
        logits, lse, nll, correct = _chunk_logits(h_c, w, t_c)
        out = (nll, lse, correct)
        if with_grads:
            # d/dlogits of w_c * (lse - logit[t] + z lse^2) = w_c * (softmax * (1 + 2 z lse) - onehot(t)).
            probs = jnp.exp(logits - lse[..., None]) * (1.0 + 2.0 * z_loss * lse)[..., None]
            dlogits = (probs - jax.nn.one_hot(t_c, logits.shape[-1], dtype=probs.dtype)) * w_c[..., None]
            dlogits = dlogits.astype(h.dtype)
            dh = jnp.einsum("bcv,dv->bcd", dlogits, w, preferred_element_type=jnp.float32)
            dw = dw + jnp.einsum("bcd,bcv->dv", h_c, dlogits, preferred_element_type=jnp.float32)
            out = out + (dh.astype(h.dtype),)
        return dw, out

    dw0 = jnp.zeros(w.shape, jnp.float32) if with_grads else None
    dw, outs = jax.lax.scan(body, dw0, xs)
    nll, lse, correct = (_merge_chunks(o, seq_len) for o in outs[:3])
    total = jnp.sum(weights * (nll + z_loss * lse ** 2))
    if with_grads:
        return (total, nll, lse, correct), (_merge_chunks(outs[3], seq_len), dw.astype(w.dtype), nll + z_loss * lse ** 2)
    return total, nll, lse, correct


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused(h, w, targets, weights, z_loss, chunk):
    return _forward(h, w, targets, weights, z_loss, chunk, with_grads=False)


def _fused_fwd(h, w, targets, weights, z_loss, chunk):
    out, residuals = _forward(h, w, targets, weights, z_loss, chunk, with_grads=True)
    return out, residuals + (targets,)


def _fused_bwd(z_loss, chunk, residuals, cotangents):
    dh, dw, per_token, targets = residuals
    g = cotangents[0]  # only the weighted total is differentiated; see fused_cross_entropy
    zero_targets = jnp.zeros(targets.shape, jax.dtypes.float0)
    return (g * dh).astype(dh.dtype), (g * dw).astype(dw.dtype), zero_targets, g * per_token


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_cross_entropy(hidden, head, targets, weights, *, z_loss: float = 0.0, chunk_size: int = 0):
    """Weighted cross-entropy of ``hidden @ head`` without materialising the logits.

    Args:
      hidden: [B, S, D] final hidden states (after the last norm).
      head: [D, V] output projection.
      targets: int [B, S] next-token ids.
      weights: float [B, S] per-token weights (0 = not counted).
      z_loss: coefficient of ``lse**2``.
      chunk_size: sequence positions per chunk (0 = the whole sequence at once).

    Returns:
      ``(total, nll, lse, correct)``: ``total = sum(weights * (nll + z_loss * lse**2))`` (the only
      differentiable output); per-token nll, log-sum-exp and 0/1 correctness [B, S] (constants).
    """
    if hidden.ndim != 3 or head.ndim != 2 or hidden.shape[-1] != head.shape[0]:
        raise ValueError(f"fused_cross_entropy: hidden [B,S,D] and head [D,V] expected, got {hidden.shape}, {head.shape}")
    if targets.shape != hidden.shape[:2] or weights.shape != hidden.shape[:2]:
        raise ValueError(f"fused_cross_entropy: targets {targets.shape} and weights {weights.shape} "
                         f"must be [B, S] = {hidden.shape[:2]}")
    total, nll, lse, correct = _fused(hidden, head, targets.astype(jnp.int32), weights.astype(jnp.float32),
                                      float(z_loss), int(chunk_size))
    return total, *(jax.lax.stop_gradient(x) for x in (nll, lse, correct))


def reference_cross_entropy(hidden, head, targets, weights, *, z_loss: float = 0.0):
    """The same total computed the plain way (full logits), for tests."""
    logits = jnp.einsum("bsd,dv->bsv", hidden, head, preferred_element_type=jnp.float32,
                        precision="highest")
    lse = jax.nn.logsumexp(logits, axis=-1)
    nll = lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(weights * (nll + z_loss * lse ** 2))


def lm_loss(hidden, head, targets, weights, layout: vocab_lib.VocabLayout | None = None, *,
            z_loss: float = 0.0, chunk_size: int = 0):
    """Mean loss over the weighted (output) tokens and its metrics.

    Returns ``(loss, metrics)``; ``loss`` includes the z-loss. Metrics: ``loss``, ``nll``,
    ``accuracy``, ``z_loss``, ``tokens``, and with a layout, per target modality
    (``special``, ``text``, ``video``, ``audio``): ``{m}_nll``, ``{m}_accuracy``, ``{m}_tokens``.
    """
    total, nll, lse, correct = fused_cross_entropy(hidden, head, targets, weights, z_loss=z_loss,
                                                   chunk_size=chunk_size)
    count = jnp.sum(weights)
    denom = jnp.maximum(count, 1.0)
    loss = total / denom
    metrics = {"loss": loss, "nll": jnp.sum(weights * nll) / denom,
               "accuracy": jnp.sum(weights * correct) / denom,
               "z_loss": z_loss * jnp.sum(weights * lse ** 2) / denom, "tokens": count}
    if layout is not None:
        modality = layout.modality_of(targets, xp=jnp)
        for code, name in enumerate(vocab_lib.MODALITY_NAMES):
            w = weights * (modality == code)
            n = jnp.sum(w)
            metrics[f"{name}_nll"] = jnp.sum(w * nll) / jnp.maximum(n, 1.0)
            metrics[f"{name}_accuracy"] = jnp.sum(w * correct) / jnp.maximum(n, 1.0)
            metrics[f"{name}_tokens"] = n
    return loss, metrics
