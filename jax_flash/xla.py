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

Variants (`variants.Variant`) change each tile's scores (soft cap, ALiBi, bias),
which pairs are visible (window, segments, mask) and which probabilities weigh
the values (dropout, regenerated per tile in the backward pass). A window
narrows the loops to the key blocks it reaches, so its cost is linear in the
sequence length; with segment ids, a tile whose query and key segments cannot
meet is skipped.
"""

from __future__ import annotations

import dataclasses
import functools
import operator

import jax
import jax.numpy as jnp
from jax import lax

from jax_flash import dropout
from jax_flash.variants import UNBOUNDED, Variant

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
  variant: Variant
  # Index of the first query and key in the attention this call is a shard
  # of (`variants.Frame`); int32 scalars, (0, 0) without a frame.
  origin: tuple = (0, 0)

  @classmethod
  def make(cls, seq_q, seq_k, *, block_q, block_k, causal, softmax_scale,
           variant, extras=None):
    origin = (0, 0)
    if variant.frame:
      origin = (extras["origin"][2], extras["origin"][3])
    return cls(seq_q, seq_k, *_blocking(seq_q, block_q),
               *_blocking(seq_k, block_k), causal, softmax_scale, variant,
               origin)

  @property
  def diagonal(self):
    """Query i's diagonal key is i + diagonal (bottom-right aligned in the
    whole attention; in a shard, counted from its own first key)."""
    if not self.variant.frame:
      return self.seq_k - self.seq_q
    return self.origin[0] + self.variant.frame.diagonal - self.origin[1]

  @property
  def left(self) -> int:
    """Keys before the diagonal a query sees (UNBOUNDED: all)."""
    return self.variant.window[0]

  @property
  def right(self) -> int:
    """Keys after the diagonal a query sees (UNBOUNDED: all)."""
    return 0 if self.causal else self.variant.window[1]

  def key_blocks(self, i):
    """Key blocks [start, end) hold every key that query block i sees."""
    start, end = 0, self.num_k
    if self.left != UNBOUNDED:
      first_key = i * self.block_q + self.diagonal - self.left
      start = jnp.clip(first_key // self.block_k, 0, self.num_k)
    if self.right != UNBOUNDED:
      last_key = (i + 1) * self.block_q - 1 + self.diagonal + self.right
      end = jnp.clip(last_key // self.block_k + 1, 0, self.num_k)
    return start, end

  def query_blocks(self, j):
    """Query blocks [start, end) hold every query that sees key block j."""
    start, end = 0, self.num_q
    if self.right != UNBOUNDED:
      first_query = j * self.block_k - self.diagonal - self.right
      start = jnp.clip(first_query // self.block_q, 0, self.num_q)
    if self.left != UNBOUNDED:
      last_query = (j + 1) * self.block_k - 1 - self.diagonal + self.left
      end = jnp.clip(last_query // self.block_q + 1, 0, self.num_q)
    return start, end

  def positions(self, i, j):
    """Query positions [block_q, 1] of block i and key positions [1, block_k]
    of block j, within this call."""
    return (i * self.block_q + jnp.arange(self.block_q)[:, None],
            j * self.block_k + jnp.arange(self.block_k)[None, :])

  def global_positions(self, i, j):
    """`positions` in the attention this call is a shard of."""
    query_pos, key_pos = self.positions(i, j)
    return query_pos + self.origin[0], key_pos + self.origin[1]

  def offsets(self, i, j):
    """[block_q, block_k] key position minus the query's diagonal position."""
    query_pos, key_pos = self.positions(i, j)
    return key_pos - query_pos - self.diagonal

  def scores(self, q, k, i, j, extras):
    """Final scores of query block i against key block j, float32, and the
    derivative of the soft cap (None without one).

    q [b, hk, g, block_q, d], k [b, hk, block_k, d] -> [b, hk, g, block_q,
    block_k], -inf where the key is not visible.
    """
    s = jnp.einsum("bhgqd,bhkd->bhgqk", q, k,
                   preferred_element_type=_F32) * self.softmax_scale
    cap_slope = None
    if self.variant.softcap:
      capped = jnp.tanh(s / self.variant.softcap)
      s = self.variant.softcap * capped
      cap_slope = 1 - capped * capped
    query_pos, key_pos = self.positions(i, j)
    offset = key_pos - query_pos - self.diagonal
    if self.variant.alibi:
      s = s - extras.slopes * jnp.abs(offset).astype(_F32)
    if self.variant.bias:
      s = s + extras.bias.tile(i, j)
    visible = []
    if self.num_q * self.block_q != self.seq_q:
      visible.append(query_pos < self.seq_q)
    if self.num_k * self.block_k != self.seq_k:
      visible.append(key_pos < self.seq_k)
    if self.left != UNBOUNDED:
      visible.append(offset >= -self.left)
    if self.right != UNBOUNDED:
      visible.append(offset <= self.right)
    if self.variant.segments:
      visible.append(extras.q_ids[i][:, None, None, :, None]
                     == extras.kv_ids[j][:, None, None, None, :])
    if self.variant.mask:
      visible.append(extras.mask.tile(i, j))
    if self.variant.block_size:
      visible.append(extras.block_tile(i, j))
    if visible:
      s = jnp.where(functools.reduce(operator.and_, visible), s, -jnp.inf)
    return s, cap_slope


class _Dense:
  """A mask or bias broadcastable to [batch, heads, seq_q, seq_k], kept at its
  own size as [batch', kv_heads', groups', seq_q', seq_k'] (primed: 1 or full)
  and read one tile at a time."""

  def __init__(self, x, t: _Tiling, num_kv_heads: int, fill):
    self.shape = x.shape
    x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    b, h, sq, sk = x.shape
    groups = h // num_kv_heads if h > 1 else 1
    x = x.reshape(b, h // groups, groups, sq, sk)
    self.unpadded = x.shape
    self.full_q, self.full_k = sq > 1, sk > 1
    pad = [(0, 0)] * 3 + [(0, t.num_q * t.block_q - sq if self.full_q else 0),
                          (0, t.num_k * t.block_k - sk if self.full_k else 0)]
    self.x = jnp.pad(x, pad, constant_values=fill)
    self.t = t

  def _window(self, i, j):
    starts = [0, 0, 0, i * self.t.block_q if self.full_q else 0,
              j * self.t.block_k if self.full_k else 0]
    sizes = list(self.x.shape[:3]) + [self.t.block_q if self.full_q else 1,
                                      self.t.block_k if self.full_k else 1]
    return starts, sizes

  def tile(self, i, j):
    starts, sizes = self._window(i, j)
    return lax.dynamic_slice(self.x, starts, sizes)

  def add_to_tile(self, acc, i, j, ds):
    """acc (shaped like the padded array) plus ds [b, hk, g, bq, bk] summed
    down to this array's broadcast dims, at tile (i, j)."""
    starts, sizes = self._window(i, j)
    axes = tuple(a for a in range(5) if sizes[a] == 1 and ds.shape[a] > 1)
    ds = ds.sum(axis=axes, keepdims=True)
    return lax.dynamic_update_slice(
        acc, lax.dynamic_slice(acc, starts, sizes) + ds, starts)

  def unpad(self, x):
    """An array laid out like the padded one, in the original shape."""
    return x[..., :self.unpadded[3], :self.unpadded[4]].reshape(self.shape)


class _Extras:
  """The variant's arrays, laid out for the tiles of `t`."""

  def __init__(self, extras: dict, t: _Tiling, batch: int, num_heads: int,
               num_kv_heads: int):
    v = t.variant
    groups = num_heads // num_kv_heads
    if v.alibi:
      slopes = extras["alibi_slopes"].astype(_F32)
      self.slopes_shape = slopes.shape
      slopes = slopes.reshape(-1, num_kv_heads, groups)
      self.slopes = slopes[..., None, None]
    if v.segments:
      # Edge padding keeps each block's id range that of its real rows.
      def blocks(ids, num, size):
        ids = jnp.pad(ids, [(0, 0), (0, num * size - ids.shape[1])], mode="edge")
        return jnp.moveaxis(ids.reshape(batch, num, size), 1, 0)
      self.q_ids = blocks(extras["q_segment_ids"], t.num_q, t.block_q)
      self.kv_ids = blocks(extras["kv_segment_ids"], t.num_k, t.block_k)
    if v.mask:
      self.mask = _Dense(extras["mask"].astype(bool), t, num_kv_heads, False)
    if v.bias:
      self.bias = _Dense(extras["bias"].astype(_F32), t, num_kv_heads, 0.0)
    if v.block_size:
      blocks = extras["block_mask"]
      b, h, nq, nk = blocks.shape
      mask_groups = h // num_kv_heads if h > 1 else 1
      self.blocks = blocks.reshape(b, h // mask_groups, mask_groups, nq, nk)
      # Tile (i, j) runs when some block it overlaps is on, for some batch
      # row and head: cover[i, r] says whether tile i overlaps block r.
      # (From iota, not NumPy: a partitioned op may close over no constants.)
      def cover(num, size, num_blocks, block):
        start = jnp.arange(num)[:, None] * size
        first = jnp.arange(num_blocks)[None, :] * block
        return ((first < start + size) & (first + block > start)).astype(jnp.int32)
      bq, bk = v.block_size
      on = blocks.any(axis=(0, 1)).astype(jnp.int32)
      self.tiles_on = (cover(t.num_q, t.block_q, nq, bq) @ on
                       @ cover(t.num_k, t.block_k, nk, bk).T) > 0
    if v.dropout_rate:
      self.dropout_seed = extras["dropout_seed"]
      # batch * num_heads + head of every [b, hk, g] position, counted in the
      # attention this call is a shard of.
      batch_ids, head_ids, all_heads = jnp.arange(batch), jnp.arange(num_heads), num_heads
      if v.frame:
        batch_ids = batch_ids + extras["origin"][0]
        head_ids = head_ids + extras["origin"][1]
        all_heads = v.frame.num_heads
      self.bh = (batch_ids[:, None, None] * all_heads
                 + head_ids.reshape(num_kv_heads, groups))[..., None, None]
    self.t = t

  def dropout_scale(self, i, j):
    """[b, hk, g, bq, bk]: 1 / (1 - rate) where query block i's probability for
    key block j is kept, 0 where it is dropped (see `dropout`)."""
    rate = self.t.variant.dropout_rate
    kept = dropout.keep(self.dropout_seed, rate, self.bh,
                        *self.t.global_positions(i, j))
    return jnp.where(kept, _F32(1 / (1 - rate)), _F32(0))

  def tiles_meet(self, i, j):
    """False when no query of block i shares a segment with a key of block j
    (for some batch row they may, the tile runs)."""
    q, k = self.q_ids[i], self.kv_ids[j]
    return jnp.any((q.min(axis=1) <= k.max(axis=1))
                   & (k.min(axis=1) <= q.max(axis=1)))

  def block_tile(self, i, j):
    """[b', hk', g', block_q, block_k]: whether the block-sparse mask has the
    block of each query of tile i and key of tile j on."""
    t, (bq, bk) = self.t, self.t.variant.block_size
    nq, nk = self.blocks.shape[-2:]
    query_pos, key_pos = t.positions(i, j)
    rows = jnp.minimum(query_pos[:, 0] // bq, nq - 1)
    cols = jnp.minimum(key_pos[0] // bk, nk - 1)
    return self.blocks[..., rows[:, None], cols[None, :]]

  def tile_runs(self, i, j):
    """Whether tile (i, j) can hold a visible pair beyond the window's bounds
    (segments that can meet, a block that is on); None: always."""
    v, conditions = self.t.variant, []
    if v.segments:
      conditions.append(self.tiles_meet(i, j))
    if v.block_size:
      conditions.append(self.tiles_on[i, j])
    return functools.reduce(operator.and_, conditions) if conditions else None


def _skip_unless(condition, compute, carry):
  """compute(carry) where condition holds, else carry (None: always)."""
  if condition is None:
    return compute(carry)
  return lax.cond(condition, compute, lambda c: c, carry)


def zero_of(*inputs):
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


def forward(q, k, v, extras=None, *, softmax_scale: float, causal: bool,
            variant: Variant = Variant(), block_k: int = 512,
            block_q: int = 512):
  """out [b, sq, h, dv] (dtype of q), lse [b, h, sq] float32.

  extras: the variant's arrays by name (`variants.ARRAY_NAMES`).
  """
  batch, seq_q, num_heads, _ = q.shape
  seq_k, num_kv_heads = k.shape[1], k.shape[2]
  extras = extras or {}
  t = _Tiling.make(seq_q, seq_k, block_q=block_q, block_k=block_k,
                   causal=causal, softmax_scale=softmax_scale, variant=variant,
                   extras=extras)
  ex = _Extras(extras, t, batch, num_heads, num_kv_heads)
  q_blocks = _split(_group_heads(q, num_kv_heads), t.num_q, t.block_q)
  k_blocks, v_blocks = (_split(_keys_first(x), t.num_k, t.block_k)
                        for x in (k, v))
  zero = zero_of(q, k, v, *jax.tree.leaves(extras))

  def query_block(args):
    q_i, i = args
    rows = q_i.shape[:-1]

    def key_block(j, carry):
      def update(carry):
        row_max, row_sum, acc = carry
        s, _ = t.scores(q_i, k_blocks[j], i, j, ex)
        new_max = jnp.maximum(row_max, s.max(axis=-1))
        # A row that has seen no visible key yet has max -inf; subtracting it
        # would give exp(-inf - -inf) = NaN, subtracting 0 gives the wanted 0s.
        safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0)
        p = jnp.exp(s - safe_max[..., None])
        rescale = jnp.exp(row_max - safe_max)
        row_sum = row_sum * rescale + p.sum(axis=-1)
        if variant.dropout_rate:
          p = p * ex.dropout_scale(i, j)
        acc = acc * rescale[..., None] + jnp.einsum(
            "bhgqk,bhkd->bhgqd", p.astype(v.dtype), v_blocks[j],
            preferred_element_type=_F32)
        return new_max, row_sum, acc

      return _skip_unless(ex.tile_runs(i, j), update, carry)

    init = (jnp.full(rows, -jnp.inf, _F32) + zero, jnp.zeros(rows, _F32) + zero,
            jnp.zeros((*rows, v.shape[-1]), _F32) + zero)
    row_max, row_sum, acc = lax.fori_loop(*t.key_blocks(i), key_block, init)
    # A row that sees a key has row_sum >= 1 (its max contributes exp(0)).
    empty = row_sum == 0
    safe_sum = jnp.where(empty, 1, row_sum)
    lse = jnp.where(empty, -jnp.inf, row_max + jnp.log(safe_sum))
    return (acc / safe_sum[..., None]).astype(q.dtype), lse

  out, lse = lax.map(query_block, (q_blocks, jnp.arange(t.num_q)))
  out = _ungroup_heads(_merge(out, seq_q))
  lse = _merge(lse[..., None], seq_q)[..., 0]
  return out, lse.reshape(batch, num_heads, seq_q)


def backward(q, k, v, out, lse, dout, dlse, extras=None, *,
             softmax_scale: float, causal: bool, variant: Variant = Variant(),
             deterministic: bool = False, block_k: int = 512,
             block_q: int = 512):
  """dq, dk, dv with the shapes and dtypes of q, k, v, and the cotangents of
  the float extras (bias, alibi_slopes) by name.

  Always deterministic (every sum has a fixed order), whatever `deterministic`
  says.
  """
  del deterministic
  batch, seq_q, num_heads, _ = q.shape
  seq_k, num_kv_heads = k.shape[1], k.shape[2]
  extras = extras or {}
  t = _Tiling.make(seq_q, seq_k, block_q=block_q, block_k=block_k,
                   causal=causal, softmax_scale=softmax_scale, variant=variant,
                   extras=extras)
  ex = _Extras(extras, t, batch, num_heads, num_kv_heads)
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
  zero = zero_of(q, k, v, out, lse, dout, dlse, *jax.tree.leaves(extras))
  # Cotangents of the float extras, accumulated over every tile.
  d_extras = {}
  if variant.bias:
    d_extras["bias"] = jnp.zeros(ex.bias.x.shape, _F32) + zero
  if variant.alibi:
    d_extras["alibi_slopes"] = jnp.zeros(ex.slopes.shape, _F32) + zero

  def key_block(carry, args):
    k_j, v_j, j = args

    def query_block(i, carry):
      def update(carry):
        dq, dk, dv, d_ex = carry
        q_i, dout_i = q_blocks[i], dout_blocks[i]
        s, cap_slope = t.scores(q_i, k_j, i, j, ex)
        p = jnp.exp(s - lse_blocks[i][..., None])
        # With dropout the values are weighed by p * scale; D = rowsum(dO * O)
        # is then sum_j p * scale * dP, so dS keeps its form with dP scaled.
        scale = ex.dropout_scale(i, j) if variant.dropout_rate else 1
        dv = dv + jnp.einsum("bhgqk,bhgqd->bhkd", (p * scale).astype(v.dtype),
                             dout_i, preferred_element_type=_F32)
        dp = jnp.einsum("bhgqd,bhkd->bhgqk", dout_i, v_j,
                        preferred_element_type=_F32) * scale
        ds = p * (dp - delta_blocks[i][..., None])  # d loss / d final score
        d_ex = dict(d_ex)
        if variant.bias:
          d_ex["bias"] = ex.bias.add_to_tile(d_ex["bias"], i, j, ds)
        if variant.alibi:
          distance = jnp.abs(t.offsets(i, j)).astype(_F32)
          d_slopes = (ds * distance).sum(axis=(-2, -1), keepdims=True)
          if d_ex["alibi_slopes"].shape[0] == 1:  # slopes shared by the batch
            d_slopes = d_slopes.sum(axis=0, keepdims=True)
          d_ex["alibi_slopes"] = d_ex["alibi_slopes"] - d_slopes
        if cap_slope is not None:
          ds = ds * cap_slope
        ds = (ds * softmax_scale).astype(q.dtype)
        dk = dk + jnp.einsum("bhgqk,bhgqd->bhkd", ds, q_i,
                             preferred_element_type=_F32)
        dq_i = lax.dynamic_index_in_dim(dq, i, keepdims=False) + jnp.einsum(
            "bhgqk,bhkd->bhgqd", ds, k_j, preferred_element_type=_F32)
        return lax.dynamic_update_index_in_dim(dq, dq_i, i, 0), dk, dv, d_ex

      return _skip_unless(ex.tile_runs(i, j), update, carry)

    dq, d_ex = carry
    init = (dq, jnp.zeros(k_j.shape, _F32) + zero,
            jnp.zeros(v_j.shape, _F32) + zero, d_ex)
    dq, dk, dv, d_ex = lax.fori_loop(*t.query_blocks(j), query_block, init)
    return (dq, d_ex), (dk.astype(k.dtype), dv.astype(v.dtype))

  (dq, d_extras), (dk, dv) = lax.scan(
      key_block, (jnp.zeros(q_blocks.shape, _F32) + zero, d_extras),
      (k_blocks, v_blocks, jnp.arange(t.num_k)))
  dq = _ungroup_heads(_merge(dq, seq_q)).astype(q.dtype)
  dk, dv = (_keys_first(_merge(x, seq_k)) for x in (dk, dv))
  if variant.bias:
    d_extras["bias"] = ex.bias.unpad(d_extras["bias"]).astype(
        extras["bias"].dtype)
  if variant.alibi:
    d_extras["alibi_slopes"] = d_extras["alibi_slopes"].reshape(
        ex.slopes_shape).astype(extras["alibi_slopes"].dtype)
  return dq, dk, dv, d_extras
