"""Ring attention over a sequence split across simulated CPU devices (conftest
gives 8): values and gradients equal attention over the whole sequence, in both
layouts and both modes, with GQA; the collectives in the compiled program are
the ones each mode promises."""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import jax_flash
import util

F32, BF16 = jnp.float32, jnp.bfloat16
# Float32 products at float32 precision on every backend, so that the float32
# cases are held to float32's error.
_PRECISION = jax.default_matmul_precision("highest")


def setUpModule():
  _PRECISION.__enter__()


def tearDownModule():
  _PRECISION.__exit__(None, None, None)


def sequence_mesh(n: int):
  return jax.make_mesh((n,), ("sp",), devices=jax.devices()[:n],
                       axis_types=(jax.sharding.AxisType.Auto,))


def ring_fn(n: int, *, layout="contiguous", **kwargs):
  """attention(q, k, v, causal, softmax_scale, return_lse) -> (out, lse) over the
  whole sequence, computed by ring_attention on n devices (the zig-zag layout
  permuted in and out), like `flash_attention(..., return_lse=True)`."""
  mesh = sequence_mesh(n)
  zigzag = layout == "zigzag"
  permute = lambda x: jax_flash.zigzag_permute(x, n) if zigzag else x
  unpermute = lambda x, axis=1: jax_flash.zigzag_unpermute(x, n, axis) if zigzag else x
  place = lambda x: jax.lax.with_sharding_constraint(
      permute(x), jax.NamedSharding(mesh, P(None, "sp")))

  def attention(q, k, v, causal=False, softmax_scale=None, return_lse=True):
    del return_lse
    sharded = jax.shard_map(
        functools.partial(jax_flash.ring_attention, axis_name="sp", layout=layout,
                          causal=causal, softmax_scale=softmax_scale,
                          return_lse=True, **kwargs),
        mesh=mesh, in_specs=(P(None, "sp"),) * 3,
        out_specs=(P(None, "sp"), P(None, None, "sp")))
    out, lse = sharded(place(q), place(k), place(v))
    return unpermute(out), unpermute(lse, 2)

  return attention


class RingMatchesReferenceTest(parameterized.TestCase):

  @parameterized.product(
      devices=(4, 8), causal=(False, True), layout=("contiguous", "zigzag"),
      mode=("ring", "allgather"))
  def test_values_and_gradients_equal_whole_sequence_attention(
      self, devices, causal, layout, mode):
    q, k, v, dout, dlse = util.random_inputs(
        devices, batch=2, seq_q=64, seq_k=64, num_heads=4, num_kv_heads=2,
        head_dim=16, dtype=F32)
    util.assert_matches_reference(ring_fn(devices, layout=layout, mode=mode),
                                  q, k, v, dout, dlse, causal=causal)

  def test_bfloat16_causal_zigzag_within_the_error_of_plain_attention(self):
    q, k, v, dout, dlse = util.random_inputs(
        3, batch=1, seq_q=128, seq_k=128, num_heads=4, num_kv_heads=1,
        head_dim=32, dtype=BF16)
    util.assert_matches_reference(ring_fn(4, layout="zigzag"), q, k, v, dout, dlse,
                                  causal=True)

  def test_more_keys_than_queries_without_a_causal_mask(self):
    q, _, _, dout, dlse = util.random_inputs(5, batch=1, seq_q=32, seq_k=32,
                                             num_heads=2, num_kv_heads=2,
                                             head_dim=8, dtype=F32)
    _, k, v, _, _ = util.random_inputs(6, batch=1, seq_q=64, seq_k=64, num_heads=2,
                                       num_kv_heads=2, head_dim=8, dtype=F32)
    util.assert_matches_reference(ring_fn(4), q, k, v, dout, dlse, causal=False)

  def test_a_one_device_axis_is_plain_flash_attention(self):
    q, k, v, dout, dlse = util.random_inputs(7, batch=2, seq_q=24, seq_k=24,
                                             num_heads=2, num_kv_heads=2, head_dim=8,
                                             dtype=F32)
    util.assert_matches_reference(ring_fn(1), q, k, v, dout, dlse, causal=True)


class CollectivesTest(absltest.TestCase):

  def compiled_text(self, mode):
    q = jnp.zeros((1, 64, 2, 8), F32)
    fn = ring_fn(4, mode=mode)
    grad = jax.grad(lambda q, k, v: fn(q, k, v, causal=True)[0].sum(), (0, 1, 2))
    return jax.jit(grad).lower(q, q, q).compile().as_text()

  def test_ring_mode_passes_slices_and_gathers_nothing(self):
    text = self.compiled_text("ring")
    self.assertIn("collective-permute", text)
    self.assertNotIn("all-gather", text)

  def test_allgather_mode_gathers_and_reduce_scatters(self):
    text = self.compiled_text("allgather")
    self.assertIn("all-gather", text)
    self.assertIn("reduce-scatter", text)
    self.assertNotIn("collective-permute", text)


class ZigzagTest(absltest.TestCase):

  def test_permute_then_unpermute_is_the_identity(self):
    x = jnp.arange(2 * 48 * 3).reshape(2, 48, 3)
    y = jax_flash.zigzag_permute(x, 4)
    self.assertFalse(bool(jnp.all(x == y)))
    np.testing.assert_array_equal(jax_flash.zigzag_unpermute(y, 4), x)

  def test_each_shard_holds_chunks_i_and_2n_minus_1_minus_i(self):
    order = np.asarray(jax_flash.zigzag_permute(jnp.arange(16), 4, axis=0))
    np.testing.assert_array_equal(order.reshape(4, 2, 2)[:, :, 0],
                                  [[0, 14], [2, 12], [4, 10], [6, 8]])


class RingArgumentsTest(absltest.TestCase):

  def test_bad_layout_mode_and_lengths_raise_naming_them(self):
    q = jnp.zeros((1, 16, 2, 8))
    for kwargs, message in ((dict(layout="striped"), "layout"),
                            (dict(mode="tree"), "mode")):
      with self.assertRaisesRegex(ValueError, message):
        ring_fn(4, **kwargs)(q, q, q)
    with self.assertRaisesRegex(ValueError, "zig-zag layout"):
      jax_flash.zigzag_permute(jnp.zeros((1, 12, 2, 8)), 4)
    with self.assertRaisesRegex(ValueError, "causal needs as many queries as keys"):
      ring_fn(4)(q, jnp.zeros((1, 32, 2, 8)), jnp.zeros((1, 32, 2, 8)), causal=True)

  def test_outside_shard_map_names_the_missing_axis(self):
    q = jnp.zeros((1, 16, 2, 8))
    with self.assertRaisesRegex(ValueError, "no mesh axis 'sp'"):
      jax_flash.ring_attention(q, q, q, axis_name="sp")


if __name__ == "__main__":
  absltest.main()
