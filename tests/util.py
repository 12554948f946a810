"""The correctness rule shared by the CPU and GPU tests.

A result is compared with an fp32 reference computed from the same inputs and may
err at most as much as plain same-dtype XLA attention does:
max|out - ref32| <= factor * max|ref_lowp - ref32| + 1e-5, with factor 2 for the
output and lse and 3 for dq/dk/dv.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_flash.reference import attention_reference

ABSOLUTE_SLACK = 1e-5
OUTPUT_FACTOR = 2
GRAD_FACTOR = 3
RESULT_NAMES = ("out", "lse", "dq", "dk", "dv")


def _f32(x) -> np.ndarray:
  return np.asarray(x).astype(np.float32)


def assert_close_to_reference(out, ref32, ref_lowp, factor, *, name="result"):
  """Asserts max|out - ref32| <= factor * max|ref_lowp - ref32| + 1e-5.

  Non-finite entries (lse -inf of rows that see no key) must match ref32
  exactly; the bound applies to the finite ones.
  """
  out, ref32, ref_lowp = _f32(out), _f32(ref32), _f32(ref_lowp)
  if out.shape != ref32.shape:
    raise AssertionError(f"{name}: shape {out.shape} != reference {ref32.shape}")
  finite = np.isfinite(ref32)
  for kind, test in (("NaN", np.isnan), ("+inf", np.isposinf),
                     ("-inf", np.isneginf)):
    wrong = test(out) != test(ref32)
    if wrong.any():
      raise AssertionError(
          f"{name}: {kind} at {int(wrong.sum())} entries where the fp32 "
          f"reference disagrees, first at {np.argwhere(wrong)[0].tolist()}")
  if not finite.any():
    return
  error = np.abs(out[finite] - ref32[finite]).max()
  lowp_finite = finite & np.isfinite(ref_lowp)
  lowp_error = np.abs(ref_lowp[lowp_finite] - ref32[lowp_finite]).max(
      initial=0.0)
  bound = factor * lowp_error + ABSOLUTE_SLACK
  if not error <= bound:
    raise AssertionError(
        f"{name}: max|out - ref32| = {error:.3g} exceeds {factor} * "
        f"max|ref_lowp - ref32| + {ABSOLUTE_SLACK:g} = {bound:.3g}")


def random_inputs(seed: int, *, batch: int, seq_q: int, seq_k: int,
                  num_heads: int, num_kv_heads: int, head_dim: int, dtype):
  """Fresh normal q, k, v, dout (in dtype) and dlse (float32)."""
  keys = jax.random.split(jax.random.key(seed), 5)
  q_shape = (batch, seq_q, num_heads, head_dim)
  kv_shape = (batch, seq_k, num_kv_heads, head_dim)
  q, k, v, dout = (jax.random.normal(key, shape, jnp.float32).astype(dtype)
                   for key, shape in zip(keys, (q_shape, kv_shape, kv_shape,
                                                q_shape)))
  dlse = jax.random.normal(keys[4], (batch, num_heads, seq_q), jnp.float32)
  return q, k, v, dout, dlse


def outputs_and_grads(attention_fn, q, k, v, dout, dlse):
  """(out, lse, dq, dk, dv) of `attention_fn(q, k, v) -> (out, lse)`.

  The cotangents are dout (cast to out's dtype) and dlse.
  """
  @jax.jit
  def run(q, k, v, dout, dlse):
    (out, lse), vjp = jax.vjp(attention_fn, q, k, v)
    return (out, lse, *vjp((dout.astype(out.dtype), dlse)))

  return run(q, k, v, dout, dlse)


def assert_matches_reference(attention_fn, q, k, v, dout, dlse, *,
                             causal: bool, softmax_scale=None, **variant):
  """Checks out, lse and the gradients of attention_fn against the rule.

  attention_fn takes (q, k, v, *, causal, softmax_scale, return_lse) like
  `jax_flash.flash_attention`; `variant` holds further keyword arguments that
  both it and the reference take (window_size, softcap, segment_ids, ...).
  Returns the results for further checks.
  """
  kwargs = dict(causal=causal, softmax_scale=softmax_scale, return_lse=True,
                **variant)
  got = outputs_and_grads(functools.partial(attention_fn, **kwargs),
                          q, k, v, dout, dlse)
  ref32 = outputs_and_grads(
      functools.partial(attention_reference, compute_dtype=jnp.float32,
                        **kwargs),
      *(x.astype(jnp.float32) for x in (q, k, v, dout)), dlse)
  ref_lowp = outputs_and_grads(functools.partial(attention_reference, **kwargs),
                               q, k, v, dout, dlse)
  expected_dtypes = (q.dtype, jnp.float32, q.dtype, k.dtype, v.dtype)
  for name, x, dtype in zip(RESULT_NAMES, got, expected_dtypes):
    if x.dtype != dtype:
      raise AssertionError(f"{name}: dtype {x.dtype}, expected {dtype}")
  for name, *results in zip(RESULT_NAMES, got, ref32, ref_lowp):
    factor = OUTPUT_FACTOR if name in ("out", "lse") else GRAD_FACTOR
    assert_close_to_reference(*results, factor, name=name)
  return got


def mesh_devices():
  """The devices the multi-device tests run on: every device of the default
  backend when it has several (GPUs), else the simulated CPU devices."""
  devices = jax.devices()
  return devices if len(devices) > 1 else jax.devices("cpu")


def mesh_2x4(axis_type=jax.sharding.AxisType.Auto):
  """A ("data", "model") mesh of 2 x 4 of `mesh_devices` (2 x 2 on 4, 1 x 2 on
  2: the "model" axis splits heads and sequences, which need it the most)."""
  devices = mesh_devices()[:8]
  shape = (2, len(devices) // 2) if len(devices) >= 4 else (1, len(devices))
  return jax.make_mesh(shape, ("data", "model"), devices=devices,
                       axis_types=(axis_type,) * 2)


def pin_float32_precision():
  """(setUpModule, tearDownModule) for a test module whose float32 cases are
  held to float32's error: float32 products at float32 precision on every
  backend while it runs (GPUs default to TF32)."""
  precision = jax.default_matmul_precision("highest")
  return precision.__enter__, lambda: precision.__exit__(None, None, None)


def packed_segments(seed, batch, length, documents):
  """Sorted ids of `documents` documents of random lengths per batch row."""
  cuts = jax.random.randint(jax.random.key(seed), (batch, documents - 1), 1, length)
  return (jnp.arange(length)[None, :, None] >= jnp.sort(cuts)[:, None, :]).sum(
      -1).astype(jnp.int32)
