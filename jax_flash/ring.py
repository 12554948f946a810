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
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_flash import attention
from jax_flash import xla

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
                   implementation: str | None = None):
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
    softmax_scale, return_lse, implementation: as for `flash_attention`.

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
  parts = 2 if layout == "zigzag" else 1
  if causal and query.shape[1] != key.shape[1]:
    raise ValueError("ring_attention: causal needs as many queries as keys per device, "
                     f"got query {tuple(query.shape)} and key {tuple(key.shape)}")
  for name, x in (("query", query), ("key", key)):
    if x.shape[1] % parts:
      raise ValueError(f"ring_attention: layout 'zigzag' needs an even {name} slice "
                       f"length, got {tuple(x.shape)}")
  plans = {}
  for c in (False, True) if causal else (False,):
    (query, key, value), _, plans[c] = attention.make_plan(
        query, key, value, causal=c, softmax_scale=softmax_scale,
        implementation=implementation)
  out, lse = _ring(query, key, value, axis_name, n, parts, mode, bool(causal),
                   plans[False], plans.get(True))
  return (out, lse) if return_lse else out


def _chunk_ids(device, n: int, parts: int):
  """Global chunk numbers (of n * parts) of the slices a device holds."""
  return [device] if parts == 1 else [device, 2 * n - 1 - device]


def _relation(causal: bool, q_chunk, k_chunk):
  """0: the keys are hidden from the queries, 1: the diagonal chunk (causal
  within it), 2: every key visible."""
  if not causal:
    return 2
  return jnp.where(k_chunk < q_chunk, 2, jnp.where(k_chunk == q_chunk, 1, 0))


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
  """x passed one device on around the ring."""
  return lax.ppermute(x, axis_name, [(i, (i + 1) % n) for i in range(n)])


def _visits(k, v, axis_name: str, n: int, mode: str):
  """(device whose K/V slice it is, that slice) for each of the n steps: in
  "ring" mode the slices come around the ring, each next one sent before this
  one is used, so the transfer overlaps the attention; in "allgather" mode
  they are read from the gathered whole."""
  me = lax.axis_index(axis_name)
  gathered = (tuple(lax.all_gather(x, axis_name, axis=0) for x in (k, v))
              if mode == "allgather" else None)
  kv = (k, v)
  for step in range(n):
    src = (me - step) % n
    if gathered is not None:
      yield src, tuple(lax.dynamic_index_in_dim(x, src, keepdims=False) for x in gathered)
      continue
    in_hand = kv
    if step < n - 1:
      kv = _shift(kv, axis_name, n)
    yield src, in_hand


def _no_keys(q, k, v, out_dtype=_F32):
  """(out, lse) of queries that see no key: 0 and -inf, varying over the mesh
  axes as the inputs do."""
  zero = xla.zero_of(q, k, v)
  return ((jnp.zeros(q.shape[:3] + v.shape[3:], _F32) + zero).astype(out_dtype),
          jnp.full((q.shape[0], q.shape[2], q.shape[1]), -jnp.inf, _F32) + zero)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8, 9))
def _ring(q, k, v, axis_name, n, parts, mode, causal, full, diagonal):
  return _ring_fwd(q, k, v, axis_name, n, parts, mode, causal, full, diagonal)[0]


def _pairs(q_ids, kv_ids, causal: bool):
  """(query part, key part, relation) of every pair of slices."""
  for a, q_id in enumerate(q_ids):
    for b, kv_id in enumerate(kv_ids):
      yield a, b, _relation(causal, q_id, kv_id)


def _attend_pair(relation, q, k, v, full, diagonal):
  """(out, lse) of q over the keys k, v under `relation`."""
  no_keys = lambda q, k, v: _no_keys(q, k, v, q.dtype)
  branches = [no_keys, lambda q, k, v: diagonal.forward(q, k, v, {}) if diagonal else
              no_keys(q, k, v), lambda q, k, v: full.forward(q, k, v, {})]
  if isinstance(relation, int):
    return branches[relation](q, k, v)
  return lax.switch(relation, branches, q, k, v)


def _ring_fwd(q, k, v, axis_name, n, parts, mode, causal, full, diagonal):
  q_parts = _split(q, parts, 1)
  q_ids = _chunk_ids(lax.axis_index(axis_name), n, parts)
  acc = [_no_keys(p, k, v) for p in q_parts]
  for src, (k_in_hand, v_in_hand) in _visits(k, v, axis_name, n, mode):
    k_parts, v_parts = _split(k_in_hand, parts, 1), _split(v_in_hand, parts, 1)
    for a, b, rel in _pairs(q_ids, _chunk_ids(src, n, parts), causal):
      acc[a] = _merge(acc[a], _attend_pair(rel, q_parts[a], k_parts[b], v_parts[b],
                                           full, diagonal))
  out = jnp.concatenate([o for o, _ in acc], axis=1).astype(q.dtype)
  lse = jnp.concatenate([l for _, l in acc], axis=2)
  return (out, lse), (q, k, v, out, lse)


def _ring_bwd(axis_name, n, parts, mode, causal, full, diagonal, residuals, cotangents):
  q, k, v, out, lse = residuals
  dout, dlse = cotangents
  split_q = lambda x, axis=1: _split(x, parts, axis)
  q_parts, out_parts, dout_parts = split_q(q), split_q(out), split_q(dout)
  lse_parts, dlse_parts = split_q(lse, 2), split_q(dlse, 2)
  q_ids = _chunk_ids(lax.axis_index(axis_name), n, parts)
  dq = [jnp.zeros(p.shape, _F32) for p in q_parts]
  # dK/dV of the slice in hand (ring), or of every slice (allgather).
  dkv = ([jnp.zeros((n,) + k.shape, _F32), jnp.zeros((n,) + v.shape, _F32)]
         if mode == "allgather" else [jnp.zeros(k.shape, _F32), jnp.zeros(v.shape, _F32)])

  def pair_grads(rel, a, kp, vp):
    args = (q_parts[a], kp, vp, out_parts[a], lse_parts[a], dout_parts[a], dlse_parts[a])
    def zeros(*args):
      zero = xla.zero_of(*args)
      return tuple(jnp.zeros(x.shape, _F32) + zero for x in args[:3])
    as_f32 = lambda plan: (lambda *args: tuple(g.astype(_F32) for g in plan.backward(
        *args, {})[:3]))
    branches = [zeros, as_f32(diagonal) if diagonal else zeros, as_f32(full)]
    if isinstance(rel, int):
      return branches[rel](*args)
    return lax.switch(rel, branches, *args)

  for src, (k_in_hand, v_in_hand) in _visits(k, v, axis_name, n, mode):
    k_parts, v_parts = _split(k_in_hand, parts, 1), _split(v_in_hand, parts, 1)
    dk_parts = [jnp.zeros(p.shape, _F32) for p in k_parts]
    dv_parts = [jnp.zeros(p.shape, _F32) for p in v_parts]
    for a, b, rel in _pairs(q_ids, _chunk_ids(src, n, parts), causal):
      g_q, g_k, g_v = pair_grads(rel, a, k_parts[b], v_parts[b])
      dq[a] = dq[a] + g_q
      dk_parts[b] = dk_parts[b] + g_k
      dv_parts[b] = dv_parts[b] + g_v
    step = [jnp.concatenate(dk_parts, axis=1), jnp.concatenate(dv_parts, axis=1)]
    if mode == "allgather":
      dkv = [lax.dynamic_update_index_in_dim(
          acc, lax.dynamic_index_in_dim(acc, src, keepdims=False) + g, src, 0)
             for acc, g in zip(dkv, step)]
    else:
      # The accumulators travel with the K/V slice they belong to; after the
      # last step one more pass brings each home.
      dkv = _shift([acc + g for acc, g in zip(dkv, step)], axis_name, n)
  if mode == "allgather":
    dkv = [lax.psum_scatter(x, axis_name, scatter_dimension=0, tiled=False) for x in dkv]
  dq = jnp.concatenate(dq, axis=1)
  return dq.astype(q.dtype), dkv[0].astype(k.dtype), dkv[1].astype(v.dtype)


_ring.defvjp(_ring_fwd, _ring_bwd)
