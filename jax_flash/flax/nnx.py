"""jax_flash for Flax NNX: an `attention_fn` for `nnx.MultiHeadAttention` and
`FlashMultiHeadAttention`, that layer (same parameters, same cache) on the kernels
with causal, sliding-window and rotary options.
"""

from __future__ import annotations

from typing import Sequence

from flax import nnx
import jax

from . import _core

Array = jax.Array


def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout: bool = True,
                 dropout_rng=None, dropout_rate: float = 0.0, deterministic: bool = False,
                 dtype=None, precision=None, module=None, is_causal: bool = False, *,
                 causal: bool = False, implementation: str | None = None,
                 allow_fallback: bool = True, promote_dtype=None):
  """Drop-in for `flax.nnx.dot_product_attention` running jax_flash's kernels.

  Use it as `nnx.MultiHeadAttention(..., attention_fn=attention_fn)`. `is_causal`
  is honoured as NNX defines it (top-left aligned: query i sees keys j <= i); the
  kernels run it when q_length == kv_length. `causal` (for functools.partial) is
  bottom-right aligned. What the kernels lack (a mask or bias, active dropout,
  sown weights, a precision, is_causal with q_length != kv_length) goes to NNX's
  own `dot_product_attention`; `allow_fallback=False` makes that an error.
  """
  del promote_dtype  # the inputs are promoted as NNX's default does
  query, key, value = _core.promote(query, key, value, dtype)
  reasons = []
  top_left = is_causal and query.shape[-3] != key.shape[-3]
  if top_left:
    reasons.append("is_causal with q_length != kv_length")
  return _attend(query, key, value, bias=bias, mask=mask,
                 broadcast_dropout=broadcast_dropout, dropout_rng=dropout_rng,
                 dropout_rate=dropout_rate, deterministic=deterministic, precision=precision,
                 module=module, causal=causal or (is_causal and not top_left),
                 top_left_causal=top_left, window_size=None,
                 q_offset=key.shape[-3] - query.shape[-3], implementation=implementation,
                 allow_fallback=allow_fallback, reasons=reasons)


def _attend(query, key, value, *, bias, mask, broadcast_dropout, dropout_rng, dropout_rate,
            deterministic, precision, module, causal, top_left_causal, window_size, q_offset,
            implementation, allow_fallback, reasons):
  reasons = list(reasons) + _core.fallback_reasons(
      bias=bias, dropout_rate=dropout_rate, deterministic=deterministic, module=module,
      precision=precision)

  def fallback(q, k, v, m):
    k, v = _core.repeat_kv_heads(q, k, v)
    return nnx.dot_product_attention(
        q, k, v, bias=bias, mask=m, broadcast_dropout=broadcast_dropout,
        dropout_rng=dropout_rng, dropout_rate=dropout_rate, deterministic=deterministic,
        dtype=q.dtype, precision=precision, module=module, is_causal=top_left_causal)

  return _core.attend(query, key, value, mask=mask, causal=causal, window_size=window_size,
                      q_offset=q_offset, fallback=fallback, fallback_reasons=reasons,
                      implementation=implementation, allow_fallback=allow_fallback)


class FlashMultiHeadAttention(nnx.MultiHeadAttention):
  """`flax.nnx.MultiHeadAttention` on jax_flash's kernels.

  Takes every argument of NNX's layer (its parameters, GQA via num_kv_heads and
  the decode cache are unchanged), plus keyword-only:
    causal: causal self-attention without a mask (bottom-right aligned).
    window_size: (left, right) sliding window; a query at position p sees keys in
      [p - left, p + right]. Runs as a mask on the fallback path for now.
    rotary / rotary_base: rotary position embeddings on queries and keys at
      positions 0.. (the cache index when decoding).
    implementation, allow_fallback: as in `attention_fn`.
  Its attention is jax_flash's `attention_fn`; another one is refused (NNX's own
  layer takes it). While decoding, the cache limits each token to the keys up to
  its position with or without `is_causal` (NNX's layer applies `is_causal`
  top-left to the one-row scores, which leaves it only the first key).
  """

  def __init__(self, *args, causal: bool = False, window_size: Sequence[int] | None = None,
               rotary: bool = False, rotary_base: float = 10000.0,
               implementation: str | None = None, allow_fallback: bool = True, **kwargs):
    if kwargs.setdefault("attention_fn", attention_fn) is not attention_fn:
      raise ValueError(
          "jax_flash.flax.nnx.FlashMultiHeadAttention runs jax_flash's attention and takes "
          "no other attention_fn (pass implementation= / allow_fallback= to the layer, or "
          "use nnx.MultiHeadAttention with that attention_fn)")
    super().__init__(*args, **kwargs)
    self.causal = causal
    self.window_size = _core.check_window_size(window_size)
    self.rotary = rotary
    self.rotary_base = rotary_base
    self.implementation = implementation
    self.allow_fallback = allow_fallback

  def __call__(self, inputs_q: Array, inputs_k: Array | None = None,
               inputs_v: Array | None = None, *, mask: Array | None = None,
               deterministic: bool | None = None, rngs=None, sow_weights: bool = False,
               decode: bool | None = None, is_causal: bool = False):
    if rngs is None:
      rngs = self.rngs
    elif isinstance(rngs, nnx.Rngs):
      rngs = rngs.dropout
    inputs_k, inputs_v = _core.kv_inputs(inputs_q, inputs_k, inputs_v)
    if inputs_q.shape[-1] != self.in_features:
      raise ValueError(f"inputs_q has {inputs_q.shape[-1]} features, the layer expects "
                       f"{self.in_features}")
    query = self.query(inputs_q)
    key = self.key(inputs_k)
    value = self.value(inputs_v)
    if self.normalize_qk:
      query = self.query_ln(query)
      key = self.key_ln(key)

    decode = decode if decode is not None else bool(self.decode)
    rotary_base = self.rotary_base if self.rotary else None
    q_offset = key.shape[-3] - query.shape[-3]
    if decode:
      if self.cached_key is None or self.cached_value is None or self.cache_index is None:
        raise ValueError("decode=True needs init_cache(...) first")
      q_offset = self.cache_index[...]
      query, key, value, mask = _core.decode_step(
          query, key, value, self.cached_key[...], self.cached_value[...], q_offset, mask,
          rotary_base)
      self.cached_key[...] = key
      self.cached_value[...] = value
      self.cache_index[...] = q_offset + 1
    else:
      query, key = _core.rotate_sequence(query, key, rotary_base)

    dropout_rng = None
    deterministic = True if self.dropout_rate == 0.0 else (
        deterministic if deterministic is not None else self.deterministic)
    if deterministic is None:
      raise ValueError("dropout_rate > 0 needs deterministic, from the call or the layer")
    if not deterministic:
      if rngs is None:
        raise ValueError("dropout needs rngs, from the call or the layer")
      dropout_rng = rngs()

    query, key, value = _core.promote(query, key, value, self.dtype)
    top_left = is_causal and query.shape[-3] != key.shape[-3] and not decode
    x = _attend(query, key, value, bias=None, mask=mask,
                broadcast_dropout=self.broadcast_dropout, dropout_rng=dropout_rng,
                dropout_rate=self.dropout_rate, deterministic=deterministic,
                precision=self.precision, module=self if sow_weights else None,
                causal=(self.causal or (is_causal and not top_left)) and not decode,
                top_left_causal=top_left, window_size=self.window_size, q_offset=q_offset,
                implementation=self.implementation, allow_fallback=self.allow_fallback,
                reasons=["is_causal with q_length != kv_length"] if top_left else [])
    return self.out(x)
