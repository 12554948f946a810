"""What the Flax adapters share: when the kernels can serve a call, the masks
that stand in for them when they cannot, and rotary position embeddings.

Flax's attention functions take `[batch..., length, heads, head_dim]` inputs
(any number of batch dims, or none) and a boolean `mask` / additive `bias`
broadcastable to `[batch..., heads, q_length, kv_length]`.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax.numpy as jnp
from jax import lax

from .. import attention as _attention


def promote(query, key, value, dtype):
  """The computation dtype Flax's attention uses: `dtype`, else the inputs' promotion."""
  dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(query, key, value)
  return query.astype(dtype), key.astype(dtype), value.astype(dtype)


def flash(query, key, value, *, causal: bool, implementation, window_size=None):
  """jax_flash.flash_attention over any number of leading batch dims."""
  if query.ndim < 3:
    raise ValueError(f"attention inputs need [batch..., length, heads, head_dim], got "
                     f"query of shape {query.shape}")
  batch_shape = query.shape[:-3]
  if key.shape[:-3] != batch_shape or value.shape[:-3] != batch_shape:
    raise ValueError(f"query, key and value must share their batch dims, got "
                     f"{query.shape}, {key.shape}, {value.shape}")
  n = math.prod(batch_shape)
  fold = lambda x: x.reshape((n,) + x.shape[-3:])
  out = _attention.flash_attention(fold(query), fold(key), fold(value), causal=causal,
                                   implementation=implementation, window_size=window_size)
  return out.reshape(batch_shape + out.shape[-3:])


def _hidden_rows_as_flax(out, value, *, q_offset: int, causal: bool, window_size):
  """The kernels' out with the rows that see no key as Flax gives them.

  With more queries than keys (q_offset < 0), bottom-right aligned causal or
  window bounds hide every key from the first rows. The kernels give those rows
  0; Flax's masked softmax (scores at the dtype's minimum, not -inf) weighs every
  key alike, so they are the mean of V. The rows are known from the shapes.
  """
  right = 0 if causal else (window_size[1] if window_size is not None else None)
  if right is None or right < 0:
    return out
  rows = min(out.shape[-3], -(q_offset + right))
  if rows <= 0:
    return out
  group = out.shape[-2] // value.shape[-2]
  mean = jnp.repeat(value.astype(jnp.float32).mean(axis=-3), group, axis=-2)
  return out.at[..., :rows, :, :].set(mean[..., None, :, :].astype(out.dtype))


def repeat_kv_heads(query, key, value):
  """K/V with one head per query head, for fallbacks that do not take GQA."""
  group = query.shape[-2] // key.shape[-2]
  if group == 1:
    return key, value
  return jnp.repeat(key, group, axis=-2), jnp.repeat(value, group, axis=-2)


def window_mask(q_positions, k_positions, *, causal: bool,
                window_size: Sequence[int] | None):
  """[q, k] boolean mask: query at position p sees keys in [p - left, p + right]
  (and none after p when causal). None or -1 bounds a side by nothing."""
  qp = q_positions[:, None]
  kp = k_positions[None, :]
  visible = jnp.ones((q_positions.shape[0], k_positions.shape[0]), bool)
  left, right = window_size if window_size is not None else (-1, -1)
  if causal:
    visible &= kp <= qp
  if left is not None and left >= 0:
    visible &= kp >= qp - left
  if right is not None and right >= 0:
    visible &= kp <= qp + right
  return visible


def combine_masks(*masks):
  masks = [m for m in masks if m is not None]
  if not masks:
    return None
  out = masks[0].astype(bool)
  for m in masks[1:]:
    out = jnp.logical_and(out, m.astype(bool))
  return out


def check_window_size(window_size):
  if window_size is None:
    return None
  try:
    left, right = window_size
  except (TypeError, ValueError) as e:
    raise ValueError(f"window_size must be None or a pair (left, right), got "
                     f"{window_size!r}") from e
  for side in (left, right):
    if side is not None and (not isinstance(side, int) or side < -1):
      raise ValueError(f"window_size entries must be None, -1 or a non-negative int, "
                       f"got {window_size!r}")
  unbounded = lambda s: s is None or s == -1
  return None if unbounded(left) and unbounded(right) else (left, right)


def rotary_embedding(x, positions, *, base: float = 10000.0):
  """Rotary position embedding (rotate-half form) of x [..., length, heads, head_dim]
  at integer positions [length]; computed in float32, returned in x's dtype."""
  head_dim = x.shape[-1]
  if head_dim % 2:
    raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
  half = head_dim // 2
  inv_freq = 1.0 / (base ** (jnp.arange(half, dtype=jnp.float32) / half))
  angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [length, half]
  cos = jnp.cos(angles)[:, None, :]
  sin = jnp.sin(angles)[:, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


def fallback_reasons(*, bias, dropout_rate, deterministic, module, precision) -> list[str]:
  """What in a Flax attention call the kernels cannot do (empty: they can run it)."""
  reasons = []
  if bias is not None:
    reasons.append("a bias")
  if dropout_rate > 0.0 and not deterministic:
    reasons.append("active dropout")
  if module is not None:
    reasons.append("sown attention weights")
  if precision is not None:
    reasons.append("an explicit precision")
  return reasons


def kv_inputs(inputs_q, inputs_k, inputs_v):
  """Flax's defaults: keys from the queries' input, values from the keys'."""
  if inputs_k is None:
    if inputs_v is not None:
      raise ValueError("inputs_k cannot be None when inputs_v is given")
    inputs_k = inputs_q
  return inputs_k, inputs_k if inputs_v is None else inputs_v


def rotate_sequence(query, key, rotary_base: float | None):
  """Rotary embeddings at positions 0.. for the keys, bottom-right aligned queries."""
  if rotary_base is None:
    return query, key
  offset = key.shape[-3] - query.shape[-3]
  return (rotary_embedding(query, jnp.arange(query.shape[-3]) + offset, base=rotary_base),
          rotary_embedding(key, jnp.arange(key.shape[-3]), base=rotary_base))


def decode_step(query, key, value, cached_key, cached_value, index, mask,
                rotary_base: float | None):
  """One token of autoregressive decoding with Flax's KV cache.

  Writes this token's key/value at `index` of the [batch..., max_length, heads,
  head_dim] caches and masks the slots not written yet. Returns (query, key, value,
  mask) for attention, key/value being the updated caches.
  """
  if query.shape[-3] != 1:
    raise ValueError(f"decoding takes one token per call, got query of shape {query.shape}")
  *batch_dims, max_length, _, _ = cached_key.shape
  if rotary_base is not None:
    query = rotary_embedding(query, index[None], base=rotary_base)
    key = rotary_embedding(key, index[None], base=rotary_base)
  zero = jnp.zeros((), index.dtype)
  start = (zero,) * len(batch_dims) + (index, zero, zero)
  key = lax.dynamic_update_slice(cached_key, key, start)
  value = lax.dynamic_update_slice(cached_value, value, start)
  written = jnp.broadcast_to(jnp.arange(max_length) <= index,
                             tuple(batch_dims) + (1, 1, max_length))
  return query, key, value, combine_masks(mask, written)


def attend(query, key, value, *, mask, causal: bool, window_size, q_offset,
           fallback: Callable, fallback_reasons: list[str], implementation,
           allow_fallback: bool):
  """The kernels when nothing stands in their way, else `fallback(query, key, value, mask)`.

  causal and window_size are bottom-right aligned: query i sits at position
  q_offset + i among the keys (q_offset = kv_length - q_length unless decoding).
  """
  window_size = check_window_size(window_size)
  if causal and window_size is not None:
    window_size = (window_size[0], 0)  # causal already hides every later key
  reasons = list(fallback_reasons)
  if mask is not None:
    reasons.append("a mask")
  bottom_right = isinstance(q_offset, int) and q_offset == key.shape[-3] - query.shape[-3]
  if causal and not bottom_right:
    reasons.append("a causal mask at a run-time position (decoding)")
  if window_size is not None and not bottom_right:
    reasons.append("a sliding window at a run-time position (decoding)")
  if not reasons:
    out = flash(query, key, value, causal=causal, implementation=implementation,
                window_size=window_size)
    return _hidden_rows_as_flax(out, value, q_offset=q_offset, causal=causal,
                                window_size=window_size)
  if not allow_fallback:
    raise ValueError("jax_flash.flax: this call needs the plain attention fallback "
                     f"(it has {', '.join(reasons)}) but allow_fallback=False")
  if causal or window_size is not None:
    q_pos = jnp.arange(query.shape[-3]) + q_offset
    k_pos = jnp.arange(key.shape[-3])
    extra = window_mask(q_pos, k_pos, causal=causal, window_size=window_size)
    mask = combine_masks(mask, extra)
  return fallback(query, key, value, mask)
