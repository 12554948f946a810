"""jax_flash for Flax linen: an `attention_fn` for `nn.MultiHeadDotProductAttention`
and `FlashMultiHeadAttention`, the same layer (same parameter tree) with causal,
GQA, sliding-window and rotary options.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import _core

Array = jax.Array


def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout: bool = True,
                 dropout_rng=None, dropout_rate: float = 0.0, deterministic: bool = False,
                 dtype=None, precision=None, module=None,
                 force_fp32_for_softmax: bool = False, qk_attn_weights_einsum=None,
                 attn_weights_value_einsum=None, *, causal: bool = False,
                 implementation: str | None = None, allow_fallback: bool = True):
  """Drop-in for `flax.linen.dot_product_attention` running jax_flash's kernels.

  Use it as `nn.MultiHeadDotProductAttention(..., attention_fn=attention_fn)`, or
  `functools.partial(attention_fn, causal=True)` for causal self-attention without
  a mask. Inputs are `[batch..., length, heads, head_dim]`; key/value may have
  fewer heads than the query (GQA).

  Calls the kernels when the call needs nothing they lack. A `mask` or `bias`,
  active dropout (`dropout_rate > 0` and not `deterministic`), sown attention
  weights (`module`), a `precision`, or custom einsums instead go to Flax's own
  `dot_product_attention` (materializes the scores: memory quadratic in length);
  `allow_fallback=False` makes that an error. `force_fp32_for_softmax` holds on
  both paths: the kernels' softmax is fp32, and the result is float32, as Flax's
  is then. `causal` is bottom-right aligned when q_length != kv_length and
  combines with a mask; rows it leaves without a key (q_length > kv_length) are
  the mean of V, as with Flax's masks.
  """
  return _attend(query, key, value, bias=bias, mask=mask, broadcast_dropout=broadcast_dropout,
                 dropout_rng=dropout_rng, dropout_rate=dropout_rate,
                 deterministic=deterministic, dtype=dtype, precision=precision, module=module,
                 force_fp32_for_softmax=force_fp32_for_softmax,
                 qk_attn_weights_einsum=qk_attn_weights_einsum,
                 attn_weights_value_einsum=attn_weights_value_einsum, causal=causal,
                 window_size=None, q_offset=key.shape[-3] - query.shape[-3],
                 implementation=implementation, allow_fallback=allow_fallback)


def _attend(query, key, value, *, bias, mask, broadcast_dropout, dropout_rng, dropout_rate,
            deterministic, dtype, precision, module, force_fp32_for_softmax,
            qk_attn_weights_einsum, attn_weights_value_einsum, causal, window_size, q_offset,
            implementation, allow_fallback):
  """attention_fn with a sliding window and a query offset (what the module needs)."""
  query, key, value = _core.promote(query, key, value, dtype)
  reasons = _core.fallback_reasons(bias=bias, dropout_rate=dropout_rate,
                                   deterministic=deterministic, module=module,
                                   precision=precision)
  if qk_attn_weights_einsum is not None or attn_weights_value_einsum is not None:
    reasons.append("custom einsums")

  def fallback(q, k, v, m):
    k, v = _core.repeat_kv_heads(q, k, v)
    return nn.dot_product_attention(
        q, k, v, bias=bias, mask=m, broadcast_dropout=broadcast_dropout,
        dropout_rng=dropout_rng, dropout_rate=dropout_rate, deterministic=deterministic,
        dtype=q.dtype, precision=precision, module=module,
        force_fp32_for_softmax=force_fp32_for_softmax,
        qk_attn_weights_einsum=qk_attn_weights_einsum,
        attn_weights_value_einsum=attn_weights_value_einsum)

  out = _core.attend(query, key, value, mask=mask, causal=causal, window_size=window_size,
                     q_offset=q_offset, fallback=fallback, fallback_reasons=reasons,
                     implementation=implementation, allow_fallback=allow_fallback)
  # Flax's weights are float32 then, and so is their product with V.
  return out.astype(jnp.promote_types(out.dtype, jnp.float32)) if force_fp32_for_softmax else out


class FlashMultiHeadAttention(nn.Module):
  """`flax.linen.MultiHeadDotProductAttention` on jax_flash's kernels.

  Flax's fields but `attention_fn` (this layer's is jax_flash's),
  `force_fp32_for_softmax` and the custom dot_general / einsum classes; the same
  call signature and parameter tree (checkpoints load either way); plus:
    causal: causal self-attention without a mask (bottom-right aligned).
    num_kv_heads: grouped-query attention; key/value get this many heads
      (None: num_heads, which keeps Flax's parameter shapes).
    window_size: (left, right) sliding window; a query at position p sees keys in
      [p - left, p + right]. Runs as a mask on the fallback path for now.
    rotary: rotary position embeddings on queries and keys (rotary_base sets
      the frequency base), at positions 0.. (or the cache index when decoding).
    implementation, allow_fallback: as in `attention_fn`.
  `decode=True` keeps Flax's autoregressive cache ('cache' collection:
  cached_key, cached_value, cache_index).
  """

  num_heads: int
  dtype: Any = None
  param_dtype: Any = jnp.float32
  qkv_features: int | None = None
  out_features: int | None = None
  broadcast_dropout: bool = True
  dropout_rate: float = 0.0
  deterministic: bool | None = None
  precision: Any = None
  kernel_init: Callable = nn.linear.default_kernel_init
  out_kernel_init: Callable | None = None
  bias_init: Callable = nn.initializers.zeros_init()
  out_bias_init: Callable | None = None
  use_bias: bool = True
  decode: bool = False
  normalize_qk: bool = False
  causal: bool = False
  num_kv_heads: int | None = None
  window_size: Sequence[int] | None = None
  rotary: bool = False
  rotary_base: float = 10000.0
  implementation: str | None = None
  allow_fallback: bool = True

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_k: Array | None = None,
               inputs_v: Array | None = None, *, inputs_kv: Array | None = None,
               mask: Array | None = None, deterministic: bool | None = None,
               dropout_rng=None, sow_weights: bool = False):
    if inputs_kv is not None:
      if inputs_k is not None or inputs_v is not None:
        raise ValueError("pass either inputs_kv or inputs_k/inputs_v, not both")
      inputs_k = inputs_v = inputs_kv
    inputs_k, inputs_v = _core.kv_inputs(inputs_q, inputs_k, inputs_v)

    features = self.out_features or inputs_q.shape[-1]
    qkv_features = self.qkv_features or inputs_q.shape[-1]
    if qkv_features % self.num_heads:
      raise ValueError(f"qkv_features ({qkv_features}) must be divisible by num_heads "
                       f"({self.num_heads})")
    num_kv_heads = self.num_kv_heads or self.num_heads
    if self.num_heads % num_kv_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                       f"({num_kv_heads})")
    head_dim = qkv_features // self.num_heads
    dense = functools.partial(
        nn.DenseGeneral, axis=-1, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=self.kernel_init, bias_init=self.bias_init, use_bias=self.use_bias,
        precision=self.precision)
    query = dense(features=(self.num_heads, head_dim), name="query")(inputs_q)
    key = dense(features=(num_kv_heads, head_dim), name="key")(inputs_k)
    value = dense(features=(num_kv_heads, head_dim), name="value")(inputs_v)
    if self.normalize_qk:
      ln = functools.partial(nn.LayerNorm, use_bias=False, dtype=self.dtype,
                             param_dtype=self.param_dtype)
      query = ln(name="query_ln")(query)
      key = ln(name="key_ln")(key)

    rotary_base = self.rotary_base if self.rotary else None
    q_offset = key.shape[-3] - query.shape[-3]
    decoding = False
    if self.decode:
      initialized = self.has_variable("cache", "cached_key")
      cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape,
                                   value.dtype)
      cache_index = self.variable("cache", "cache_index",
                                  lambda: jnp.array(0, dtype=jnp.int32))
      if initialized:
        decoding = True
        q_offset = cache_index.value
        query, key, value, mask = _core.decode_step(
            query, key, value, cached_key.value, cached_value.value, q_offset, mask,
            rotary_base)
        cached_key.value, cached_value.value = key, value
        cache_index.value = q_offset + 1
    if not decoding:
      query, key = _core.rotate_sequence(query, key, rotary_base)

    if self.dropout_rate > 0.0:
      m_deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
      if not m_deterministic and dropout_rng is None:
        dropout_rng = self.make_rng("dropout")
    else:
      m_deterministic = True

    x = _attend(
        query, key, value, bias=None, mask=mask, dropout_rng=dropout_rng,
        dropout_rate=self.dropout_rate, broadcast_dropout=self.broadcast_dropout,
        deterministic=m_deterministic, dtype=self.dtype, precision=self.precision,
        module=self if sow_weights else None, force_fp32_for_softmax=False,
        qk_attn_weights_einsum=None, attn_weights_value_einsum=None,
        causal=self.causal and not decoding,
        window_size=self.window_size, q_offset=q_offset,
        implementation=self.implementation, allow_fallback=self.allow_fallback)
    return nn.DenseGeneral(
        features=features, axis=(-2, -1), kernel_init=self.out_kernel_init or self.kernel_init,
        bias_init=self.out_bias_init or self.bias_init, use_bias=self.use_bias,
        dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
        name="out")(x)

