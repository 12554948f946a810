"""`flash_attention`: argument checks, the custom VJP, and the choice of backend."""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_flash import _cuda
from jax_flash import xla

DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)
IMPLEMENTATIONS = (None, "cuda", "xla")
# Backends `_run` dispatches to; "auto" defers the CUDA-or-portable choice to
# lowering time, when the platform is known.
_MODULES = {"xla": xla, "cuda": _cuda}


def flash_attention(query, key, value, *, causal: bool = False,
                    softmax_scale: float | None = None,
                    return_lse: bool = False, implementation: str | None = None,
                    deterministic: bool = False):
  """Exact softmax attention that never materializes the score matrix.

  Args:
    query: [batch, seq_q, num_heads, head_dim].
    key: [batch, seq_k, num_kv_heads, head_dim] with num_heads % num_kv_heads
      == 0 (MQA/GQA): query head i reads key/value head
      i // (num_heads // num_kv_heads).
    value: [batch, seq_k, num_kv_heads, head_dim].
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

  Returns:
    out [batch, seq_q, num_heads, head_dim] in the dtype of query, or
    (out, lse) with lse [batch, num_heads, seq_q] float32 (natural log). A query
    row that sees no key gives out 0 and lse -inf. Both are differentiable.

  q, k and v share one dtype: float16, bfloat16 or float32.
  """
  query, key, value = _check_arrays(query, key, value)
  for name, flag in (("causal", causal), ("return_lse", return_lse),
                     ("deterministic", deterministic)):
    if not isinstance(flag, (bool, np.bool_)):
      raise TypeError(f"flash_attention: {name} must be a Python bool, got "
                      f"{flag!r} of type {type(flag).__name__}")
  head_dim = query.shape[-1]
  softmax_scale = _check_softmax_scale(softmax_scale, head_dim)
  backend = _choose_backend(
      implementation, query.dtype, head_dim, empty=query.shape[0] == 0,
      sizes=dict(batch=query.shape[0], heads=query.shape[2],
                 seq_q=query.shape[1], seq_k=key.shape[1]))
  out, lse = _attention(query, key, value, softmax_scale, bool(causal),
                        bool(deterministic), backend)
  return (out, lse) if return_lse else out


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
  if key.shape != value.shape:
    raise ValueError(f"flash_attention: key and value must have the same shape, "
                     f"got key {tuple(key.shape)} and value {tuple(value.shape)}")
  _, seq_k, num_kv_heads, _ = key.shape
  if key.shape[0] != batch or key.shape[3] != head_dim:
    raise ValueError(
        f"flash_attention: key/value {tuple(key.shape)} must match query "
        f"{tuple(query.shape)} in batch (dim 0) and head_dim (dim 3)")
  for name, size in (("seq_q", seq_q), ("num_heads", num_heads),
                     ("head_dim", head_dim), ("seq_k", seq_k),
                     ("num_kv_heads", num_kv_heads)):
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


def _choose_backend(implementation, dtype, head_dim: int, *, empty: bool,
                    sizes: dict) -> str:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"flash_attention: implementation must be one of "
                     f"{IMPLEMENTATIONS}, got {implementation!r}")
  if implementation == "cuda":
    reason = _cuda.unavailable_reason() or _cuda.unsupported_reason(
        dtype, head_dim, **sizes)
    if reason:
      raise ValueError(
          f"flash_attention: implementation='cuda' cannot serve this call: "
          f"{reason}. implementation=None falls back to the portable path.")
  # An empty batch has nothing to launch; the portable path returns its empty
  # results on any platform.
  if implementation == "xla" or empty:
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


@functools.partial(jax.jit, static_argnames=("op", "backend", "softmax_scale",
                                             "causal", "deterministic"))
def _run(*arrays, op: str, backend: str, softmax_scale: float, causal: bool,
         deterministic: bool = False):
  """Calls `op` ("forward" or "backward") of the backend on `arrays`.

  Always staged: `platform_dependent` picks its branch from the platform the
  computation is lowered for (CPU arrays on a GPU machine take the portable
  path). Run eagerly it would instead evaluate the platform index at once on
  the default device, and the kernels would be chosen for CPU arrays.
  """
  extra = dict(deterministic=deterministic) if op == "backward" else {}

  def branch(module):
    return functools.partial(getattr(module, op), softmax_scale=softmax_scale,
                             causal=causal, **extra)

  if backend == "auto":
    return lax.platform_dependent(*arrays, cuda=branch(_cuda),
                                  default=branch(xla))
  return branch(_MODULES[backend])(*arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _attention(q, k, v, softmax_scale, causal, deterministic, backend):
  del deterministic  # a property of the backward
  return _run(q, k, v, op="forward", backend=backend,
              softmax_scale=softmax_scale, causal=causal)


def _attention_fwd(q, k, v, softmax_scale, causal, deterministic, backend):
  del deterministic
  out, lse = _run(q, k, v, op="forward", backend=backend,
                  softmax_scale=softmax_scale, causal=causal)
  return (out, lse), (q, k, v, out, lse)


def _attention_bwd(softmax_scale, causal, deterministic, backend, residuals,
                   cotangents):
  dout, dlse = cotangents
  return _run(*residuals, dout, dlse, op="backward", backend=backend,
              softmax_scale=softmax_scale, causal=causal,
              deterministic=deterministic)


_attention.defvjp(_attention_fwd, _attention_bwd)
