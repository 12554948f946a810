"""The portable path: tiled attention in plain JAX, linear memory on any backend.

Same interface as `_cuda.forward`/`_cuda.backward` (plus block sizes). Queries and
keys are cut into blocks; one loop step holds one [block_q, block_k] tile of
scores, in float32, so nothing ever holds [seq_q, seq_k]. The forward pass runs an
online softmax over the key blocks of each query block; the backward pass
recomputes each tile's probabilities from the saved log-sum-exp (FlashAttention-2:
an outer loop over key blocks, an inner one over query blocks, dq accumulated).
Causal attention visits only the tiles on or below the diagonal.

Inside, heads are laid out as [batch, kv_heads, groups, seq, head_dim]: the query
heads that share a key/value head form the `groups` axis, so MQA/GQA read each
key/value head once instead of repeating it.
"""

from __future__ import annotations

import dataclasses
import functools
import operator

import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32
# Block sizes are rounded to this many rows so matrix-unit tiles stay full.
_BLOCK_ALIGN = 8


def _blocking(length: int, block: int) -> tuple[int, int]:
  """(number of blocks, rows per block) to cover `length` rows.

  Blocks are of near-equal size rather than `block` each, so padding stays
  below one alignment unit per block (1025 rows: 3 x 344, not 3 x 512).
  """
  num_blocks = -(-length // block)
  size = -(-length // num_blocks)
  if num_blocks > 1:
    size = -(-size // _BLOCK_ALIGN) * _BLOCK_ALIGN
  return num_blocks, size


@dataclasses.dataclass(frozen=True)
class _Tiling:
  """Which query and key blocks exist, and which query/key pairs are visible."""
  seq_q: int
  seq_k: int
  num_q: int
  block_q: int
  num_k: int
  block_k: int
  causal: bool
  softmax_scale: float

  @classmethod
  def make(cls, seq_q, seq_k, *, block_q, block_k, causal, softmax_scale):
    return cls(seq_q, seq_k, *_blocking(seq_q, block_q),
               *_blocking(seq_k, block_k), causal, softmax_scale)

  @property
  def diagonal(self) -> int:
    """Causal query i sees keys j <= i + diagonal (bottom-right aligned)."""
    return self.seq_k - self.seq_q

  def key_blocks_end(self, i):
    """Key blocks [0, end) hold every key that query block i sees."""
    if not self.causal:
      return self.num_k
    last_key = (i + 1) * self.block_q - 1 + self.diagonal
    return jnp.clip(last_key // self.block_k + 1, 0, self.num_k)

  def query_blocks_start(self, j):
    """Query blocks [start, num_q) hold every query that sees key block j."""
    if not self.causal:
      return 0
    first_query = j * self.block_k - self.diagonal
    return jnp.clip(first_query // self.block_q, 0, self.num_q)

  def scores(self, q, k, i, j):
    """Scaled scores of query block i against key block j, float32.

    q [b, hk, g, block_q, d], k [b, hk, block_k, d] -> [b, hk, g, block_q,
    block_k], -inf where the key is not visible (causal, or padding).
    """
    s = jnp.einsum("bhgqd,bhkd->bhgqk", q, k,
                   preferred_element_type=_F32) * self.softmax_scale
    query_pos = i * self.block_q + jnp.arange(self.block_q)[:, None]
    key_pos = j * self.block_k + jnp.arange(self.block_k)[None, :]
    visible = []
    if self.num_q * self.block_q != self.seq_q:
      visible.append(query_pos < self.seq_q)
    if self.num_k * self.block_k != self.seq_k:
      visible.append(key_pos < self.seq_k)
    if self.causal:
      visible.append(key_pos <= query_pos + self.diagonal)
    if not visible:
      return s
    return jnp.where(functools.reduce(operator.and_, visible), s, -jnp.inf)


def _zero_of(*inputs):
  """A float32 scalar 0 that depends on every input.

  Inside shard_map a loop carry must keep its type, which includes the mesh axes
  it varies over. A carry started from a constant is invariant while the body's
  results vary with the inputs; adding this zero gives it the inputs' type. The
  empty sums are exact zeros, whatever the inputs hold.
  """
  return sum(x.ravel()[:0].sum(dtype=_F32) for x in inputs)


def _group_heads(x, num_kv_heads: int):
  """[b, s, h, d] -> [b, kv_heads, groups, s, d]."""
  b, s, h, d = x.shape
  x = x.reshape(b, s, num_kv_heads, h // num_kv_heads, d)
  return x.transpose(0, 2, 3, 1, 4)


def _ungroup_heads(x):
  """[b, kv_heads, groups, s, d] -> [b, s, h, d]."""
  b, hk, g, s, d = x.shape
  return x.transpose(0, 3, 1, 2, 4).reshape(b, s, hk * g, d)


def _split(x, num_blocks: int, size: int):
  """[..., seq, d] -> [num_blocks, ..., size, d], zero-padded at the end."""
  pad = [(0, 0)] * x.ndim
  pad[-2] = (0, num_blocks * size - x.shape[-2])
  x = jnp.pad(x, pad)
  x = x.reshape(*x.shape[:-2], num_blocks, size, x.shape[-1])
  return jnp.moveaxis(x, -3, 0)


def _merge(x, length: int):
  """[num_blocks, ..., size, d] -> [..., length, d]."""
  x = jnp.moveaxis(x, 0, -3)
  *lead, num_blocks, size, d = x.shape
  x = x.reshape(*lead, num_blocks * size, d)
  return x[..., :length, :]


def _keys_first(x):
  """[b, seq_k, kv_heads, d] -> [b, kv_heads, seq_k, d]."""
  return x.transpose(0, 2, 1, 3)


def forward(q, k, v, *, softmax_scale: float, causal: bool,
            block_k: int = 512, block_q: int = 512):
  """out [b, sq, h, d] (dtype of q), lse [b, h, sq] float32."""
  batch, seq_q, num_heads, _ = q.shape
  seq_k, num_kv_heads = k.shape[1], k.shape[2]
  t = _Tiling.make(seq_q, seq_k, block_q=block_q, block_k=block_k,
                   causal=causal, softmax_scale=softmax_scale)
  q_blocks = _split(_group_heads(q, num_kv_heads), t.num_q, t.block_q)
  k_blocks, v_blocks = (_split(_keys_first(x), t.num_k, t.block_k)
                        for x in (k, v))
  zero = _zero_of(q, k, v)

  def query_block(args):
    q_i, i = args
    rows = q_i.shape[:-1]

    def key_block(j, carry):
      row_max, row_sum, acc = carry
      s = t.scores(q_i, k_blocks[j], i, j)
      new_max = jnp.maximum(row_max, s.max(axis=-1))
      # A row that has seen no visible key yet has max -inf; subtracting it
      # would give exp(-inf - -inf) = NaN, subtracting 0 gives the wanted 0s.
      safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0)
      p = jnp.exp(s - safe_max[..., None])
      rescale = jnp.exp(row_max - safe_max)
      row_sum = row_sum * rescale + p.sum(axis=-1)
      acc = acc * rescale[..., None] + jnp.einsum(
          "bhgqk,bhkd->bhgqd", p.astype(v.dtype), v_blocks[j],
          preferred_element_type=_F32)
      return new_max, row_sum, acc

    init = (jnp.full(rows, -jnp.inf, _F32) + zero, jnp.zeros(rows, _F32) + zero,
            jnp.zeros(q_i.shape, _F32) + zero)
    row_max, row_sum, acc = lax.fori_loop(0, t.key_blocks_end(i), key_block,
                                          init)
    # A row that sees a key has row_sum >= 1 (its max contributes exp(0)).
    empty = row_sum == 0
    safe_sum = jnp.where(empty, 1, row_sum)
    lse = jnp.where(empty, -jnp.inf, row_max + jnp.log(safe_sum))
    return (acc / safe_sum[..., None]).astype(q.dtype), lse

  out, lse = lax.map(query_block, (q_blocks, jnp.arange(t.num_q)))
  out = _ungroup_heads(_merge(out, seq_q))
  lse = _merge(lse[..., None], seq_q)[..., 0]
  return out, lse.reshape(batch, num_heads, seq_q)


def backward(q, k, v, out, lse, dout, dlse, *, softmax_scale: float,
             causal: bool, deterministic: bool = False, block_k: int = 512,
             block_q: int = 512):
  """dq, dk, dv with the shapes and dtypes of q, k, v.

  Always deterministic (every sum has a fixed order), whatever `deterministic`
  says.
  """
  del deterministic
  seq_q, seq_k, num_kv_heads = q.shape[1], k.shape[1], k.shape[2]
  t = _Tiling.make(seq_q, seq_k, block_q=block_q, block_k=block_k,
                   causal=causal, softmax_scale=softmax_scale)
  q_blocks, dout_blocks = (
      _split(_group_heads(x, num_kv_heads), t.num_q, t.block_q)
      for x in (q, dout))
  k_blocks, v_blocks = (_split(_keys_first(x), t.num_k, t.block_k)
                        for x in (k, v))

  # dS = P * (dP - D) with D = rowsum(dO * O); lse's cotangent enters with the
  # opposite sign because d lse / d s = P.
  delta = jnp.einsum("bqhd,bqhd->bhq", dout.astype(_F32), out.astype(_F32))
  delta = delta - dlse.astype(_F32)
  # Rows with no visible key have lse -inf and only -inf scores: any finite
  # stand-in gives P = exp(-inf) = 0 there instead of NaN.
  lse = lse.astype(_F32)
  safe_lse = jnp.where(jnp.isfinite(lse), lse, 0)
  row_blocks = lambda x: _split(
      _group_heads(x.transpose(0, 2, 1)[..., None], num_kv_heads),
      t.num_q, t.block_q)[..., 0]
  lse_blocks, delta_blocks = row_blocks(safe_lse), row_blocks(delta)
  zero = _zero_of(q, k, v, out, lse, dout, dlse)

  def key_block(dq, args):
    k_j, v_j, j = args

    def query_block(i, carry):
      dq, dk, dv = carry
      q_i, dout_i = q_blocks[i], dout_blocks[i]
      p = jnp.exp(t.scores(q_i, k_j, i, j) - lse_blocks[i][..., None])
      dv = dv + jnp.einsum("bhgqk,bhgqd->bhkd", p.astype(v.dtype), dout_i,
                           preferred_element_type=_F32)
      dp = jnp.einsum("bhgqd,bhkd->bhgqk", dout_i, v_j,
                      preferred_element_type=_F32)
      ds = p * (dp - delta_blocks[i][..., None]) * softmax_scale
      ds = ds.astype(q.dtype)
      dk = dk + jnp.einsum("bhgqk,bhgqd->bhkd", ds, q_i,
                           preferred_element_type=_F32)
      dq_i = lax.dynamic_index_in_dim(dq, i, keepdims=False) + jnp.einsum(
          "bhgqk,bhkd->bhgqd", ds, k_j, preferred_element_type=_F32)
      return lax.dynamic_update_index_in_dim(dq, dq_i, i, 0), dk, dv

    zeros = jnp.zeros(k_j.shape, _F32) + zero
    dq, dk, dv = lax.fori_loop(t.query_blocks_start(j), t.num_q, query_block,
                               (dq, zeros, zeros))
    return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

  dq, (dk, dv) = lax.scan(key_block, jnp.zeros(q_blocks.shape, _F32) + zero,
                          (k_blocks, v_blocks, jnp.arange(t.num_k)))
  dq = _ungroup_heads(_merge(dq, seq_q)).astype(q.dtype)
  dk, dv = (_keys_first(_merge(x, seq_k)) for x in (dk, dv))
  return dq, dk, dv
