"""Plain softmax attention: the specification every fast path is tested against.

It materializes the [seq_q, seq_k] scores, so it is for tests and small inputs only.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax


def attention_reference(query, key, value, *, causal: bool = False,
                        softmax_scale: float | None = None,
                        return_lse: bool = False, compute_dtype=None,
                        window_size=None, softcap: float | None = None,
                        alibi_slopes=None, segment_ids=None, mask=None,
                        bias=None, dropout_rate: float = 0.0,
                        dropout_mask=None):
  """Softmax attention, the way plain XLA code computes it.

  Args:
    query: [batch, seq_q, num_heads, head_dim].
    key: [batch, seq_k, num_kv_heads, head_dim], num_heads % num_kv_heads == 0;
      query head i reads key/value head i // (num_heads // num_kv_heads).
    value: [batch, seq_k, num_kv_heads, head_dim_v].
    causal: query i sees keys j <= i + seq_k - seq_q (bottom-right aligned).
    softmax_scale: defaults to 1 / sqrt(head_dim).
    return_lse: also return the log-sum-exp of the final scores.
    compute_dtype: None computes in the input dtype (matrix products accumulate
      in float32, their results and the softmax are rounded to the input
      dtype), which is the error budget the correctness rule grants a kernel.
      A dtype (e.g. float32) upcasts the inputs and computes in it.
    window_size: (left, right): query i sees keys j with
      i + seq_k - seq_q - left <= j <= i + seq_k - seq_q + right; -1 or None
      for an unbounded side.
    softcap: scores s become softcap * tanh(s / softcap).
    alibi_slopes: [num_heads] or [batch, num_heads]; adds
      -slope * |i + seq_k - seq_q - j| to the (capped) scores.
    segment_ids: (q_segment_ids [batch, seq_q], kv_segment_ids [batch, seq_k]);
      a query sees only the keys of its own segment.
    mask: boolean, broadcastable to [batch, num_heads, seq_q, seq_k]; False
      hides the key.
    bias: broadcastable to [batch, num_heads, seq_q, seq_k]; added to the
      scores after the cap and alibi.
    dropout_rate, dropout_mask: with a rate > 0, the probabilities are
      multiplied by dropout_mask [batch, num_heads, seq_q, seq_k] (True: kept)
      / (1 - dropout_rate) before they weigh the values; lse is not affected.

  Returns:
    out [batch, seq_q, num_heads, head_dim_v] in the compute dtype, and with
    return_lse also lse [batch, num_heads, seq_q] float32 (natural log). A query
    row that sees no key gives out 0 and lse -inf.
  """
  dtype = jnp.dtype(compute_dtype if compute_dtype is not None else query.dtype)
  q, k, v = (jnp.asarray(x).astype(dtype) for x in (query, key, value))
  batch, seq_q, num_heads, head_dim = q.shape
  _, seq_k, num_kv_heads, _ = k.shape
  groups = num_heads // num_kv_heads
  if softmax_scale is None:
    softmax_scale = 1.0 / math.sqrt(head_dim)
  # A float32 reference has to be exact, also on GPUs where the default float32
  # matmul precision is TF32.
  precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None

  def matmul(spec, a, b):
    return jnp.einsum(spec, a, b, precision=precision,
                      preferred_element_type=jnp.float32).astype(dtype)

  # Scores as [batch, num_heads, seq_q, seq_k].
  q = q.reshape(batch, seq_q, num_kv_heads, groups, head_dim)
  scores = matmul("bqhgd,bkhd->bhgqk", q, k) * jnp.asarray(softmax_scale, dtype)
  scores = scores.reshape(batch, num_heads, seq_q, seq_k)
  if softcap is not None:
    scores = softcap * jnp.tanh(scores / softcap)
  # Key position relative to the query's diagonal: j - (i + seq_k - seq_q).
  offset = (jnp.arange(seq_k)[None, :]
            - jnp.arange(seq_q)[:, None] - (seq_k - seq_q))
  if alibi_slopes is not None:
    slopes = jnp.asarray(alibi_slopes, jnp.float32)
    slopes = jnp.broadcast_to(slopes, (batch, num_heads))[..., None, None]
    scores = scores + (-slopes * jnp.abs(offset)).astype(dtype)
  if bias is not None:
    scores = scores + jnp.asarray(bias).astype(dtype)

  visible = jnp.ones((1, 1, seq_q, seq_k), bool)
  if causal:
    visible &= offset <= 0
  if window_size is not None:
    left, right = (-1 if w is None else w for w in window_size)
    if left >= 0:
      visible &= offset >= -left
    if right >= 0:
      visible &= offset <= right
  if segment_ids is not None:
    q_ids, kv_ids = segment_ids
    visible &= q_ids[:, None, :, None] == kv_ids[:, None, None, :]
  if mask is not None:
    visible &= jnp.asarray(mask, bool)
  scores = jnp.where(visible, scores, -jnp.inf)

  # The row max only stabilizes exp; the result does not depend on it, so no
  # gradient needs to flow through it. Rows with no visible key have max -inf.
  row_max = lax.stop_gradient(scores.max(axis=-1, keepdims=True))
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0)
  unnormalized = jnp.exp(scores - row_max)
  row_sum = unnormalized.sum(axis=-1, keepdims=True)
  empty = row_sum == 0
  safe_sum = jnp.where(empty, 1, row_sum)
  probs = unnormalized / safe_sum

  if dropout_rate:
    if dropout_mask is None:
      raise ValueError("attention_reference: dropout_rate > 0 needs dropout_mask")
    probs = jnp.where(dropout_mask, probs / (1 - dropout_rate), 0).astype(dtype)
  probs = probs.reshape(batch, num_kv_heads, groups, seq_q, seq_k)
  out = matmul("bhgqk,bkhd->bqhgd", probs, v)
  out = out.reshape(batch, seq_q, num_heads, v.shape[-1])
  if not return_lse:
    return out
  lse = jnp.where(empty, -jnp.inf, row_max + jnp.log(safe_sum))[..., 0]
  lse = lse.astype(jnp.float32).reshape(batch, num_heads, seq_q)
  return out, lse
