"""flash_attention under jit on arrays sharded over a mesh (of 2 x n/2 devices:
the GPUs of a machine with several, else conftest's 8 simulated CPU devices):
split batch and heads run locally with no collective, a split sequence runs
ring attention, and what cannot be split says so. Results and gradients equal
the unsharded call's."""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_flash
import util

F32, BF16 = jnp.float32, jnp.bfloat16
setUpModule, tearDownModule = util.pin_float32_precision()


def sharded_attention(mesh, q_spec, kv_spec, **fixed):
  """flash_attention with q placed by q_spec and k, v by kv_spec (inside the
  caller's jit, a sharding constraint)."""
  def attention(q, k, v, **kwargs):
    place = lambda x, spec: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return jax_flash.flash_attention(place(q, q_spec), place(k, kv_spec),
                                     place(v, kv_spec), **fixed, **kwargs)
  return attention


def compiled_text(attention, q, k, v, dout, dlse, **kwargs):
  def run(q, k, v, dout, dlse):
    (out, lse), vjp = jax.vjp(functools.partial(attention, return_lse=True, **kwargs),
                              q, k, v)
    return out, lse, *vjp((dout, dlse))
  return jax.jit(run).lower(q, k, v, dout, dlse).compile().as_text()


def collectives(text: str) -> dict:
  return {name: text.count(f" {name}(") + text.count(f" {name}-start(")
          for name in ("all-gather", "all-to-all", "all-reduce", "collective-permute",
                       "reduce-scatter")}


# name, q spec, k/v spec, num_heads, num_kv_heads
SPLITS = [
    ("batch", P("data"), P("data"), 4, 2),
    ("heads_gqa", P(None, None, "model"), P(None, None, "model"), 8, 4),
    ("batch_and_heads", P("data", None, "model"), P("data", None, "model"), 8, 4),
    ("both_axes_on_batch", P(("data", "model")), P(("data", "model")), 4, 2),
    ("heads_mha", P("data", None, "model"), P("data", None, "model"), 4, 4),
]
DTYPES = dict(f32=F32, bf16=BF16)


class BatchAndHeadShardingTest(parameterized.TestCase):

  @parameterized.named_parameters(
      (f"{name}_{dtype}", *rest, dtype) for name, *rest in SPLITS for dtype in DTYPES)
  def test_results_and_gradients_equal_unsharded_with_no_collective(
      self, q_spec, kv_spec, num_heads, num_kv_heads, dtype):
    q, k, v, dout, dlse = util.random_inputs(
        1, batch=8, seq_q=40, seq_k=40, num_heads=num_heads,
        num_kv_heads=num_kv_heads, head_dim=64, dtype=DTYPES[dtype])
    attention = sharded_attention(util.mesh_2x4(), q_spec, kv_spec)
    util.assert_matches_reference(attention, q, k, v, dout, dlse, causal=True)
    found = collectives(compiled_text(attention, q, k, v, dout, dlse, causal=True))
    self.assertEqual(found, dict.fromkeys(found, 0))

  def test_results_keep_the_inputs_sharding(self):
    mesh = util.mesh_2x4()
    spec = P("data", None, "model")
    q, k, v, _, _ = util.random_inputs(2, batch=4, seq_q=32, seq_k=32, num_heads=8,
                                       num_kv_heads=4, head_dim=8, dtype=F32)
    q, k, v = (jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v))
    out, lse = jax.jit(functools.partial(jax_flash.flash_attention, return_lse=True))(
        q, k, v)
    self.assertTrue(out.sharding.is_equivalent_to(NamedSharding(mesh, spec), 4))
    self.assertTrue(lse.sharding.is_equivalent_to(NamedSharding(mesh, P("data", "model")), 3))

  def test_mqa_heads_split_read_the_one_kv_head_whole(self):
    q, k, v, dout, dlse = util.random_inputs(3, batch=2, seq_q=32, seq_k=32,
                                             num_heads=8, num_kv_heads=1,
                                             head_dim=16, dtype=F32)
    attention = sharded_attention(util.mesh_2x4(), P("data", None, "model"), P("data"))
    util.assert_matches_reference(attention, q, k, v, dout, dlse, causal=False)
    found = collectives(compiled_text(attention, q, k, v, dout, dlse))
    # dK/dV of the shared head are summed over the head shards; nothing else.
    self.assertEqual(found["all-gather"] + found["all-to-all"], 0)
    self.assertEqual(found["collective-permute"], 0)

  def test_variants_equal_the_unsharded_call(self):
    """Dropout numbers rows and heads as in the whole call; ALiBi slopes and
    the bias follow the heads, their gradients summed over the batch shards."""
    mesh = util.mesh_2x4()
    q, k, v, dout, dlse = util.random_inputs(4, batch=4, seq_q=48, seq_k=48,
                                             num_heads=8, num_kv_heads=4,
                                             head_dim=16, dtype=F32)
    keys = jax.random.split(jax.random.key(5), 3)
    slopes = jax.random.uniform(keys[0], (8,), F32, 0.05, 0.5)
    bias = jax.random.normal(keys[1], (8, 48, 48), F32)
    ids = jnp.repeat(jnp.arange(4, dtype=jnp.int32), 12)[None].repeat(4, 0)
    fixed = dict(causal=True, window_size=(20, 0), softcap=3.0,
                 segment_ids=(ids, ids), dropout_rate=0.2,
                 dropout_rng=jax.random.key(6), return_lse=True)
    spec = P("data", None, "model")

    def loss(attention, q, k, v, slopes, bias):
      out, lse = attention(q, k, v, alibi_slopes=slopes, bias=bias, **fixed)
      return jnp.sum(out * dout) + jnp.sum(lse * dlse)

    args = (q, k, v, slopes, bias)
    grad = lambda attention: jax.jit(jax.value_and_grad(
        functools.partial(loss, attention), argnums=(0, 1, 2, 3, 4)))
    got = grad(sharded_attention(mesh, spec, spec))(*args)
    expected = grad(jax_flash.flash_attention)(*args)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)

  def test_vmap_of_a_sharded_call_equals_a_loop(self):
    mesh = util.mesh_2x4()
    q, k, v, _, _ = util.random_inputs(7, batch=4, seq_q=16, seq_k=16, num_heads=8,
                                       num_kv_heads=4, head_dim=8, dtype=F32)
    attention = sharded_attention(mesh, P("data", None, "model"), P("data", None, "model"),
                                  causal=True)
    stacked = [x[None].repeat(2, 0) * jnp.array([1.0, 0.5]).reshape(2, 1, 1, 1, 1)
               for x in (q, k, v)]
    got = jax.jit(jax.vmap(attention))(*stacked)
    for i in range(2):
      np.testing.assert_allclose(got[i], attention(*(x[i] for x in stacked)),
                                 atol=1e-6, rtol=1e-6)


class SequenceShardingTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("causal_gqa", True, 8, 4, {}, F32),
      ("causal_gqa_bf16", True, 8, 4, {}, BF16),
      ("window", False, 4, 2, dict(window_size=(10, 6)), F32),
      ("causal_mqa_softcap", True, 4, 1, dict(softcap=2.0), F32),
  )
  def test_a_split_sequence_runs_ring_attention(self, causal, num_heads,
                                                num_kv_heads, variant, dtype):
    q, k, v, dout, dlse = util.random_inputs(8, batch=2, seq_q=128, seq_k=128,
                                             num_heads=num_heads,
                                             num_kv_heads=num_kv_heads, head_dim=64,
                                             dtype=dtype)
    spec = P("data", "model")
    attention = sharded_attention(util.mesh_2x4(), spec, spec)
    util.assert_matches_reference(attention, q, k, v, dout, dlse, causal=causal,
                                  **variant)
    found = collectives(compiled_text(attention, q, k, v, dout, dlse, causal=causal,
                                      **variant))
    self.assertGreater(found["collective-permute"], 0)
    self.assertEqual(found["all-gather"] + found["all-to-all"], 0)

  def test_split_sequence_with_segments_and_dropout_equals_unsharded(self):
    mesh = util.mesh_2x4()
    q, k, v, _, _ = util.random_inputs(9, batch=2, seq_q=64, seq_k=64, num_heads=4,
                                       num_kv_heads=2, head_dim=8, dtype=F32)
    ids = jnp.repeat(jnp.arange(4, dtype=jnp.int32), 16)[None].repeat(2, 0)
    spec = P("data", "model")
    ids_sharded = jax.device_put(ids, NamedSharding(mesh, spec))
    kwargs = dict(causal=True, dropout_rate=0.3, dropout_rng=jax.random.key(1))
    grad = lambda attention, ids: jax.jit(jax.grad(
        lambda q, k, v: attention(q, k, v, segment_ids=(ids, ids), **kwargs).sum(),
        argnums=(0, 1, 2)))(q, k, v)
    got = grad(sharded_attention(mesh, spec, spec), ids_sharded)
    expected = grad(jax_flash.flash_attention, ids)
    for a, b in zip(got, expected):
      np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)


class ExplicitAxesTest(parameterized.TestCase):
  """Inputs sharded over a mesh of explicit axes (`jax.make_mesh`'s default):
  the call runs on them as on auto axes, and its results are typed as sharded
  like the query."""

  @parameterized.named_parameters(
      ("batch_and_heads", P("data", None, "model"), False, False),
      ("batch_and_heads_dropout_segments", P("data", None, "model"), False, True),
      ("sequence", P("data", "model"), True, False),
  )
  def test_results_and_gradients_equal_unsharded(self, spec, ring, variants):
    mesh = util.mesh_2x4(jax.sharding.AxisType.Explicit)
    batch, seq, heads = (tuple(spec) + (None,) * 3)[:3]
    q, k, v, dout, dlse = util.random_inputs(11, batch=4, seq_q=64, seq_k=64, num_heads=8,
                                             num_kv_heads=4, head_dim=16, dtype=F32)
    ids = jnp.repeat(jnp.arange(4, dtype=jnp.int32), 16)[None].repeat(4, 0)

    def run(q, k, v, dout, dlse, ids):
      extra = dict(dropout_rate=0.2, dropout_rng=jax.random.key(2),
                   segment_ids=(ids, ids)) if variants else {}
      (out, lse), vjp = jax.vjp(functools.partial(
          jax_flash.flash_attention, causal=True, return_lse=True, **extra), q, k, v)
      return out, lse, *vjp((dout, dlse))

    place = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    args = (place(q, spec), place(k, spec), place(v, spec), place(dout, spec),
            place(dlse, P(batch, heads, seq)), place(ids, P(batch, seq)))
    got = jax.jit(run)(*args)
    expected = jax.jit(run)(q, k, v, dout, dlse, ids)
    for name, a, b in zip(util.RESULT_NAMES, got, expected):
      np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5, err_msg=name)
    self.assertEqual(jax.typeof(got[0]).sharding.spec, P(batch, seq, heads, None))
    found = collectives(jax.jit(run).lower(*args).compile().as_text())
    self.assertEqual(found["all-gather"] + found["all-to-all"], 0)
    self.assertEqual(found["collective-permute"] > 0, ring)


class ShardingErrorsTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("head_dim", P(None, None, None, "model"), P(None, None, None, "model"),
       "sharded along head_dim"),
      ("queries_only", P(None, "model"), P(), "the query sequence is sharded"),
      ("heads_not_dividing_kv_heads", P(None, None, "model"), P(),
       "does not divide the 3 key/value heads"),
  )
  def test_what_cannot_be_split_says_so(self, q_spec, kv_spec, message):
    mesh = util.mesh_2x4()
    # 3 K/V heads, query heads a multiple of 3 and of the "model" axis.
    q, k, v, _, _ = util.random_inputs(10, batch=2, seq_q=32, seq_k=32,
                                       num_heads=3 * mesh.shape["model"],
                                       num_kv_heads=3, head_dim=16, dtype=F32)
    attention = sharded_attention(mesh, q_spec, kv_spec)
    with self.assertRaisesRegex(Exception, message):
      jax.jit(attention)(q, k, v).block_until_ready()


if __name__ == "__main__":
  absltest.main()
