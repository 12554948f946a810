"""How the attention ops split over a device mesh under `jax.jit`.

Each op (forward, backward) is a `custom_partitioning` call. Its Shardy rule
names the dimensions of every operand and result: batch `b`, query and key
positions `s` and `t`, query heads `(n g)` (key/value heads `n` times the
group `g` that shares each one, so head sharding reaches K/V under GQA), and
the head dims `d`, `e`. When the partitioner lowers the op for a mesh, it
looks at how the operands are split:

- batch and heads: every device runs the op on its own rows and heads, with
  no collective (under MQA the single K/V head is read whole by every device,
  and its gradient summed over the head shards);
- the sequence, queries and keys alike: ring attention over those mesh axes;
- anything else (head_dim, queries split but keys not): an error that says
  so. Nothing is gathered behind the caller's back.

Under `vmap` the op runs unpartitioned (the batching rule maps the local
computation), as do ops inside `shard_map`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_flash import ring as ring_lib
from jax_flash.variants import BLOCK_INDEX_NAMES, Frame

# Logical dimensions of every operand and result: b batch, s queries, t keys,
# h query heads, n key/value heads, d query/key head dim, e value head dim,
# None a broadcast dimension of size 1 (never split).
_ARRAY_DIMS = dict(
    q="bshd", k="btnd", v="btne", out="bshe", lse="bhs", dout="bshe", dlse="bhs")
_OPERANDS = dict(forward=("q", "k", "v"),
                 backward=("q", "k", "v", "out", "lse", "dout", "dlse"))
_RESULTS = dict(forward=("out", "lse"), backward=("q", "k", "v"))
_FLOAT_EXTRAS = ("alibi_slopes", "bias")  # the extras with cotangents


def _extra_dims(name: str, shape: tuple, full: dict) -> tuple:
  """The logical dimensions of an extra array."""
  if name == "alibi_slopes":
    return ("h",) if len(shape) == 1 else ("b", "h")
  if name in ("q_segment_ids", "kv_segment_ids"):
    return ("b", "s" if name == "q_segment_ids" else "t")
  if name in ("mask", "bias"):  # right-aligned to [b, h, s, t]
    dims = "bhst"[4 - len(shape):]
    return tuple(d if size == full[d] and size > 1 else None
                 for d, size in zip(dims, shape))
  if name == "block_mask" or name in BLOCK_INDEX_NAMES:  # [b', h', blocks...]
    return tuple(d if size == full[d] and size > 1 else None
                 for d, size in zip("bh", shape[:2])) + (None,) * (len(shape) - 2)
  return (None,) * len(shape)


@dataclasses.dataclass(frozen=True)
class Op:
  """One attention op as the partitioner sees it: the plan it runs, and the
  logical dimensions of its extras (by name, in the order they are passed)."""
  name: str  # "forward" or "backward"
  plan: object  # attention.Plan
  extras: tuple  # ((name, dims), ...)
  sizes: tuple  # ((logical dim, size in the whole op), ...)
  compute: object  # (op name, plan, arrays, extras) -> results, on one device

  @property
  def size(self) -> dict:
    return dict(self.sizes)

  def operand_dims(self) -> list:
    return ([_ARRAY_DIMS[a] for a in _OPERANDS[self.name]]
            + [dims for _, dims in self.extras])

  def result_dims(self) -> list:
    dims = [_ARRAY_DIMS[a] for a in _RESULTS[self.name]]
    if self.name == "backward":
      dims += [d for name, d in self.extras if name in _FLOAT_EXTRAS]
    return dims

  def sharding_rule(self):
    """The Shardy rule: `b s (n g) d, b t n d, ... -> ...`."""
    groups = self.size["h"] // self.size["n"]
    # Query heads are K/V heads times groups; Shardy takes no size-1 part in
    # a compound factor, so MHA and MQA name the query heads on their own.
    heads = "(n g)" if self.size["n"] > 1 and groups > 1 else "n" if groups == 1 else "h"
    unique = itertools.count()  # a broadcast dimension's own factor
    factor = lambda d: (heads if d == "h" else d) if d else f"x{next(unique)}"
    dims_text = lambda dims: " ".join(factor(d) for d in dims)
    rule = (", ".join(map(dims_text, self.operand_dims())) + " -> "
            + ", ".join(map(dims_text, self.result_dims())))
    return rule, (dict(g=groups) if heads == "(n g)" else {})


def call(op_name: str, plan, arrays, extras, compute):
  """`compute(op_name, plan, arrays, extras)` as one op that jit partitions
  over batch, heads or the sequence (see the module doc)."""
  names = tuple(extras)
  q, k, v = arrays[:3]
  sizes = dict(b=q.shape[0], s=q.shape[1], h=q.shape[2], d=q.shape[3],
               t=k.shape[1], n=k.shape[2], e=v.shape[3])
  op = Op(op_name, plan,
          tuple((name, _extra_dims(name, extras[name].shape, sizes)) for name in names),
          tuple(sizes.items()), compute)
  results = _batchable(op)(*arrays, *(extras[name] for name in names))
  if op_name == "forward":
    return tuple(results)
  dq, dk, dv, *d_float = results
  return dq, dk, dv, dict(zip([n for n in names if n in _FLOAT_EXTRAS], d_float))


def _local(op: Op, *flat, plan=None, ring=None, origin=None):
  """The op on this device's arrays, as a flat tuple of results."""
  count = len(_OPERANDS[op.name])
  arrays, extras = flat[:count], dict(zip((n for n, _ in op.extras), flat[count:]))
  if origin is not None:
    extras["origin"] = origin
  if ring is not None:
    if op.name == "forward":
      return tuple(ring_lib.ring_forward(*arrays, extras, ring))
    dq, dk, dv, d_extras = ring_lib.ring_backward(*arrays, extras, ring)
  else:
    results = op.compute(op.name, plan or op.plan, arrays, extras)
    if op.name == "forward":
      return tuple(results)
    dq, dk, dv, d_extras = results
  return (dq, dk, dv, *(d_extras[n] for n, _ in op.extras if n in _FLOAT_EXTRAS))


@functools.lru_cache(maxsize=None)
def _batchable(op: Op):
  """The partitioned op, whose vmap maps the unpartitioned computation (a
  custom_partitioning call has no batching rule of its own)."""
  @custom_vmap
  def run(*flat):
    return _partitioned(op, *flat)

  @run.def_vmap
  def vmap_rule(axis_size, in_batched, *flat):
    in_axes = [0 if batched else None for batched in in_batched]
    results = jax.vmap(functools.partial(_local, op), in_axes=in_axes,
                       axis_size=axis_size)(*flat)
    return results, (True,) * len(results)

  return run


# -- Partitioning ------------------------------------------------------------


def _spec_of(sharding, ndim: int) -> tuple:
  """The mesh axes (a tuple, maybe empty) that split each dimension."""
  if sharding is None or sharding.is_fully_replicated:
    return ((),) * ndim
  if not isinstance(sharding, NamedSharding):
    raise ValueError(f"flash_attention: cannot partition over the sharding {sharding}; "
                     "shard q, k and v with a NamedSharding over a mesh")
  spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
  return tuple(() if a is None else (a,) if isinstance(a, str) else tuple(a)
               for a in spec)


def _axes_size(mesh, axes: tuple) -> int:
  return math.prod(mesh.shape[a] for a in axes)


class _Layout:
  """The mesh axes that split each logical dimension, checked: the sequence
  only as a whole (queries and keys over the same axes, then ring attention),
  never a head dim."""

  def __init__(self, op: Op, mesh, arg_shapes):
    self.op, self.mesh = op, mesh
    specs = [_spec_of(x.sharding, len(x.shape)) for x in arg_shapes]
    q, k, v = specs[:3]
    for name, spec in (("query", q), ("key", k), ("value", v)):
      if spec[3]:
        raise ValueError(
            f"flash_attention: {name} is sharded along head_dim over mesh axes "
            f"{spec[3]}; attention needs whole head vectors. Shard batch, heads or "
            "the sequence instead")
    if q[1] != k[1]:
      raise ValueError(
          f"flash_attention: the query sequence is sharded over mesh axes {q[1]} and "
          f"the key sequence over {k[1]}; a sequence split across devices runs ring "
          "attention, which needs queries and keys split over the same axes (or "
          "call jax_flash.ring_attention inside shard_map)")
    size = op.size
    heads = q[2]
    kv_heads = heads
    if heads and size["n"] % _axes_size(mesh, heads):
      if size["n"] != 1:
        raise ValueError(
            f"flash_attention: {size['h']} query heads are split {_axes_size(mesh, heads)} "
            f"ways over mesh axes {heads}, which does not divide the {size['n']} key/value "
            "heads; split the heads a number of ways that divides num_kv_heads")
      kv_heads = ()  # MQA: each device reads the one K/V head whole
    self.axes = dict(b=q[0], s=q[1], t=k[1], h=heads, n=kv_heads, d=(), e=())
    self.sequence = q[1]

  def spec(self, dims) -> NamedSharding:
    def axes(d):
      a = self.axes[d] if d else ()
      return None if not a else a[0] if len(a) == 1 else a
    return NamedSharding(self.mesh, P(*(axes(d) for d in dims)))

  def index(self, dim: str):
    """This device's first index along a logical dimension."""
    axes = self.axes[dim]
    if not axes:
      return 0
    local = self.op.size[dim] // _axes_size(self.mesh, axes)
    return lax.axis_index(axes if len(axes) > 1 else axes[0]) * local

  def reduced_axes(self, dims) -> tuple:
    """The mesh axes a result with these dims is summed over: those that split
    a dimension it does not have (its shards hold partial sums)."""
    present = {self.axes[d] for d in dims if d}
    split = [self.axes[d] for d in ("b", "h") if self.axes[d]]
    return tuple(a for axes in split if axes not in present for a in axes)


def _partition(op: Op, mesh, arg_shapes, result_shape):
  layout = _Layout(op, mesh, arg_shapes)
  arg_shardings = [layout.spec(d) for d in op.operand_dims()]
  result_shardings = [layout.spec(d) for d in op.result_dims()]
  plan = op.plan
  reduce = [layout.reduced_axes(d) for d in op.result_dims()]

  def lower(*flat):
    q, k = flat[0], flat[1]
    origin = None
    frame = Frame(num_heads=op.size["h"], diagonal=op.size["t"] - op.size["s"])
    ring = None
    if layout.sequence:
      axes = layout.sequence
      ring = ring_lib.Ring.make(
          plan, q, k, axis_name=axes[0] if len(axes) == 1 else axes,
          size=_axes_size(mesh, axes), layout="contiguous", mode="ring",
          num_heads=op.size["h"])
    local_plan = plan
    if plan.variant.dropout_rate or (ring and ring.plan.variant.frame):
      # Dropout numbers batch rows and heads as in the whole op.
      origin = jnp.stack([layout.index("b"), layout.index("h"), 0, 0]).astype(jnp.int32)
      if ring is None:
        local_plan = plan.in_frame(frame)
    results = _local(op, *flat, plan=local_plan, ring=ring, origin=origin)
    return tuple(lax.psum(r, axes) if axes else r for r, axes in zip(results, reduce))

  return mesh, lower, tuple(result_shardings), tuple(arg_shardings)


def _infer(op: Op, mesh, arg_shapes, result_shape):
  layout = _Layout(op, mesh, arg_shapes)
  return tuple(layout.spec(d) for d in op.result_dims())


def _whole(op: Op, *flat):
  """The op unsplit: what runs on one device, and the type of the results."""
  return _local(op, *flat)


_partitioned = custom_partitioning(_whole, static_argnums=(0,))
_partitioned.def_partition(
    partition=_partition, infer_sharding_from_operands=_infer,
    sharding_rule=lambda op, *_: op.sharding_rule())
