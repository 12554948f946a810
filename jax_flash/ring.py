"""Attention over a sequence split across devices (context parallelism).

Inside `shard_map`, each device holds a slice of the sequence of q, k and v
along a mesh axis. `ring_attention` passes the K/V slices around the ring with
`lax.ppermute` while each device attends its queries to the slice in hand, and
merges the partial results by their log-sum-exp in float32; its backward pass
sends K/V around again, with their dK/dV accumulators travelling beside them
back to their owners. `mode="allgather"` instead gathers all of K/V at once
(often faster on short rings) and reduce-scatters dK/dV.

Under a causal mask, contiguous slices leave the first device little work and
the last one all of it. The zig-zag layout gives device i the sequence chunks i
and 2n - 1 - i of 2n, so every device does the same work: permute the global
arrays with `zigzag_permute` before sharding and the output back with
`zigzag_unpermute`.

The variants go around the ring too: a soft cap as it is, the key segment ids
with their K/V slice, and windows, ALiBi and dropout from the global positions
of each pair of slices (a pair that a window or the causal mask hides entirely
is skipped). A dense mask or bias would have to be split along both sequences
and is not taken.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_flash import attention
from jax_flash import xla
from jax_flash.variants import UNBOUNDED, Frame

_F32 = jnp.float32
LAYOUTS = ("contiguous", "zigzag")
MODES = ("ring", "allgather")


def zigzag_permute(x, num_shards: int, axis: int = 1):
  """x with its sequence axis reordered so that `num_shards` contiguous shards
  hold the chunks (i, 2 * num_shards - 1 - i) of 2 * num_shards."""
  return jnp.take(x, _zigzag_order(x.shape[axis], num_shards), axis=axis)


def zigzag_unpermute(x, num_shards: int, axis: int = 1):
  """The inverse of `zigzag_permute`."""
  return jnp.take(x, np.argsort(_zigzag_order(x.shape[axis], num_shards)), axis=axis)


def _zigzag_order(length: int, num_shards: int) -> np.ndarray:
  if length % (2 * num_shards):
    raise ValueError(f"zig-zag layout: the sequence length {length} must be a multiple "
                     f"of 2 * num_shards = {2 * num_shards}")
  chunks = np.arange(length).reshape(2 * num_shards, -1)
  order = [c for i in range(num_shards) for c in (i, 2 * num_shards - 1 - i)]
  return chunks[order].reshape(-1)


def ring_attention(query, key, value, *, axis_name: str, causal: bool = False,
                   softmax_scale: float | None = None, return_lse: bool = False,
                   layout: str = "contiguous", mode: str = "ring",
                   implementation: str | None = None, window_size=None,
                   softcap: float | None = None, alibi_slopes=None,
                   segment_ids=None, dropout_rate: float = 0.0, dropout_rng=None):
  """Attention of a sequence sharded along the mesh axis `axis_name`, for use
  inside `shard_map`.

  Args:
    query: this device's [batch, seq_q / n, num_heads, head_dim].
    key, value: this device's [batch, seq_k / n, num_kv_heads, head_dim], where
      n is the size of `axis_name` and device i holds slice i (layout
      "contiguous") or chunks i and 2n - 1 - i of 2n (layout "zigzag", see
      `zigzag_permute`).
    causal: global query i sees keys j <= i + seq_k - seq_q; needs seq_q ==
      seq_k.
    layout: "contiguous" or "zigzag" (balances causal work across devices).
    mode: "ring" (K/V pass around the ring, overlapping the attention) or
      "allgather" (K/V gathered at once, dK/dV reduce-scattered).
    segment_ids: (q_segment_ids [batch, seq_q / n], kv_segment_ids [batch,
      seq_k / n]), this device's slices, laid out like query and key.
    softmax_scale, return_lse, implementation, window_size, softcap,
    alibi_slopes, dropout_rate, dropout_rng: as for `flash_attention`, with
      positions counted over the whole sequence. Dropout draws its mask from
      this device's batch rows and heads as numbered here: devices that hold
      other rows or heads of one batch should fold their index into the key.

  Returns:
    this device's out [batch, seq_q / n, num_heads, head_dim] (and lse [batch,
    num_heads, seq_q / n] float32), equal to the slices of attention over the
    whole sequence. Differentiable, lse too.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"ring_attention: layout must be one of {LAYOUTS}, got {layout!r}")
  if mode not in MODES:
    raise ValueError(f"ring_attention: mode must be one of {MODES}, got {mode!r}")
  try:
    n = lax.axis_size(axis_name)
  except NameError as e:
    raise ValueError(f"ring_attention: no mesh axis {axis_name!r} here; call it "
                     "inside shard_map over a mesh with that axis") from e
  (query, key, value), extras, plan = attention.make_plan(
      query, key, value, causal=causal, softmax_scale=softmax_scale,
      implementation=implementation, window_size=window_size, softcap=softcap,
      alibi_slopes=alibi_slopes, segment_ids=segment_ids,
      dropout_rate=dropout_rate, dropout_rng=dropout_rng)
  ring = Ring.make(plan, query, key, axis_name=axis_name, size=n, layout=layout,
                   mode=mode, num_heads=query.shape[2])
  out, lse = _ring(query, key, value, extras, ring)
  return (out, lse) if return_lse else out


@dataclasses.dataclass(frozen=True)
class Ring:
  """How a ring runs, decided at trace time: the mesh axis, the layout of the
  slices, and the plans of the pairs of slices (`plan` for the whole pair;
  `diagonal` for a query slice against its own keys under a causal mask;
  without a positional variant both can run on the kernels)."""
  axis_name: str
  size: int
  parts: int
  mode: str
  causal: bool
  # Queries and keys per chunk, and seq_k - seq_q over the whole sequence.
  chunk_q: int
  chunk_k: int
  diagonal_offset: int
  plan: attention.Plan
  diagonal: attention.Plan | None
  # For benchmarks only, which measure what the transfers cost and how much of
  # it the attention hides: "transfers" or "attention" left out (the results
  # are then wrong), None for neither.
  ablate: str | None = None

  @classmethod
  def make(cls, plan, query, key, *, axis_name, size, layout, mode, num_heads):
    """`num_heads`: the query heads of the whole attention (dropout numbers
    them), when this call holds some of them."""
    parts = 2 if layout == "zigzag" else 1
    for name, x in (("query", query), ("key", key)):
      if x.shape[1] % parts:
        raise ValueError(f"ring_attention: layout 'zigzag' needs an even {name} "
                         f"slice length, got {tuple(x.shape)}")
    if plan.causal and query.shape[1] != key.shape[1]:
      raise ValueError("ring_attention: causal needs as many queries as keys per "
                       f"device, got query {tuple(query.shape)} and key "
                       f"{tuple(key.shape)}")
    diagonal_offset = size * (key.shape[1] - query.shape[1])
    variant = plan.variant
    if variant.mask or variant.bias or variant.block_size:
      raise ValueError("ring_attention: a dense mask, bias or block mask cannot "
                       "follow a sequence split across devices; use segment_ids "
                       "or window_size")
    diagonal = None
    if variant.positional:
      # Each pair reads its positions in the whole attention.
      frame = Frame(num_heads=num_heads, diagonal=diagonal_offset)
      plan = plan.in_frame(frame)
    elif plan.causal:
      # Whole pairs are visible or hidden except a slice against itself.
      diagonal = plan
      plan = dataclasses.replace(plan, causal=False)
    return cls(axis_name, size, parts, mode, plan.causal, query.shape[1] // parts,
               key.shape[1] // parts, diagonal_offset, plan, diagonal)

  def chunk_ids(self, device):
    """Global chunk numbers (of size * parts) of the slices a device holds."""
    return [device] if self.parts == 1 else [device, 2 * self.size - 1 - device]

  def relation(self, q_chunk, k_chunk):
    """0: every key of the pair hidden from every query, 1: some visible (the
    pair runs masked), 2: every key visible. Python ints where the variant
    decides alone, else traced."""
    if self.ablate == "attention":
      return 0
    window = self.plan.variant.window
    left = window[0]
    right = 0 if self.causal or self.diagonal is not None else window[1]
    if left == UNBOUNDED and right == UNBOUNDED:
      return 2
    # Key position minus the query's diagonal position, over the pair.
    first_query, first_key = q_chunk * self.chunk_q, k_chunk * self.chunk_k
    lowest = first_key - (first_query + self.chunk_q - 1) - self.diagonal_offset
    highest = first_key + self.chunk_k - 1 - first_query - self.diagonal_offset
    some, every = True, True
    if left != UNBOUNDED:
      some, every = some & (highest >= -left), every & (lowest >= -left)
    if right != UNBOUNDED:
      some, every = some & (lowest <= right), every & (highest <= right)
    if self.diagonal is None:  # one plan serves every visible pair
      return jnp.where(some, 2, 0)
    return jnp.where(some, jnp.where(every, 2, 1), 0)

  def pair_plan(self, relation: int) -> attention.Plan:
    return self.diagonal if relation == 1 and self.diagonal is not None else self.plan

  def pair_extras(self, extras, q_part, kv_extras, q_chunk, k_chunk):
    """The variant's arrays of one pair of slices."""
    pair = {name: x for name, x in extras.items() if name != "q_segment_ids"}
    if "q_segment_ids" in extras:
      pair["q_segment_ids"] = _split(extras["q_segment_ids"], self.parts, 1)[q_part]
    pair.update(kv_extras)
    if self.plan.variant.frame:
      origin = extras.get("origin", jnp.zeros(4, jnp.int32))
      pair["origin"] = origin + jnp.stack([
          0, 0, q_chunk * self.chunk_q, k_chunk * self.chunk_k]).astype(jnp.int32)
    return pair


def _split(x, parts: int, axis: int):
  return jnp.split(x, parts, axis=axis) if parts > 1 else [x]


def _merge(acc, part):
  """Two partial attentions of the same queries over disjoint keys, as
  (out float32, lse) pairs, merged by their lse."""
  (out_a, lse_a), (out_b, lse_b) = acc, part
  lse = jnp.logaddexp(lse_a, lse_b)
  safe = jnp.where(jnp.isfinite(lse), lse, 0)
  weight = lambda l: jnp.swapaxes(jnp.exp(l - safe), 1, 2)[..., None]
  return out_a * weight(lse_a) + out_b.astype(_F32) * weight(lse_b), lse


def _shift(x, axis_name: str, n: int):
  """The arrays of the pytree x passed one device on around the ring, those of
  one dtype packed into one transfer (separate transfers would run one after
  another, and only one of them behind the attention)."""
  if n == 1:
    return x
  leaves, tree = jax.tree.flatten(x)
  by_dtype = {}
  for i, leaf in enumerate(leaves):
    by_dtype.setdefault(jnp.dtype(leaf.dtype), []).append(i)
  moved = list(leaves)
  pairs = [(i, (i + 1) % n) for i in range(n)]
  for indices in by_dtype.values():
    packed = jnp.concatenate([leaves[i].ravel() for i in indices])
    packed = lax.ppermute(packed, axis_name, pairs)
    offsets = np.cumsum([0] + [leaves[i].size for i in indices])
    for i, start, end in zip(indices, offsets[:-1], offsets[1:]):
      moved[i] = packed[start:end].reshape(leaves[i].shape)
  return tree.unflatten(moved)


def _around(key_side, ring: Ring, init, step):
  """carry = step(src, slices, carry) for each of the ring's n steps, where
  src is the device whose key-side slices (a dict of arrays split along the
  keys: K, V, key segment ids) the step attends to.

  In "ring" mode the slices come around the ring: each step sends the slices
  in hand on before attending to them, so the transfer overlaps the attention.
  In "allgather" mode they are read from the gathered whole. The steps are a
  loop, so a device holds the slices in use and those arriving, and one step's
  buffers, whatever the number of devices.
  """
  n, axis_name = ring.size, ring.axis_name
  me = lax.axis_index(axis_name)
  if ring.mode == "allgather":
    gathered = {name: lax.all_gather(x, axis_name, axis=0) for name, x in key_side.items()}

    def gathered_step(i, carry):
      src = (me - i) % n
      return step(src, {name: lax.dynamic_index_in_dim(x, src, keepdims=False)
                        for name, x in gathered.items()}, carry)
    return lax.fori_loop(0, n, gathered_step, init)

  def ring_step(i, state):
    in_hand, carry = state
    arriving = in_hand if ring.ablate == "transfers" else _shift(in_hand, axis_name, n)
    return arriving, step((me - i) % n, in_hand, carry)

  # The last step sends nothing on.
  last, carry = lax.fori_loop(0, n - 1, ring_step, (key_side, init))
  return step((me - (n - 1)) % n, last, carry)


def _key_side(k, v, extras):
  key_side = dict(k=k, v=v)
  if "kv_segment_ids" in extras:
    key_side["kv_segment_ids"] = extras["kv_segment_ids"]
  return key_side


def _pairs(ring: Ring, me, src, key_side):
  """(query part, key part, relation, key part's K, V and key-side extras) of
  every pair of slices a step brings together."""
  parts = {name: _split(x, ring.parts, 1) for name, x in key_side.items()}
  for a, q_chunk in enumerate(ring.chunk_ids(me)):
    for b, k_chunk in enumerate(ring.chunk_ids(src)):
      kv_extras = {name: p[b] for name, p in parts.items() if name not in ("k", "v")}
      yield (a, b, q_chunk, k_chunk, ring.relation(q_chunk, k_chunk),
             parts["k"][b], parts["v"][b], kv_extras)


def _no_keys(q, k, v, out_dtype=_F32):
  """(out, lse) of queries that see no key: 0 and -inf, varying over the mesh
  axes as the inputs do."""
  zero = xla.zero_of(q, k, v)
  return ((jnp.zeros(q.shape[:3] + v.shape[3:], _F32) + zero).astype(out_dtype),
          jnp.full((q.shape[0], q.shape[2], q.shape[1]), -jnp.inf, _F32) + zero)


def _by_relation(relation, branches, *args):
  """branches[relation](*args), chosen at trace time where relation is known."""
  if isinstance(relation, int):
    return branches[relation](*args)
  return lax.switch(relation, branches, *args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring(q, k, v, extras, ring):
  return ring_forward(q, k, v, extras, ring)


def ring_forward(q, k, v, extras, ring: Ring):
  """(out, lse) of this device's queries over the whole sequence."""
  q_parts = _split(q, ring.parts, 1)
  me = lax.axis_index(ring.axis_name)
  attend = lambda plan: lambda q, k, v, pair: plan.forward(q, k, v, pair)
  branches = [lambda q, k, v, pair: _no_keys(q, k, v, q.dtype),
              attend(ring.pair_plan(1)), attend(ring.pair_plan(2))]

  def step(src, key_side, acc):
    acc = list(acc)
    for a, _, q_chunk, k_chunk, rel, kp, vp, kv_extras in _pairs(ring, me, src, key_side):
      pair = ring.pair_extras(extras, a, kv_extras, q_chunk, k_chunk)
      acc[a] = _merge(acc[a], _by_relation(rel, branches, q_parts[a], kp, vp, pair))
    return acc

  acc = _around(_key_side(k, v, extras), ring, [_no_keys(p, k, v) for p in q_parts], step)
  out = jnp.concatenate([o for o, _ in acc], axis=1).astype(q.dtype)
  lse = jnp.concatenate([l for _, l in acc], axis=2)
  return out, lse


def _ring_fwd(q, k, v, extras, ring):
  out, lse = ring_forward(q, k, v, extras, ring)
  return (out, lse), (q, k, v, out, lse, extras)


def ring_backward(q, k, v, out, lse, dout, dlse, extras, ring: Ring):
  """dq, dk, dv of this device's slices and the cotangents of the float
  extras (ALiBi slopes), summed over the ring."""
  split_q = lambda x, axis=1: _split(x, ring.parts, axis)
  q_parts, out_parts, dout_parts = split_q(q), split_q(out), split_q(dout)
  lse_parts, dlse_parts = split_q(lse, 2), split_q(dlse, 2)
  me = lax.axis_index(ring.axis_name)
  zero = xla.zero_of(q, k, v, out, lse, dout, dlse)
  dq = [jnp.zeros(p.shape, _F32) + zero for p in q_parts]
  float_extras = {name: x for name, x in extras.items() if name == "alibi_slopes"}
  d_extras = {name: jnp.zeros(x.shape, _F32) + zero for name, x in float_extras.items()}
  allgather = ring.mode == "allgather"
  # dK/dV of the slice in hand (ring), or of every slice (allgather).
  dkv = [jnp.zeros(((ring.size,) if allgather else ()) + x.shape, _F32) + zero
         for x in (k, v)]

  # A pair's gradients stay in the inputs' dtypes (the sums convert them as
  # they add), so a step holds no float32 copies of them.
  def pair_grads(plan):
    def grads(q, k, v, out, lse, dout, dlse, pair):
      dq, dk, dv, d_pair = plan.backward(q, k, v, out, lse, dout, dlse, pair)
      return (dq, dk, dv), {name: d_pair[name].astype(_F32) for name in float_extras}
    return grads

  def hidden(q, k, v, *args):
    zero = xla.zero_of(q, k, v)
    return (tuple((jnp.zeros(x.shape, _F32) + zero).astype(x.dtype) for x in (q, k, v)),
            {name: jnp.zeros(x.shape, _F32) + zero for name, x in float_extras.items()})

  branches = [hidden, pair_grads(ring.pair_plan(1)), pair_grads(ring.pair_plan(2))]

  chunk_k = k.shape[1] // ring.parts

  def add_to_part(acc, g, part, slice_index):
    """acc (float32, [n, ...] in allgather mode) plus g at key part `part`
    of the slice, in place."""
    start = [0] * acc.ndim
    start[-3] = part * chunk_k
    if allgather:
      start[0] = slice_index
      g = g[None]
    window = lax.dynamic_slice(acc, start, g.shape)
    return lax.dynamic_update_slice(acc, window + g.astype(_F32), start)

  def step(src, key_side, carry):
    dq, dkv, d_extras = list(carry[0]), list(carry[1]), carry[2]
    for a, b, q_chunk, k_chunk, rel, kp, vp, kv_extras in _pairs(ring, me, src, key_side):
      pair = ring.pair_extras(extras, a, kv_extras, q_chunk, k_chunk)
      (g_q, g_k, g_v), g_extras = _by_relation(
          rel, branches, q_parts[a], kp, vp, out_parts[a], lse_parts[a],
          dout_parts[a], dlse_parts[a], pair)
      dq[a] = dq[a] + g_q.astype(_F32)
      dkv = [add_to_part(acc, g, b, src) for acc, g in zip(dkv, (g_k, g_v))]
      d_extras = {name: d_extras[name] + g for name, g in g_extras.items()}
    if not allgather and ring.ablate != "transfers":
      # The accumulators travel with the K/V slice they belong to; after the
      # last step one more pass brings each home.
      dkv = _shift(dkv, ring.axis_name, ring.size)
    return dq, dkv, d_extras

  dq, dkv, d_extras = _around(_key_side(k, v, extras), ring, (dq, dkv, d_extras), step)
  if allgather:
    dkv = [lax.psum_scatter(x, ring.axis_name, scatter_dimension=0, tiled=False)
           for x in dkv]
  # Extras shared by the ring's devices get the sum of their cotangents.
  d_extras = {name: (g if ring.axis_name in _varying_axes(float_extras[name])
                     else lax.psum(g, ring.axis_name)).astype(float_extras[name].dtype)
              for name, g in d_extras.items()}
  dq = jnp.concatenate(dq, axis=1)
  return dq.astype(q.dtype), dkv[0].astype(k.dtype), dkv[1].astype(v.dtype), d_extras


def _varying_axes(x) -> frozenset:
  """The manual mesh axes x varies over (those it may differ along)."""
  aval = jax.typeof(x)
  axis_type = getattr(aval, "manual_axis_type", None)
  return axis_type.varying if axis_type is not None else frozenset(getattr(aval, "vma", ()))


def _ring_bwd(ring, residuals, cotangents):
  q, k, v, out, lse, extras = residuals
  dq, dk, dv, d_float_extras = ring_backward(q, k, v, out, lse, *cotangents, extras, ring)
  return dq, dk, dv, attention.extras_cotangents(extras, d_float_extras)


_ring.defvjp(_ring_fwd, _ring_bwd)
