"""`flash_attention`: argument checks, the custom VJP, and the choice of backend."""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_flash import _cuda
from jax_flash import dropout
from jax_flash import partition
from jax_flash import xla
from jax_flash.block_sparse import BlockIndex, BlockSparseMask
from jax_flash.variants import BLOCK_INDEX_NAMES, UNBOUNDED, Variant

DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)
# The variants the CUDA kernels run (the dispatcher in cuda/ffi picks the family).
_KERNEL_FEATURES = ("window_size", "softcap", "alibi_slopes", "segment_ids",
                    "dropout_rate", "block_mask")
IMPLEMENTATIONS = (None, "cuda", "xla")


def flash_attention(query, key, value, *, causal: bool = False,
                    softmax_scale: float | None = None,
                    return_lse: bool = False, implementation: str | None = None,
                    deterministic: bool = False, window_size=None,
                    softcap: float | None = None, alibi_slopes=None,
                    segment_ids=None, mask=None, bias=None, block_mask=None,
                    dropout_rate: float = 0.0, dropout_rng=None):
  """Exact softmax attention that never materializes the score matrix.

  Args:
    query: [batch, seq_q, num_heads, head_dim].
    key: [batch, seq_k, num_kv_heads, head_dim] with num_heads % num_kv_heads
      == 0 (MQA/GQA): query head i reads key/value head
      i // (num_heads // num_kv_heads).
    value: [batch, seq_k, num_kv_heads, head_dim_v]; head_dim_v may differ
      from head_dim.
    causal: query i sees keys j <= i + seq_k - seq_q (bottom-right aligned).
    softmax_scale: multiplies q.k before the softmax; default 1/sqrt(head_dim).
    return_lse: also return the log-sum-exp of the scaled scores.
    implementation: None picks the best available backend for the platform the
      computation is lowered for (the CUDA kernels on an NVIDIA GPU where they
      support the inputs, else the portable path); "cuda" demands the kernels;
      "xla" the portable blockwise path, which runs on every backend.
    deterministic: make the backward bitwise repeatable. The CUDA backward then
      adds the key blocks' dQ contributions in a fixed order (each waits for
      the previous one), which costs some speed; by default they race, and dQ
      can differ in its last bits between runs. The portable path is always
      deterministic.
    window_size: (left, right): query i sees keys j with
      i + seq_k - seq_q - left <= j <= i + seq_k - seq_q + right; None or -1
      leaves a side unbounded. Key blocks outside the window are skipped, so a
      fixed window costs time linear in the sequence length. With causal=True,
      right must be unbounded or 0.
    softcap: a positive number: scores s (already scaled) become
      softcap * tanh(s / softcap) before the softmax (Gemma 2).
    alibi_slopes: float [num_heads] or [batch, num_heads]: adds
      -slope * |i + seq_k - seq_q - j| to the scores (after the cap).
      Differentiable.
    segment_ids: (q_segment_ids [batch, seq_q], kv_segment_ids [batch, seq_k]),
      integers: a query sees only keys of its own segment (packed sequences;
      padding takes an id that the other side never has, e.g. -1). Tiles whose
      segments cannot meet are skipped.
    mask: boolean, broadcastable to [batch, num_heads, seq_q, seq_k]; False
      hides a key. The slow path: it runs on the portable path, reading the
      mask one tile at a time.
    bias: float, broadcastable to [batch, num_heads, seq_q, seq_k], added to
      the scores (after the cap and ALiBi); differentiable. The slow path, like
      mask.
    block_mask: a `jax_flash.BlockSparseMask` whose blocks cover seq_q x
      seq_k, leading dims broadcastable to [batch, num_heads]: query i sees key
      j only when block (i // block_q, j // block_k) is on. Blocks that are off
      are skipped. A query whose blocks are all off gives out 0 and lse -inf.
    dropout_rate, dropout_rng: with a rate in (0, 1) and a JAX random key,
      each attention probability is dropped with that rate and the kept ones
      scaled by 1 / (1 - rate); lse is not affected. The mask comes from a
      counter-based generator, is never stored, and is the same for a given
      key on every path: `jax_flash.dropout_mask` returns it.

  Returns:
    out [batch, seq_q, num_heads, head_dim_v] in the dtype of query, or
    (out, lse) with lse [batch, num_heads, seq_q] float32 (natural log). A query
    row that sees no key gives out 0 and lse -inf. Both are differentiable.

  q, k and v share one dtype: float16, bfloat16 or float32.
  """
  if not isinstance(return_lse, (bool, np.bool_)):
    raise TypeError(f"flash_attention: return_lse must be a Python bool, got "
                    f"{return_lse!r} of type {type(return_lse).__name__}")
  (query, key, value), extras, plan = make_plan(
      query, key, value, causal=causal, softmax_scale=softmax_scale,
      implementation=implementation, deterministic=deterministic,
      window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
      segment_ids=segment_ids, mask=mask, bias=bias, block_mask=block_mask,
      dropout_rate=dropout_rate, dropout_rng=dropout_rng)
  out, lse = _on_auto_axes(query, key, value, extras, plan)
  return (out, lse) if return_lse else out


def _on_auto_axes(query, key, value, extras, plan):
  """`_attention`, with the mesh axes that shard the inputs explicitly
  (`jax.make_mesh`'s default axis type) made auto for the call.

  Under explicit axes every op must derive its output's sharding from its
  inputs', which the portable path's reshapes and the kernels' partitioning
  rules are not written for; with auto axes XLA's partitioner and
  `partition`'s rules place the work. The results are typed as sharded like
  the query over batch, sequence and heads (lse [batch, heads, seq]).
  """
  mesh = next((jax.typeof(x).sharding.mesh for x in (query, key, value)
               if jax.typeof(x).sharding.mesh.explicit_axes), None)
  if mesh is None:
    return _attention(query, key, value, extras, plan)
  batch, seq, heads = (tuple(jax.typeof(query).sharding.spec) + (None,) * 3)[:3]
  shardings = (jax.NamedSharding(mesh, jax.P(batch, seq, heads, None)),
               jax.NamedSharding(mesh, jax.P(batch, heads, seq)))
  run = jax.sharding.auto_axes(lambda q, k, v, e: _attention(q, k, v, e, plan),
                               out_sharding=shardings)
  return run(query, key, value, extras)


@dataclasses.dataclass(frozen=True)
class Plan:
  """How a call runs, decided at trace time (the static argument of its
  custom VJP)."""
  softmax_scale: float
  causal: bool
  deterministic: bool
  backend: str
  variant: Variant

  def forward(self, q, k, v, extras):
    """out and lse of the call, no custom VJP (for callers with their own)."""
    return _run((q, k, v), extras, op="forward", plan=self)

  def in_frame(self, frame) -> "Plan":
    """This plan for a shard of a larger attention (`variants.Frame`); its
    extras then need "origin". Only the portable path reads frames."""
    if self.backend == "cuda":
      raise ValueError(
          "flash_attention: implementation='cuda' cannot serve a shard of a larger "
          f"attention with {', '.join(self.variant.features)} (its positions are "
          "those of the whole; the portable path takes them)")
    return dataclasses.replace(
        self, backend="xla", variant=dataclasses.replace(self.variant, frame=frame))

  def backward(self, q, k, v, out, lse, dout, dlse, extras):
    """dq, dk, dv and the cotangents of the float extras, from a given out and
    lse (which may be those of a larger attention this call is a part of)."""
    return _run((q, k, v, out, lse, dout, dlse), extras, op="backward", plan=self)


def make_plan(query, key, value, *, causal=False, softmax_scale=None,
              implementation=None, deterministic=False, **variant_kwargs):
  """Checks the arguments and decides the backend: ((q, k, v), extras, Plan)."""
  query, key, value = _check_arrays(query, key, value)
  for name, flag in (("causal", causal), ("deterministic", deterministic)):
    if not isinstance(flag, (bool, np.bool_)):
      raise TypeError(f"flash_attention: {name} must be a Python bool, got "
                      f"{flag!r} of type {type(flag).__name__}")
  head_dim = query.shape[-1]
  softmax_scale = _check_softmax_scale(softmax_scale, head_dim)
  variant, extras = _check_variant(query, key, causal=bool(causal), **variant_kwargs)
  # What the CUDA kernels cannot run yet: such calls take the portable path.
  portable_only = tuple(f for f in variant.features if f not in _KERNEL_FEATURES)
  if variant.block_size and any(b % _cuda.BLOCK_SPARSE_GRANULE for b in variant.block_size):
    portable_only += (f"block_mask block_size {variant.block_size} (the kernels take "
                      f"multiples of {_cuda.BLOCK_SPARSE_GRANULE})",)
  backend = _choose_backend(
      # A value head_dim of its own: the kernels pad both to the larger.
      implementation, query.dtype, max(head_dim, value.shape[-1]),
      empty=query.shape[0] == 0,
      sizes=dict(batch=query.shape[0], heads=query.shape[2],
                 seq_q=query.shape[1], seq_k=key.shape[1]),
      portable_only=portable_only)
  return (query, key, value), extras, Plan(softmax_scale, bool(causal),
                                           bool(deterministic), backend, variant)


def _check_arrays(query, key, value):
  arrays = {"query": query, "key": key, "value": value}
  for name, x in arrays.items():
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
      raise TypeError(f"flash_attention: {name} must be an array, got "
                      f"{type(x).__name__}")
    if x.ndim != 4:
      raise ValueError(
          f"flash_attention: {name} must have rank 4 [batch, seq, heads, "
          f"head_dim], got shape {tuple(x.shape)}")
  allowed = ", ".join(jnp.dtype(d).name for d in DTYPES)
  if jnp.dtype(query.dtype) not in [jnp.dtype(d) for d in DTYPES]:
    raise TypeError(f"flash_attention: query has dtype {query.dtype}; allowed "
                    f"dtypes are {allowed}")
  for name in ("key", "value"):
    if arrays[name].dtype != query.dtype:
      raise TypeError(
          f"flash_attention: {name} has dtype {arrays[name].dtype} but query "
          f"has dtype {query.dtype}; query, key and value must share one "
          f"dtype, one of {allowed}")

  batch, seq_q, num_heads, head_dim = query.shape
  if key.shape[:3] != value.shape[:3]:
    raise ValueError(
        f"flash_attention: key and value must agree in batch, seq_k and "
        f"num_kv_heads (dims 0-2), got key {tuple(key.shape)} and value "
        f"{tuple(value.shape)}")
  _, seq_k, num_kv_heads, _ = key.shape
  if key.shape[0] != batch or key.shape[3] != head_dim:
    raise ValueError(
        f"flash_attention: key/value {tuple(key.shape)} must match query "
        f"{tuple(query.shape)} in batch (dim 0) and head_dim (dim 3)")
  for name, size in (("seq_q", seq_q), ("num_heads", num_heads),
                     ("head_dim", head_dim), ("seq_k", seq_k),
                     ("num_kv_heads", num_kv_heads),
                     ("value head_dim", value.shape[3])):
    if size < 1:
      raise ValueError(f"flash_attention: {name} must be >= 1, got {size} "
                       f"(query {tuple(query.shape)}, key {tuple(key.shape)})")
  if num_heads % num_kv_heads:
    raise ValueError(
        f"flash_attention: num_heads {num_heads} (query {tuple(query.shape)}) "
        f"must be a multiple of num_kv_heads {num_kv_heads} (key "
        f"{tuple(key.shape)})")
  return tuple(jnp.asarray(x) for x in (query, key, value))


def _check_softmax_scale(softmax_scale, head_dim: int) -> float:
  if softmax_scale is None:
    return 1.0 / math.sqrt(head_dim)
  if (isinstance(softmax_scale, (bool, np.bool_, str, bytes))
      or np.ndim(softmax_scale) != 0):
    raise TypeError("flash_attention: softmax_scale must be None or a positive "
                    f"finite Python number, got {softmax_scale!r}")
  try:
    scale = float(softmax_scale)
  except jax.errors.ConcretizationTypeError as e:
    # The kernels take the scale as a compile-time attribute.
    raise TypeError(
        "flash_attention: softmax_scale must be a Python number, not a traced "
        "value (use math.sqrt, not jnp.sqrt, to compute it)") from e
  except (TypeError, ValueError) as e:
    raise TypeError("flash_attention: softmax_scale must be None or a positive "
                    f"finite Python number, got {softmax_scale!r}") from e
  if not (math.isfinite(scale) and scale > 0):
    raise ValueError("flash_attention: softmax_scale must be a positive finite "
                     f"number or None, got {scale}")
  return scale


def _check_variant(query, key, *, causal: bool, window_size=None, softcap=None,
                   alibi_slopes=None, segment_ids=None, mask=None, bias=None,
                   block_mask=None, dropout_rate=0.0, dropout_rng=None):
  """The static Variant and its arrays by name, or an error naming the argument."""
  batch, seq_q, num_heads, _ = query.shape
  seq_k = key.shape[1]
  extras = {}

  window = (UNBOUNDED, UNBOUNDED)
  if window_size is not None:
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
      raise TypeError("flash_attention: window_size must be None or a pair "
                      f"(left, right), got {window_size!r}")
    sides = []
    for side, w in zip(("left", "right"), window_size):
      if w is None:
        w = UNBOUNDED
      if isinstance(w, (bool, np.bool_)) or not isinstance(w, (int, np.integer)):
        raise TypeError(f"flash_attention: window_size {side} must be an int "
                        f"or None, got {w!r}")
      if w < UNBOUNDED:
        raise ValueError(f"flash_attention: window_size {side} must be >= 0, or "
                         f"-1 or None for unbounded, got {w}")
      sides.append(int(w))
    window = tuple(sides)
    if causal and window[1] > 0:
      raise ValueError(
          f"flash_attention: causal=True hides every key after the diagonal, "
          f"so window_size right must be 0, -1 or None, got window_size="
          f"{tuple(window_size)}")

  cap = 0.0
  if softcap is not None:
    cap = _python_number("softcap", softcap, "None or a positive Python number")
    if not (math.isfinite(cap) and cap > 0):
      raise ValueError("flash_attention: softcap must be a positive finite "
                       f"number or None, got {softcap!r}")

  if alibi_slopes is not None:
    slopes = _array_arg("alibi_slopes", alibi_slopes)
    if slopes.shape not in ((num_heads,), (batch, num_heads)):
      raise ValueError(
          f"flash_attention: alibi_slopes must have shape [num_heads] = "
          f"({num_heads},) or [batch, num_heads] = ({batch}, {num_heads}), got "
          f"{tuple(slopes.shape)}")
    if not jnp.issubdtype(slopes.dtype, jnp.floating):
      raise TypeError("flash_attention: alibi_slopes must be floating point, "
                      f"got {slopes.dtype}")
    extras["alibi_slopes"] = slopes

  if segment_ids is not None:
    if not (isinstance(segment_ids, (tuple, list)) and len(segment_ids) == 2):
      raise TypeError("flash_attention: segment_ids must be a pair "
                      "(q_segment_ids, kv_segment_ids), got "
                      f"{type(segment_ids).__name__}")
    for name, ids, length in (("q_segment_ids", segment_ids[0], seq_q),
                              ("kv_segment_ids", segment_ids[1], seq_k)):
      ids = _array_arg(f"segment_ids ({name})", ids)
      if ids.shape != (batch, length):
        raise ValueError(
            f"flash_attention: segment_ids ({name}) must have shape "
            f"({batch}, {length}), got {tuple(ids.shape)}")
      if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"flash_attention: segment_ids ({name}) must be "
                        f"integers, got {ids.dtype}")
      extras[name] = ids

  full = (batch, num_heads, seq_q, seq_k)
  for name, x, kind in (("mask", mask, jnp.bool_), ("bias", bias, jnp.floating)):
    if x is None:
      continue
    x = _array_arg(name, x)
    if x.ndim > 4 or any(d not in (1, f) for d, f in zip(x.shape[::-1], full[::-1])):
      raise ValueError(
          f"flash_attention: {name} must be broadcastable to [batch, num_heads, "
          f"seq_q, seq_k] = {full} (each dim 1 or that size), got "
          f"{tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, kind):
      raise TypeError(f"flash_attention: {name} must be "
                      f"{'boolean' if name == 'mask' else 'floating point'}, "
                      f"got {x.dtype}")
    extras[name] = x

  block_size = None
  if block_mask is not None:
    if not isinstance(block_mask, BlockSparseMask):
      raise TypeError("flash_attention: block_mask must be a jax_flash.BlockSparseMask, "
                      f"got {type(block_mask).__name__}")
    blocks = block_mask.blocks
    if not block_mask.fits(seq_q, seq_k):
      raise ValueError(
          f"flash_attention: block_mask has {block_mask.num_blocks} blocks of "
          f"{block_mask.block_size}, which do not cover seq_q={seq_q}, seq_k={seq_k}")
    lead = blocks.shape[:-2]
    if len(lead) > 2 or any(d not in (1, f) for d, f in zip(lead[::-1], (num_heads, batch))):
      raise ValueError(
          f"flash_attention: block_mask's leading dims {tuple(lead)} must broadcast to "
          f"[batch, num_heads] = ({batch}, {num_heads}), each 1 or that size")
    index = block_mask.index
    if not (isinstance(index, BlockIndex) and index.fits(blocks)):
      raise ValueError("flash_attention: block_mask's index does not match its blocks; "
                       "build masks with BlockSparseMask's constructors, & and |")
    ones = (1,) * (2 - len(lead))  # [b', h', ...] with every leading dim
    extras["block_mask"] = blocks.reshape(ones + blocks.shape)
    for name, x in zip(BLOCK_INDEX_NAMES, (index.q_lists, index.q_counts[..., 0],
                                           index.k_lists, index.k_counts[..., 0])):
      extras[name] = x.reshape(ones + x.shape)
    block_size = block_mask.block_size

  rate = _check_dropout_rate(dropout_rate)
  if rate:
    if dropout_rng is None:
      raise ValueError(f"flash_attention: dropout_rate={rate} needs dropout_rng, "
                       "a JAX random key (jax.random.key(seed))")
    try:
      extras["dropout_seed"] = dropout.seed(dropout_rng)
    except (TypeError, ValueError) as e:
      raise TypeError("flash_attention: dropout_rng must be a JAX random key, "
                      f"got {type(dropout_rng).__name__}: {e}") from e

  variant = Variant(window=window, softcap=cap,
                    alibi="alibi_slopes" in extras,
                    segments="q_segment_ids" in extras, mask="mask" in extras,
                    bias="bias" in extras, dropout_rate=rate, block_size=block_size)
  return variant, extras


def _check_dropout_rate(rate) -> float:
  rate = _python_number("dropout_rate", rate, "a Python number in [0, 1)")
  if not 0 <= rate < 1:
    raise ValueError(f"flash_attention: dropout_rate must be in [0, 1), got {rate}")
  return rate


def _python_number(name: str, x, allowed: str) -> float:
  """x as a float, when it is a concrete number (it selects kernel code)."""
  if (isinstance(x, (bool, np.bool_, str, bytes)) or np.ndim(x)
      or isinstance(x, jax.core.Tracer)):
    raise TypeError(f"flash_attention: {name} must be {allowed}, got {x!r}")
  return float(x)


def _array_arg(name: str, x):
  try:
    return jnp.asarray(x)
  except TypeError as e:
    raise TypeError(f"flash_attention: {name} must be an array, got "
                    f"{type(x).__name__}") from e


def _choose_backend(implementation, dtype, head_dim: int, *, empty: bool,
                    sizes: dict, portable_only: tuple[str, ...] = ()) -> str:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"flash_attention: implementation must be one of "
                     f"{IMPLEMENTATIONS}, got {implementation!r}")
  if implementation == "cuda":
    reason = _cuda.unavailable_reason() or _cuda.unsupported_reason(
        dtype, head_dim, **sizes)
    if not reason and portable_only:
      reason = ("the CUDA kernels do not run " + ", ".join(portable_only)
                + " yet (the portable path does)")
    if reason:
      raise ValueError(
          f"flash_attention: implementation='cuda' cannot serve this call: "
          f"{reason}. implementation=None falls back to the portable path.")
  # An empty batch has nothing to launch; the portable path returns its empty
  # results on any platform.
  if implementation == "xla" or empty or portable_only:
    return "xla"
  if implementation == "cuda":
    return "cuda"
  if _cuda.library_loaded() and not _cuda.unsupported_reason(
      dtype, head_dim, **sizes):
    return "auto"
  if not _cuda.library_loaded():
    _warn_if_gpu_without_kernels()
  return "xla"


@functools.lru_cache(maxsize=None)
def _warn_if_gpu_without_kernels():
  """Says once that a GPU runs the portable path because no kernels were built."""
  if _cuda.has_cuda_device():
    warnings.warn(
        f"jax_flash: {_cuda.unavailable_reason()}. flash_attention runs the "
        "portable path on this GPU; reinstall jax_flash where nvcc is on PATH "
        "for the CUDA kernels.", RuntimeWarning, stacklevel=3)


@functools.partial(jax.jit, static_argnames=("op", "plan"))
def _run(arrays, extras, *, op: str, plan: Plan):
  """Calls `op` ("forward" or "backward") of the plan's backend on `arrays`,
  as one op that jit can split over a device mesh (`partition`)."""
  return partition.call(op, plan, arrays, extras, _compute)


def _compute(op: str, plan: Plan, arrays, extras):
  """`op` of the plan's backend on one device's arrays.

  The backward returns (dq, dk, dv, cotangents of the float extras). Always
  staged (under `_run`'s jit): `platform_dependent` picks its branch from the
  platform the computation is lowered for (CPU arrays on a GPU machine take
  the portable path). Run eagerly it would instead evaluate the platform index
  at once on the default device, and the kernels would be chosen for CPU
  arrays.
  """
  static = dict(softmax_scale=plan.softmax_scale, causal=plan.causal)
  if op == "backward":
    static["deterministic"] = plan.deterministic

  def portable(*arrays):
    return getattr(xla, op)(*arrays, extras, variant=plan.variant, **static)

  def kernels(*arrays):
    return getattr(_cuda, op)(*arrays, extras, variant=plan.variant, **static)

  if plan.backend == "auto":
    return lax.platform_dependent(*arrays, cuda=kernels, default=portable)
  return (kernels if plan.backend == "cuda" else portable)(*arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, extras, plan):
  return plan.forward(q, k, v, extras)


def _attention_fwd(q, k, v, extras, plan):
  out, lse = plan.forward(q, k, v, extras)
  return (out, lse), (q, k, v, out, lse, extras)


def _attention_bwd(plan, residuals, cotangents):
  *arrays, extras = residuals
  dq, dk, dv, d_float_extras = plan.backward(*arrays, *cotangents, extras)
  return dq, dk, dv, extras_cotangents(extras, d_float_extras)


def extras_cotangents(extras, d_float_extras):
  """The cotangents of every extra: those computed, float0 for the integer
  and boolean ones (segment ids, masks, the dropout key)."""
  return {name: d_float_extras.get(name, _float0_like(x)) for name, x in extras.items()}


def _float0_like(x):
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, jax.dtypes.float0)


_attention.defvjp(_attention_fwd, _attention_bwd)
