"""flash_attention on CPU: the portable path, the API contract and transformations."""

import functools
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import warnings
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

import jax_flash
from jax_flash import _cuda
from jax_flash import attention
from jax_flash import xla
import util

F16, BF16, F32 = jnp.float16, jnp.bfloat16, jnp.float32
portable = functools.partial(jax_flash.flash_attention, implementation="xla")


def shapes(batch=1, seq_q=16, seq_k=16, num_heads=2, num_kv_heads=2,
           head_dim=8):
  return dict(batch=batch, seq_q=seq_q, seq_k=seq_k, num_heads=num_heads,
              num_kv_heads=num_kv_heads, head_dim=head_dim)


def inputs(seed, dtype=F32, **shape):
  return util.random_inputs(seed, dtype=dtype, **shapes(**shape))


def _loss(attention_fn, q, k, v, dout, dlse):
  """A scalar whose gradient pulls dout through out and dlse through lse."""
  out, lse = attention_fn(q, k, v)
  return (jnp.sum(out.astype(F32) * dout.astype(F32))
          + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0) * dlse))


def _grads(attention_fn, q, k, v, dout, dlse):
  """Gradients of `_loss`; attention_fn(q, k, v) returns (out, lse)."""
  return jax.grad(functools.partial(_loss, attention_fn), argnums=(0, 1, 2))(
      q, k, v, dout, dlse)


def assert_trees_close(test, a, b, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    test.assertEqual(x.shape, y.shape)
    np.testing.assert_allclose(np.asarray(x, np.float32),
                               np.asarray(y, np.float32), atol=atol, rtol=1e-6)


class PortablePathMatchesReferenceTest(parameterized.TestCase):

  @parameterized.named_parameters(
      # name, shape, causal, dtype
      ("single_token", shapes(1, 1, 1), False, F32),
      ("three_tokens_causal", shapes(2, 3, 3), True, F32),
      ("odd_length_head_dim_59", shapes(1, 113, 113, 4, 4, 59), False, F32),
      ("odd_length_causal_bf16", shapes(1, 203, 203, 4, 4, 59), True, BF16),
      ("fewer_queries_than_keys_causal_gqa", shapes(2, 113, 203, 4, 2, 64),
       True, BF16),
      ("more_queries_than_keys_causal_mqa", shapes(1, 203, 113, 4, 1, 32),
       True, F32),
      ("more_queries_than_keys_mqa_bf16", shapes(1, 203, 113, 4, 1, 32),
       False, BF16),
      ("one_query_many_keys_causal", shapes(2, 1, 203, 2, 1, 64), True, BF16),
      ("many_queries_one_key_causal", shapes(1, 203, 1, 2, 2, 8), True, F32),
      ("keys_span_several_blocks_causal", shapes(1, 64, 1025, 4, 2, 40), True,
       BF16),
      ("queries_span_several_blocks_causal", shapes(1, 600, 77, 2, 1, 16), True,
       BF16),
      ("float16_gqa", shapes(1, 113, 77, 6, 3, 24), False, F16),
      ("head_dim_1", shapes(1, 3, 5, 1, 1, 1), True, F32),
      ("head_dim_256_bf16", shapes(1, 33, 47, 2, 1, 256), True, BF16),
  )
  def test_output_lse_and_grads_match_reference(self, shape, causal, dtype):
    util.assert_matches_reference(
        portable, *util.random_inputs(sum(shape.values()), dtype=dtype,
                                      **shape), causal=causal)

  def test_custom_softmax_scale_matches_reference(self):
    util.assert_matches_reference(
        portable, *inputs(1, BF16, seq_q=37, seq_k=51, head_dim=20),
        causal=True, softmax_scale=0.37)

  def test_default_softmax_scale_is_inverse_sqrt_head_dim(self):
    q, k, v, _, _ = inputs(2, head_dim=20)
    assert_trees_close(self, portable(q, k, v),
                       portable(q, k, v, softmax_scale=1 / math.sqrt(20)))

  @parameterized.parameters(
      *[(seqs, blocks, True) for seqs in ((29, 37), (37, 29))
        for blocks in ((1, 1), (5, 16), (16, 5), (7, 40))],
      ((29, 37), (5, 16), False),
  )
  def test_every_tiling_matches_reference(self, seqs, blocks, causal):
    """Block sizes (block_q, block_k) that leave padding and partial tiles."""
    q, k, v, dout, dlse = inputs(3, seq_q=seqs[0], seq_k=seqs[1], num_heads=4,
                                 num_kv_heads=2)
    kwargs = dict(softmax_scale=0.3, causal=causal, block_q=blocks[0],
                  block_k=blocks[1])
    out, lse = jax.jit(functools.partial(xla.forward, **kwargs))(q, k, v)
    grads = jax.jit(functools.partial(xla.backward, **kwargs))(
        q, k, v, out, lse, dout, dlse)
    (ref_out, ref_lse), vjp = jax.vjp(
        functools.partial(jax_flash.attention_reference, softmax_scale=0.3,
                          causal=causal, return_lse=True), q, k, v)
    assert_trees_close(self, (out, jnp.exp(lse), grads),
                       (ref_out, jnp.exp(ref_lse), vjp((dout, dlse))),
                       atol=1e-5)


class FullyMaskedRowsTest(parameterized.TestCase):
  """Causal with seq_q > seq_k: the first seq_q - seq_k queries see no key."""

  @parameterized.parameters(F32, BF16)
  def test_causal_rows_without_keys_are_zero(self, dtype):
    q, k, v, dout, dlse = inputs(4, dtype, seq_q=9, seq_k=4)
    (out, lse), vjp = jax.vjp(
        lambda q, k, v: portable(q, k, v, causal=True, return_lse=True),
        q, k, v)
    np.testing.assert_array_equal(np.asarray(out[:, :5], np.float32), 0)
    np.testing.assert_array_equal(np.asarray(lse[:, :, :5]), -np.inf)
    self.assertTrue(np.isfinite(np.asarray(lse[:, :, 5:])).all())
    # A nonzero lse cotangent on the empty rows must not leak into gradients.
    dq, dk, dv = vjp((dout, dlse))
    for grad in (dq, dk, dv):
      self.assertTrue(np.isfinite(np.asarray(grad, np.float32)).all())
    np.testing.assert_array_equal(np.asarray(dq[:, :5], np.float32), 0)

  def test_rows_with_keys_are_unaffected_by_empty_rows(self):
    q, k, v, _, _ = inputs(5, seq_q=9, seq_k=4)
    full = portable(q, k, v, causal=True)
    # The last 4 queries see the same keys as a square causal problem does.
    square = portable(q[:, 5:], k, v, causal=True)
    assert_trees_close(self, full[:, 5:], square)


class ApiTest(parameterized.TestCase):

  def test_return_lse_shapes_and_dtypes(self):
    for dtype in (F16, BF16, F32):
      q, k, v, _, _ = inputs(6, dtype, batch=2, seq_q=5, seq_k=7, num_heads=6,
                             num_kv_heads=3, head_dim=10)
      out, lse = jax_flash.flash_attention(q, k, v, return_lse=True)
      self.assertEqual((out.shape, out.dtype), ((2, 5, 6, 10), dtype))
      self.assertEqual((lse.shape, lse.dtype), ((2, 6, 5), F32))
      alone = jax_flash.flash_attention(q, k, v)
      self.assertEqual((alone.shape, alone.dtype), ((2, 5, 6, 10), dtype))

  def test_grad_of_lse_matches_reference(self):
    q, k, v, _, dlse = inputs(7, seq_q=11, seq_k=13, num_heads=4,
                              num_kv_heads=1)

    def lse_loss(attention_fn, q, k, v):
      _, lse = attention_fn(q, k, v, causal=True, return_lse=True)
      return jnp.sum(lse * dlse)

    grads = jax.grad(functools.partial(lse_loss, portable), (0, 1, 2))(q, k, v)
    expected = jax.grad(functools.partial(lse_loss, jax_flash.attention_reference),
                        (0, 1, 2))(q, k, v)
    self.assertGreater(float(jnp.abs(grads[0]).max()), 0.1)
    assert_trees_close(self, grads, expected, atol=1e-5)

  def test_deterministic_reaches_the_backward_and_changes_no_value(self):
    q, k, v, dout, dlse = inputs(9, seq_q=13, seq_k=11, num_heads=4, num_kv_heads=2)
    seen = []
    real_backward = xla.backward

    def recording_backward(*args, **kwargs):
      seen.append(kwargs["deterministic"])
      return real_backward(*args, **kwargs)

    def grads(deterministic):
      def loss(q, k, v):
        out, lse = portable(q, k, v, causal=True, return_lse=True,
                            deterministic=deterministic)
        return jnp.sum(out * dout) + jnp.sum(lse * dlse)
      return jax.grad(loss, (0, 1, 2))(q, k, v)

    with mock.patch.object(xla, "backward", recording_backward):
      plain, ordered = grads(False), grads(True)
    self.assertEqual(seen, [False, True])
    for a, b in zip(plain, ordered):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  def test_default_implementation_without_kernels_is_the_portable_path(self):
    q, k, v, _, _ = inputs(8, BF16, seq_q=7, seq_k=9)
    with mock.patch.object(_cuda, "library_loaded", return_value=False):
      lowered = jax.jit(jax_flash.flash_attention).lower(q, k, v).as_text()
      self.assertNotIn("jax_flash_fwd", lowered)
      np.testing.assert_array_equal(
          np.asarray(jax_flash.flash_attention(q, k, v), np.float32),
          np.asarray(portable(q, k, v), np.float32))

  def test_gpu_without_built_kernels_warns_once(self):
    q, k, v, _, _ = inputs(8, BF16, seq_q=7, seq_k=9)
    attention._warn_if_gpu_without_kernels.cache_clear()
    self.addCleanup(attention._warn_if_gpu_without_kernels.cache_clear)
    with mock.patch.object(_cuda, "library_loaded", return_value=False), \
         mock.patch.object(_cuda, "has_cuda_device", return_value=True):
      with self.assertWarnsRegex(RuntimeWarning, "portable path on this GPU"):
        jax_flash.flash_attention(q, k, v)
      with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax_flash.flash_attention(q, k, v)

  def test_empty_batch_gives_empty_results(self):
    q, k, v, _, _ = inputs(9, batch=0)
    out, lse = jax_flash.flash_attention(q, k, v, return_lse=True)
    self.assertEqual((out.shape, lse.shape), ((0, 16, 2, 8), (0, 2, 16)))

  def test_version(self):
    self.assertEqual(jax_flash.__version__, "0.1.0")


def _array(shape, dtype=F32):
  return jnp.zeros(shape, dtype)


_Q = (2, 8, 4, 16)
_KV = (2, 6, 2, 16)


class InputErrorsTest(parameterized.TestCase):
  """Bad input fails at trace time, naming the argument, what it got and what is allowed."""

  @parameterized.named_parameters(
      ("query_of_rank_3", dict(query=_array((8, 4, 16))), ValueError,
       r"query must have rank 4 .*got shape \(8, 4, 16\)"),
      ("key_of_rank_5", dict(key=_array((1, *_KV))), ValueError,
       r"key must have rank 4"),
      ("not_an_array", dict(value=[[1.0]]), TypeError, r"value must be an array"),
      ("integer_query", dict(query=_array(_Q, jnp.int32),
                             key=_array(_KV, jnp.int32),
                             value=_array(_KV, jnp.int32)), TypeError,
       r"query has dtype int32; allowed dtypes are float16, bfloat16, float32"),
      ("float64_query", dict(query=np.zeros(_Q), key=np.zeros(_KV),
                             value=np.zeros(_KV)), TypeError,
       r"query has dtype float64"),
      ("key_dtype_differs", dict(key=_array(_KV, BF16)), TypeError,
       r"key has dtype bfloat16 but query has dtype float32"),
      ("value_dtype_differs", dict(value=_array(_KV, F16)), TypeError,
       r"value has dtype float16 but query has dtype float32"),
      ("key_value_shapes_differ", dict(value=_array((2, 7, 2, 16))), ValueError,
       r"key and value must agree in batch, seq_k and num_kv_heads \(dims 0-2\), "
       r"got key \(2, 6, 2, 16\) and value \(2, 7, 2, 16\)"),
      ("batch_differs", dict(key=_array((3, 6, 2, 16)),
                             value=_array((3, 6, 2, 16))), ValueError,
       r"batch \(dim 0\) and head_dim \(dim 3\)"),
      ("head_dim_differs", dict(key=_array((2, 6, 2, 8)),
                                value=_array((2, 6, 2, 8))), ValueError,
       r"batch \(dim 0\) and head_dim \(dim 3\)"),
      ("heads_not_divisible", dict(key=_array((2, 6, 3, 16)),
                                   value=_array((2, 6, 3, 16))), ValueError,
       r"num_heads 4 .* must be a multiple of num_kv_heads 3"),
      ("empty_key_sequence", dict(key=_array((2, 0, 2, 16)),
                                  value=_array((2, 0, 2, 16))), ValueError,
       r"seq_k must be >= 1, got 0"),
      ("empty_query_sequence", dict(query=_array((2, 0, 4, 16))), ValueError,
       r"seq_q must be >= 1, got 0"),
      ("unknown_implementation", dict(implementation="triton"), ValueError,
       r"implementation must be one of \(None, 'cuda', 'xla'\), got 'triton'"),
      ("zero_softmax_scale", dict(softmax_scale=0.0), ValueError,
       r"softmax_scale must be a positive finite number or None, got 0.0"),
      ("negative_softmax_scale", dict(softmax_scale=-1), ValueError,
       r"softmax_scale .* got -1"),
      ("infinite_softmax_scale", dict(softmax_scale=float("inf")), ValueError,
       r"softmax_scale .* got inf"),
      ("nan_softmax_scale", dict(softmax_scale=float("nan")), ValueError,
       r"softmax_scale .* got nan"),
      ("string_softmax_scale", dict(softmax_scale="0.5"), TypeError,
       r"softmax_scale must be None or a positive finite Python number"),
      ("vector_softmax_scale", dict(softmax_scale=np.ones(2)), TypeError,
       r"softmax_scale must be None"),
      ("non_bool_causal", dict(causal="yes"), TypeError,
       r"causal must be a Python bool, got 'yes'"),
      ("non_bool_return_lse", dict(return_lse=1), TypeError,
       r"return_lse must be a Python bool"),
      ("non_bool_deterministic", dict(deterministic=None), TypeError,
       r"deterministic must be a Python bool, got None"),
  )
  def test_bad_input_raises_at_trace_time(self, changes, error, message):
    args = dict(query=_array(_Q), key=_array(_KV), value=_array(_KV))
    args.update(changes)
    arrays = [args.pop(name) for name in ("query", "key", "value")]
    with self.assertRaisesRegex(error, message):
      jax_flash.flash_attention(*arrays, **args)
    # Abstract evaluation reaches the same check: no array is ever computed.
    # (NumPy inputs are left out: eval_shape turns float64 into float32.)
    if all(isinstance(x, jax.Array) for x in arrays):
      with self.assertRaisesRegex(error, message):
        jax.eval_shape(functools.partial(jax_flash.flash_attention, **args),
                       *arrays)

  def test_traced_softmax_scale_is_rejected(self):
    q, k, v = _array(_Q), _array(_KV), _array(_KV)
    with self.assertRaisesRegex(TypeError, r"softmax_scale must be a Python "
                                r"number, not a traced value"):
      jax.jit(lambda s: jax_flash.flash_attention(q, k, v, softmax_scale=s))(
          0.5)

  def test_numpy_scalar_softmax_scale_is_accepted(self):
    q, k, v, _, _ = inputs(10)
    assert_trees_close(self, portable(q, k, v, softmax_scale=np.float32(0.25)),
                       portable(q, k, v, softmax_scale=0.25))

  def test_cuda_implementation_without_kernels_raises(self):
    reason = _cuda.unavailable_reason()
    if not reason:
      self.skipTest("the CUDA kernels are usable here")
    with self.assertRaisesRegex(ValueError, r"implementation='cuda' cannot "
                                r"serve this call: .*implementation=None"):
      jax_flash.flash_attention(_array(_Q, BF16), _array(_KV, BF16),
                                _array(_KV, BF16), implementation="cuda")

  @parameterized.named_parameters(
      ("float32", F32, 64, r"float16 or bfloat16 inputs, got float32"),
      ("head_dim_above_256", BF16, 320, r"head_dim 1..256, got 320"),
  )
  def test_cuda_implementation_rejects_unsupported_inputs(
      self, dtype, head_dim, message):
    with mock.patch.object(_cuda, "unavailable_reason", return_value=""):
      with self.assertRaisesRegex(ValueError, message):
        jax_flash.flash_attention(
            _array((1, 4, 2, head_dim), dtype), _array((1, 4, 2, head_dim), dtype),
            _array((1, 4, 2, head_dim), dtype), implementation="cuda")

  @parameterized.named_parameters(
      ("sequence_above_grid", (1, _cuda.MAX_SEQ + 1, 2, 64),
       r"sequence lengths up to 4194240, got seq_q=4194241"),
      ("batch_above_grid", (_cuda.MAX_BATCH + 1, 4, 2, 64),
       r"batch and num_heads up to 65535, got batch=65536"),
  )
  def test_cuda_implementation_rejects_shapes_beyond_the_grid(self, shape, message):
    spec = jax.ShapeDtypeStruct(shape, BF16)  # traced only, never allocated
    with mock.patch.object(_cuda, "unavailable_reason", return_value=""):
      with self.assertRaisesRegex(ValueError, message):
        jax.eval_shape(functools.partial(jax_flash.flash_attention,
                                         implementation="cuda"), spec, spec, spec)


class TransformationsTest(parameterized.TestCase):

  def test_jit_matches_eager(self):
    q, k, v, dout, dlse = inputs(11, BF16, seq_q=13, seq_k=21, num_heads=4,
                                 num_kv_heads=2)
    attention = functools.partial(portable, causal=True, return_lse=True)
    assert_trees_close(self, jax.jit(attention)(q, k, v), attention(q, k, v))
    assert_trees_close(self, jax.jit(_grads, static_argnums=0)(
        attention, q, k, v, dout, dlse), _grads(attention, q, k, v, dout, dlse))

  @parameterized.named_parameters(
      ("all_batched", (0, 0, 0)),
      ("shared_key_value", (0, None, None)),
      ("batched_on_axis_2", (2, 2, 2)),
  )
  def test_vmap_equals_a_loop_of_calls(self, in_axes):
    q, k, v, dout, dlse = inputs(12, seq_q=9, seq_k=14, num_heads=4,
                                 num_kv_heads=2)
    stack = lambda x, axis: jnp.stack([x, 2 * x, -x], axis=axis)
    q, k, v = (x if axis is None else stack(x, axis)
               for x, axis in zip((q, k, v), in_axes))
    attention = functools.partial(portable, causal=True, return_lse=True)
    grads = functools.partial(_grads, attention, dout=dout, dlse=dlse)

    def loop(fn):
      results = []
      for i in range(3):
        args = [x if axis is None else jnp.take(x, i, axis)
                for x, axis in zip((q, k, v), in_axes)]
        results.append(fn(*args))
      return jax.tree.map(lambda *xs: jnp.stack(xs), *results)

    assert_trees_close(self, jax.vmap(attention, in_axes)(q, k, v),
                       loop(attention))
    assert_trees_close(self, jax.vmap(grads, in_axes)(q, k, v), loop(grads),
                       atol=1e-5)

  def test_checkpoint_gives_the_same_grads(self):
    q, k, v, dout, dlse = inputs(13, seq_q=17, seq_k=12, num_heads=2,
                                 num_kv_heads=1)
    attention = functools.partial(portable, causal=True, return_lse=True)
    assert_trees_close(self, _grads(jax.checkpoint(attention), q, k, v, dout,
                                    dlse),
                       _grads(attention, q, k, v, dout, dlse))

  def test_pmap_over_devices_equals_per_device_calls(self):
    n = jax.local_device_count()
    if n < 2:
      self.skipTest("needs several devices: XLA_FLAGS="
                    "--xla_force_host_platform_device_count=8 (tests/conftest.py)")
    q, k, v, dout, dlse = inputs(14, batch=n, seq_q=10, seq_k=6, num_heads=4,
                                 num_kv_heads=2)
    per_device = lambda x: x.reshape(n, 1, *x.shape[1:])
    grads = functools.partial(
        _grads, functools.partial(portable, causal=True, return_lse=True))
    got = jax.pmap(grads)(*map(per_device, (q, k, v, dout, dlse)))
    expected = grads(q, k, v, dout, dlse)
    assert_trees_close(self, [g.reshape(g.shape[0] * g.shape[1], *g.shape[2:])
                              for g in got], expected, atol=1e-5)

  def test_shard_map_over_batch_equals_unsharded_call(self):
    n = jax.local_device_count()
    if n < 2:
      self.skipTest("needs several devices")
    mesh = jax.make_mesh((n,), ("batch",))
    spec = jax.sharding.PartitionSpec("batch")
    q, k, v, _, _ = inputs(15, batch=2 * n, seq_q=10, seq_k=6, num_heads=4,
                           num_kv_heads=2)
    attention = functools.partial(portable, causal=True)
    sharded = jax.jit(jax.shard_map(attention, mesh=mesh, in_specs=spec,
                                    out_specs=spec))
    on_mesh = jax.device_put((q, k, v), jax.NamedSharding(mesh, spec))
    assert_trees_close(self, sharded(*on_mesh), attention(q, k, v))


class KernelLibraryTest(absltest.TestCase):

  def _import_with_library(self, path):
    env = dict(os.environ, JAX_FLASH_CUDA_LIB=str(path))
    return subprocess.run(
        [sys.executable, "-c", "import jax_flash"], env=env,
        capture_output=True, text=True, timeout=120,
        cwd=pathlib.Path(__file__).resolve().parents[1])

  def test_a_library_that_does_not_load_is_an_import_error(self):
    with tempfile.TemporaryDirectory() as folder:
      broken = pathlib.Path(folder) / "libbroken.so"
      broken.write_bytes(b"not a shared object")
      result = self._import_with_library(broken)
    self.assertNotEqual(result.returncode, 0)
    self.assertIn("ImportError: jax_flash: could not load the CUDA kernel "
                  "library", result.stderr)
    self.assertIn("JAX_FLASH_SKIP_CUDA=1", result.stderr)

  def test_a_missing_library_leaves_the_portable_path(self):
    result = self._import_with_library("/nonexistent/libjax_flash_cuda.so")
    self.assertEqual(result.returncode, 0, result.stderr)


class BackendChoiceTest(absltest.TestCase):
  """implementation=None with the kernels loaded: the lowering platform decides."""

  def setUp(self):
    super().setUp()
    patcher = mock.patch.object(_cuda, "library_loaded", return_value=True)
    patcher.start()
    self.addCleanup(patcher.stop)
    self.q, self.k, self.v, self.dout, self.dlse = inputs(
        16, BF16, seq_q=12, seq_k=20, num_heads=4, num_kv_heads=2)

  def grad_fn(self):
    return functools.partial(
        _grads, functools.partial(jax_flash.flash_attention, causal=True,
                                  return_lse=True))

  def lowered_text(self, fn, platform):
    return jax.jit(fn).trace(self.q, self.k, self.v, self.dout,
                             self.dlse).lower(
                                 lowering_platforms=(platform,)).as_text()

  def test_lowering_for_cuda_calls_the_kernels(self):
    text = self.lowered_text(self.grad_fn(), "cuda")
    self.assertIn("jax_flash_fwd", text)
    self.assertIn("jax_flash_bwd", text)
    self.assertNotIn("stablehlo.while", text)

  def test_lowering_sizes_the_shared_key_blocks_sums(self):
    # The sm90 backward's workspace for the sums of shared key blocks
    # (cuda/sm90/bwd_split.h): one 2 x 128 x head_dim slot per key block, up to
    # _SPLIT_SLOTS, for the plain non-causal backward only.
    batch, seq_k, kv_heads, _ = self.k.shape
    key_blocks = batch * kv_heads * -(-seq_k // 128)

    def sums_type(slots):
      return f"tensor<{slots}x2x128x64xf32>"

    for causal, slots in ((False, key_blocks), (True, 0)):
      fn = functools.partial(_grads, functools.partial(
          jax_flash.flash_attention, causal=causal, return_lse=True))
      self.assertIn(sums_type(slots), self.lowered_text(fn, "cuda"), causal)
    softcapped = functools.partial(_grads, functools.partial(
        jax_flash.flash_attention, softcap=30.0, return_lse=True))
    self.assertIn(sums_type(0), self.lowered_text(softcapped, "cuda"))

  def test_sequence_beyond_the_kernels_takes_the_portable_path_on_cuda(self):
    spec = jax.ShapeDtypeStruct((1, _cuda.MAX_SEQ + 64, 1, 64), BF16)
    text = jax.jit(jax_flash.flash_attention).trace(spec, spec, spec).lower(
        lowering_platforms=("cuda",)).as_text()
    self.assertNotIn("jax_flash_fwd", text)
    self.assertIn("stablehlo.while", text)

  def test_lowering_for_cpu_takes_the_portable_path(self):
    text = self.lowered_text(self.grad_fn(), "cpu")
    self.assertNotIn("jax_flash_fwd", text)
    self.assertNotIn("jax_flash_bwd", text)
    self.assertIn("stablehlo.while", text)

  def test_shard_map_lowers_the_kernels_with_their_gradient(self):
    # Inside shard_map the kernels' results must vary over the mesh axes as
    # their inputs do, or tracing the platform choice fails.
    mesh = jax.make_mesh((2,), ("batch",), devices=jax.devices()[:2])
    spec = jax.sharding.PartitionSpec("batch")
    q, k, v = (jax.ShapeDtypeStruct((4,) + x.shape[1:], x.dtype,
                                    sharding=jax.NamedSharding(mesh, spec))
               for x in (self.q, self.k, self.v))
    loss = lambda q, k, v: jax_flash.flash_attention(q, k, v, causal=True).astype(
        jnp.float32).sum()
    sharded = jax.shard_map(jax.grad(loss, (0, 1, 2)), mesh=mesh, in_specs=spec,
                            out_specs=spec)
    text = jax.jit(sharded).trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()
    self.assertIn("jax_flash_fwd", text)
    self.assertIn("jax_flash_bwd", text)

  def test_cpu_arrays_compute_correctly_under_vmap_and_grad(self):
    # The kernels' FFI targets exist only for CUDA: reaching them on CPU fails.
    got = jax.vmap(self.grad_fn())(
        *(x[None] for x in (self.q, self.k, self.v, self.dout, self.dlse)))
    expected = _grads(functools.partial(portable, causal=True, return_lse=True),
                      self.q, self.k, self.v, self.dout, self.dlse)
    assert_trees_close(self, [g[0] for g in got], expected)


class MemoryTest(absltest.TestCase):

  def test_portable_path_memory_grows_linearly_with_sequence(self):
    def temp_bytes(seq):
      x = jax.ShapeDtypeStruct((1, seq, 1, 64), F32)
      loss = lambda q, k, v: jnp.sum(portable(q, k, v, causal=True))
      compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(x, x, x).compile()
      return compiled.memory_analysis().temp_size_in_bytes

    short, long = temp_bytes(2048), temp_bytes(8192)
    # 4x the sequence: linear memory grows at most ~4x, a score matrix 16x.
    self.assertLess(long, 5 * short)
    self.assertLess(long, 8192 ** 2 * 4 / 10)


if __name__ == "__main__":
  absltest.main()
