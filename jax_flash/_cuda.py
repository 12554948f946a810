"""The CUDA kernel library: loading, FFI registration and the `ffi_call` wrappers.

The library (`_lib/libjax_flash_cuda.so`) is plain C++/CUDA with C-linkage XLA FFI
handler symbols and no Python ABI, so one build serves every Python version. It is
loaded with ctypes and its handlers are registered with `jax.ffi` once, on first use.

Arrays cross the boundary as `[..., seq, heads, head_dim]` (any leading dims are
batch, which is how the vmap rule works: `vmap_method="broadcast_all"` adds a
leading dim and the handlers fold every leading dim into the batch) and
`lse`/`dlse` as `[..., heads, seq_q]` float32.
"""

from __future__ import annotations

import ctypes
import functools
import os
import pathlib

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from jax_flash import dropout as dropout_lib
from jax_flash import xla
from jax_flash.variants import BLOCK_INDEX_NAMES, Variant

# Head dims the kernels are compiled for; other sizes are zero-padded to the next
# one (zero columns change neither q.k nor the output of the real columns). A
# value head_dim other than the query's pads both to the larger.
NATIVE_HEAD_DIMS = (64, 128, 256)
DTYPES = (jnp.float16, jnp.bfloat16)

_LIB_NAME = "libjax_flash_cuda.so"
_TARGETS = {
    "jax_flash_fwd": "JaxFlashFwd",
    "jax_flash_bwd": "JaxFlashBwd",
}


def _library_path() -> pathlib.Path:
  override = os.environ.get("JAX_FLASH_CUDA_LIB")
  if override:
    return pathlib.Path(override)
  return pathlib.Path(__file__).parent / "_lib" / _LIB_NAME


@functools.lru_cache(maxsize=None)
def _open() -> tuple[ctypes.CDLL | None, str]:
  """The kernel library, loaded once, or None and why not."""
  path = _library_path()
  if not path.exists():
    return None, (f"the CUDA kernel library {path} was not built (jax_flash was "
                  "installed without nvcc); only the portable path is available")
  try:
    return ctypes.cdll.LoadLibrary(str(path)), ""
  except OSError as e:
    return None, f"could not load the CUDA kernel library {path}: {e}"


@functools.lru_cache(maxsize=None)
def _load() -> tuple[bool, str]:
  """Loads and registers the kernel library once; returns (ok, reason if not)."""
  path = _library_path()
  lib, reason = _open()
  if lib is None:
    return False, reason
  try:
    for target, symbol in _TARGETS.items():
      jax.ffi.register_ffi_target(
          target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="CUDA")
  except Exception as e:  # noqa: BLE001 - surfaced verbatim to the user
    return False, (f"the CUDA kernel library {path} does not register with this "
                   f"jaxlib ({jax.lib.__version__}): {e}. Rebuild jax_flash "
                   "against this jaxlib's FFI headers.")
  return True, ""


def check_library() -> None:
  """Raises ImportError if a built kernel library cannot be loaded or registered.

  A library that was never built (no nvcc at install time) is not an error:
  the portable path serves. One that exists but does not fit this jaxlib would
  otherwise silently cost the kernels.
  """
  ok, reason = _load()
  if not ok and _library_path().exists():
    raise ImportError(
        f"jax_flash: {reason.rstrip('.')}. To use the portable path only, reinstall with "
        "JAX_FLASH_SKIP_CUDA=1 or set JAX_FLASH_CUDA_LIB to a path that does "
        "not exist.")


def compiled_kernels() -> frozenset[tuple[str, str, int, str]]:
  """(family, dtype, head_dim, pass) of every kernel in the library, e.g.
  ("sm90", "bf16", 128, "fwd"); empty when there is no loadable library.
  Needs no GPU."""
  lib, _ = _open()
  if lib is None:
    return frozenset()
  lib.JaxFlashCompiledKernels.restype = ctypes.c_char_p
  entries = []
  for line in lib.JaxFlashCompiledKernels().decode().splitlines():
    family, dtype, head_dim, pass_ = line.split()
    entries.append((family, dtype, int(head_dim), pass_))
  return frozenset(entries)


def has_cuda_device() -> bool:
  try:
    return bool(jax.devices("cuda"))
  except RuntimeError:
    return False


def available() -> bool:
  """True when the kernels are loaded and a CUDA device is present."""
  return has_cuda_device() and _load()[0]


def library_loaded() -> bool:
  return _load()[0]


def unavailable_reason() -> str:
  """Why `available()` is False ('' when it is True)."""
  ok, reason = _load()
  if not ok:
    return reason
  if not has_cuda_device():
    return "no CUDA device is visible to JAX"
  return ""


# Grid limits of the kernels (cuda/ffi/flash_ffi.cc checks the same): batch and
# heads sit on grid axes of at most 65535 blocks, and so do the 64-row tiles of a
# sequence under a causal mask.
MAX_BATCH = MAX_HEADS = 65535
MAX_SEQ = 65535 * 64


def unsupported_reason(dtype, head_dim: int, *, batch: int = 1, heads: int = 1,
                       seq_q: int = 1, seq_k: int = 1) -> str:
  """Why the kernels cannot serve these inputs ('' when they can)."""
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in DTYPES]:
    return (f"the CUDA kernels take float16 or bfloat16 inputs, got "
            f"{jnp.dtype(dtype).name}")
  if not 1 <= head_dim <= NATIVE_HEAD_DIMS[-1]:
    return (f"the CUDA kernels take head_dim 1..{NATIVE_HEAD_DIMS[-1]}, got "
            f"{head_dim}")
  if max(seq_q, seq_k) > MAX_SEQ:
    return (f"the CUDA kernels take sequence lengths up to {MAX_SEQ}, got "
            f"seq_q={seq_q}, seq_k={seq_k}")
  if batch > MAX_BATCH or heads > MAX_HEADS:
    return (f"the CUDA kernels take batch and num_heads up to {MAX_BATCH}, got "
            f"batch={batch}, num_heads={heads}")
  return ""


def _padded_head_dim(head_dim: int) -> int:
  return next(d for d in NATIVE_HEAD_DIMS if d >= head_dim)


def _varies_over_mesh_axes(x) -> bool:
  """True inside shard_map for a value that differs between devices."""
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)
  return bool(getattr(manual, "varying", None) if manual is not None
              else getattr(aval, "vma", None))


def _vary_like(results, inputs):
  """Inside shard_map, ffi_call types its results as equal on every device of
  the manual mesh axes; the kernels' results vary as their inputs do. An exact
  zero computed from the inputs, added, gives them the inputs' type (XLA folds
  it away)."""
  if not any(_varies_over_mesh_axes(x) for x in inputs):
    return results
  zero = xla.zero_of(*inputs)
  return tuple(r + zero.astype(r.dtype) for r in results)


def _pad_last(x, size):
  pad = size - x.shape[-1]
  if pad == 0:
    return x
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])


# Positions per entry of the segment-id range tables (cuda/params.h agrees).
_SEGMENT_GRANULE = 64


def _segment_ranges(ids):
  """[b, ceil(s / granule), 4] int32: per granule of positions the smallest
  and the largest id, the largest id up to its end and the smallest from its
  start on (cuda/common/segments.cuh). Edge padding keeps the last granule's
  range that of its real positions."""
  b, s = ids.shape
  n = -(-s // _SEGMENT_GRANULE)
  ids = jnp.pad(ids, [(0, 0), (0, n * _SEGMENT_GRANULE - s)], mode="edge")
  ids = ids.reshape(b, n, _SEGMENT_GRANULE)
  lo, hi = ids.min(axis=-1), ids.max(axis=-1)
  return jnp.stack([lo, hi, lax.cummax(hi, axis=1),
                    lax.cummin(lo, axis=1, reverse=True)], axis=-1)


# Block sizes of a block-sparse mask the kernels take: multiples of this
# (cuda/params.h agrees).
BLOCK_SPARSE_GRANULE = 128


def _variant_operands(variant: Variant, extras, batch: int, heads: int):
  """The kernels' variant arrays (each empty when unused) and attributes."""
  none_i32 = jnp.zeros((0,), jnp.int32)
  segments = [none_i32] * 4
  if variant.segments:
    q_ids, kv_ids = (extras[n].astype(jnp.int32)
                     for n in ("q_segment_ids", "kv_segment_ids"))
    segments = [q_ids, kv_ids, _segment_ranges(q_ids), _segment_ranges(kv_ids)]
  slopes = jnp.zeros((0,), jnp.float32)
  if variant.alibi:
    slopes = jnp.broadcast_to(extras["alibi_slopes"].astype(jnp.float32),
                              (batch, heads))
  seed, threshold, scale = jnp.zeros((0,), jnp.uint32), 0, 0.0
  if variant.dropout_rate:
    seed = extras["dropout_seed"].astype(jnp.uint32)
    threshold = dropout_lib.threshold(variant.dropout_rate)
    scale = 1 / (1 - variant.dropout_rate)
  sparse, block = [none_i32] * 4, (0, 0)
  if variant.block_size:
    # The mask's lists ([b', h', ...], from its BlockIndex) as they are: b' is
    # 1 or the batch, and the kernels map each batch row to its list row.
    sparse = [extras[name] for name in BLOCK_INDEX_NAMES]
    block = variant.block_size
  attrs = dict(window_left=np.int32(variant.window[0]),
               window_right=np.int32(variant.window[1]),
               softcap=np.float32(variant.softcap),
               dropout_threshold=np.uint32(threshold),
               dropout_scale=np.float32(scale),
               block_q=np.int32(block[0]), block_k=np.int32(block[1]))
  return (*segments, slopes, seed, *sparse), attrs


def forward(q, k, v, extras=None, *, softmax_scale: float, causal: bool,
            variant: Variant = Variant()):
  """out [b, sq, h, d] (dtype of q), lse [b, h, sq] float32. Any variant but
  a frame, a dense mask or bias runs on the kernels; `extras` holds its arrays
  by name (`variants.ARRAY_NAMES`)."""
  b, sq, h, d = q.shape
  dv = v.shape[-1]
  dp = _padded_head_dim(max(d, dv))
  operands, attrs = _variant_operands(variant, extras or {}, b, h)
  # The third result is the persistent kernel's tile counter (workspace).
  out, lse, _ = jax.ffi.ffi_call(
      "jax_flash_fwd",
      (jax.ShapeDtypeStruct((b, sq, h, dp), q.dtype),
       jax.ShapeDtypeStruct((b, h, sq), jnp.float32),
       jax.ShapeDtypeStruct((1,), jnp.int32)),
      vmap_method="broadcast_all",
  )(_pad_last(q, dp), _pad_last(k, dp), _pad_last(v, dp), *operands,
    softmax_scale=np.float32(softmax_scale), causal=bool(causal), **attrs)
  return _vary_like((out[..., :dv], lse), (q, k, v))


# Rows of a query block in the deterministic backward's turn counters: the
# smallest query block of any backward kernel (cuda/ffi/flash_ffi.cc agrees).
_DQ_TURN_ROWS = 64

# The sm90 backward shares the steps of the key blocks that would leave SMs
# idle in its last wave among several blocks of threads, which add their
# partial dK/dV to fp32 sums of the key block's (cuda/sm90/bwd_split.h): room
# for the sums of up to _SPLIT_SLOTS key blocks of _SPLIT_KEYS keys, fewer
# than an SM count and no more than there are key blocks. Only the plain
# non-causal, non-deterministic backward at head_dim <= 128 shares; other
# calls (variants run other kernels or builds) get no room.
_SPLIT_SLOTS = 132  # the SMs of an H100 or H200
_SPLIT_KEYS = 128


def _split_slots(batch: int, seq_k: int, kv_heads: int, *, causal: bool,
                 deterministic: bool, head_dim: int, variant: Variant) -> int:
  if causal or deterministic or head_dim > 128 or variant.features:
    return 0
  return min(_SPLIT_SLOTS, batch * kv_heads * -(-seq_k // _SPLIT_KEYS))


def backward(q, k, v, out, lse, dout, dlse, extras=None, *,
             softmax_scale: float, causal: bool, deterministic: bool = False,
             variant: Variant = Variant()):
  """dq, dk, dv with the shapes and dtypes of q, k, v, and the cotangents of
  the float extras by name (the ALiBi slopes')."""
  b, sq, h, d = q.shape
  _, sk, hk, _ = k.shape
  dp = _padded_head_dim(max(d, v.shape[-1]))
  f32 = jnp.float32
  extras = extras or {}
  operands, attrs = _variant_operands(variant, extras, b, h)
  slots = _split_slots(b, sk, hk, causal=causal, deterministic=deterministic,
                       head_dim=dp, variant=variant)
  dq, dk, dv, _, _, _, dslopes, _ = jax.ffi.ffi_call(
      "jax_flash_bwd",
      (jax.ShapeDtypeStruct((b, sq, h, dp), q.dtype),
       jax.ShapeDtypeStruct((b, sk, hk, dp), k.dtype),
       jax.ShapeDtypeStruct((b, sk, hk, dp), v.dtype),
       # Workspaces owned by XLA: the fp32 dQ accumulator, rowsum(dO*O) - dlse
       # and, per query block, whose turn it is to add dQ (deterministic only).
       jax.ShapeDtypeStruct((b, sq, h, dp), f32),
       jax.ShapeDtypeStruct((b, h, sq), f32),
       jax.ShapeDtypeStruct((b, h, -(-sq // _DQ_TURN_ROWS)), jnp.int32),
       jax.ShapeDtypeStruct(operands[4].shape, f32),  # the slopes' gradient
       # The shared key blocks' dK/dV sums (workspace).
       jax.ShapeDtypeStruct((slots, 2, _SPLIT_KEYS, dp), f32)),
      vmap_method="broadcast_all",
  )(*[_pad_last(x, dp) for x in (q, k, v, out, dout)],
    lse.astype(f32), dlse.astype(f32), *operands,
    softmax_scale=np.float32(softmax_scale), causal=bool(causal),
    deterministic=bool(deterministic), **attrs)
  inputs = (q, k, v, out, lse, dout, dlse)
  d_extras = {}
  if variant.alibi:
    slopes = extras["alibi_slopes"]
    if slopes.ndim == 1:
      dslopes = dslopes.sum(axis=0)
    d_extras["alibi_slopes"] = _vary_like((dslopes,), inputs)[0].astype(slopes.dtype)
  return (*_vary_like((dq[..., :d], dk[..., :d], dv[..., :v.shape[-1]]), inputs), d_extras)
