"""Ring attention over a sequence split across devices (the GPUs of a machine
with several, else conftest's 8 simulated CPU devices): values and gradients
equal attention over the whole sequence, in both layouts and both modes, with
GQA and the variants; the collectives in the compiled program are the ones
each mode promises."""

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
setUpModule, tearDownModule = util.pin_float32_precision()


def sequence_mesh(n: int):
  devices = util.mesh_devices()
  if len(devices) < n:
    raise absltest.SkipTest(f"needs {n} devices, {len(devices)} here")
  return jax.make_mesh((n,), ("sp",), devices=devices[:n],
                       axis_types=(jax.sharding.AxisType.Auto,))


# Devices of the ring in the tests written for one size: 4, or as many as a
# machine with fewer GPUs has.
RING = min(4, len(util.mesh_devices()))


def ring_fn(n: int, *, layout="contiguous", **kwargs):
  """attention(q, k, v, causal, softmax_scale, return_lse, ...) -> (out, lse)
  over the whole sequence, computed by ring_attention on n devices (the zig-zag
  layout permuted in and out), like `flash_attention(..., return_lse=True)`.
  Segment ids are split along the sequence with q, k and v; ALiBi slopes are
  replicated; `dropout_mask` (the reference's argument) is ignored."""
  mesh = sequence_mesh(n)
  zigzag = layout == "zigzag"
  permute = lambda x: jax_flash.zigzag_permute(x, n) if zigzag else x
  unpermute = lambda x, axis=1: jax_flash.zigzag_unpermute(x, n, axis) if zigzag else x
  by_sequence = P(None, "sp")
  place = lambda x: jax.lax.with_sharding_constraint(
      permute(x), jax.NamedSharding(mesh, by_sequence))

  def attention(q, k, v, causal=False, softmax_scale=None, return_lse=True,
                segment_ids=None, alibi_slopes=None, dropout_mask=None, **variant):
    del return_lse, dropout_mask
    arrays, specs = [q, k, v], [by_sequence] * 3
    if segment_ids is not None:
      arrays.append(tuple(place(ids) for ids in segment_ids))
      specs.append((by_sequence, by_sequence))
    if alibi_slopes is not None:
      arrays.append(alibi_slopes)
      specs.append(P())

    def local(q, k, v, *rest):
      rest = list(rest)
      named = dict(variant)
      if segment_ids is not None:
        named["segment_ids"] = rest.pop(0)
      if alibi_slopes is not None:
        named["alibi_slopes"] = rest.pop(0)
      return jax_flash.ring_attention(
          q, k, v, axis_name="sp", layout=layout, causal=causal,
          softmax_scale=softmax_scale, return_lse=True, **kwargs, **named)

    sharded = jax.shard_map(local, mesh=mesh, in_specs=tuple(specs),
                            out_specs=(by_sequence, P(None, None, "sp")))
    out, lse = sharded(*(place(x) for x in arrays[:3]), *arrays[3:])
    return unpermute(out), unpermute(lse, 2)

  return attention


class RingMatchesReferenceTest(parameterized.TestCase):

  @parameterized.product(
      devices=(2, 4, 8), causal=(False, True), layout=("contiguous", "zigzag"),
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
    util.assert_matches_reference(ring_fn(RING, layout="zigzag"), q, k, v, dout, dlse,
                                  causal=True)

  def test_more_keys_than_queries_without_a_causal_mask(self):
    q, _, _, dout, dlse = util.random_inputs(5, batch=1, seq_q=32, seq_k=32,
                                             num_heads=2, num_kv_heads=2,
                                             head_dim=8, dtype=F32)
    _, k, v, _, _ = util.random_inputs(6, batch=1, seq_q=64, seq_k=64, num_heads=2,
                                       num_kv_heads=2, head_dim=8, dtype=F32)
    util.assert_matches_reference(ring_fn(RING), q, k, v, dout, dlse, causal=False)

  @parameterized.parameters(F32, BF16)
  def test_a_one_device_axis_is_plain_flash_attention(self, dtype):
    q, k, v, dout, dlse = util.random_inputs(7, batch=2, seq_q=96, seq_k=96,
                                             num_heads=2, num_kv_heads=2, head_dim=64,
                                             dtype=dtype)
    util.assert_matches_reference(ring_fn(1), q, k, v, dout, dlse, causal=True)

  @parameterized.parameters("ring", "allgather")
  def test_bfloat16_gqa_zigzag_on_every_device(self, mode):
    n = min(8, len(util.mesh_devices()))
    q, k, v, dout, dlse = util.random_inputs(
        8, batch=2, seq_q=64 * n, seq_k=64 * n, num_heads=8, num_kv_heads=2,
        head_dim=128, dtype=BF16)
    util.assert_matches_reference(ring_fn(n, layout="zigzag", mode=mode), q, k, v,
                                  dout, dlse, causal=True)


VARIANTS = dict(
    window_causal=(True, lambda: dict(window_size=(9, 0))),
    window=(False, lambda: dict(window_size=(20, 5))),
    softcap_causal=(True, lambda: dict(softcap=1.5)),
    alibi_causal=(True, lambda: dict(
        alibi_slopes=jax.random.uniform(jax.random.key(1), (4,), F32, 0.05, 0.5))),
    segments_causal=(True, lambda: dict(segment_ids=(
        util.packed_segments(2, 2, 64, 4), util.packed_segments(2, 2, 64, 4)))),
    segments_window=(False, lambda: dict(window_size=(12, 12), segment_ids=(
        util.packed_segments(3, 2, 64, 3), util.packed_segments(3, 2, 64, 3)))),
    softcap_alibi_window_causal=(True, lambda: dict(
        softcap=2.0, window_size=(30, None),
        alibi_slopes=jax.random.uniform(jax.random.key(4), (2, 4), F32, 0.05, 0.5))),
)


class RingVariantsTest(parameterized.TestCase):

  @parameterized.product(variant=tuple(VARIANTS), layout=("contiguous", "zigzag"),
                         mode=("ring", "allgather"))
  def test_values_and_gradients_equal_whole_sequence_attention(
      self, variant, layout, mode):
    causal, kwargs = VARIANTS[variant]
    q, k, v, dout, dlse = util.random_inputs(
        11, batch=2, seq_q=64, seq_k=64, num_heads=4, num_kv_heads=2,
        head_dim=16, dtype=F32)
    util.assert_matches_reference(ring_fn(RING, layout=layout, mode=mode),
                                  q, k, v, dout, dlse, causal=causal, **kwargs())

  @parameterized.parameters("contiguous", "zigzag")
  def test_dropout_matches_reference_with_the_whole_sequence_mask(self, layout):
    q, k, v, dout, dlse = util.random_inputs(
        12, batch=2, seq_q=64, seq_k=64, num_heads=4, num_kv_heads=2,
        head_dim=16, dtype=F32)
    rng, rate = jax.random.key(5), 0.25
    mask = jax_flash.dropout_mask(rng, rate, batch=2, num_heads=4, seq_q=64, seq_k=64)
    util.assert_matches_reference(
        ring_fn(RING, layout=layout, dropout_rng=rng), q, k, v, dout, dlse,
        causal=True, dropout_rate=rate, dropout_mask=mask, window_size=(20, 0))

  def test_alibi_slope_gradient_is_summed_over_the_ring(self):
    q, k, v, dout, dlse = util.random_inputs(
        13, batch=2, seq_q=64, seq_k=64, num_heads=4, num_kv_heads=2,
        head_dim=16, dtype=F32)
    slopes = jax.random.uniform(jax.random.key(2), (4,), F32, 0.1, 0.5)

    def loss(attention, slopes):
      out, lse = attention(q, k, v, causal=True, alibi_slopes=slopes, return_lse=True)
      return jnp.sum(out * dout) + jnp.sum(lse * dlse)

    got = jax.jit(jax.grad(functools.partial(loss, ring_fn(RING, layout="zigzag"))))(slopes)
    expected = jax.grad(functools.partial(loss, jax_flash.attention_reference))(slopes)
    self.assertGreater(float(jnp.abs(expected).max()), 1e-3)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)

  def test_pairs_outside_the_window_are_skipped(self):
    q = jnp.zeros((1, 16, 2, 8))
    variant, _ = jax_flash.attention._check_variant(q, q, causal=True,
                                                    window_size=(9, 0))
    plan = jax_flash.attention.Plan(1.0, True, False, "xla", variant)
    ring = jax_flash.ring.Ring.make(plan, q, q, axis_name="sp", size=4,
                                    layout="contiguous", mode="ring", num_heads=2)
    # Chunks of 16: a query sees at most 9 keys back, so only its own chunk
    # and the one before it.
    visible = [[int(ring.relation(i, j)) for j in range(4)] for i in range(4)]
    self.assertEqual(visible, [[2, 0, 0, 0], [2, 2, 0, 0], [0, 2, 2, 0], [0, 0, 2, 2]])


class MemoryTest(absltest.TestCase):

  def test_memory_per_device_does_not_grow_with_the_ring(self):
    """The steps are a loop: a device holds one step's buffers whatever the
    number of devices (checked on the simulated CPU devices)."""
    devices = jax.devices("cpu")
    if len(devices) < 8:
      raise absltest.SkipTest("needs 8 CPU devices")

    def temporaries(n):
      mesh = jax.make_mesh((n,), ("sp",), devices=devices[:n],
                           axis_types=(jax.sharding.AxisType.Auto,))
      spec = jax.NamedSharding(mesh, P(None, "sp"))
      attend = jax.shard_map(
          functools.partial(jax_flash.ring_attention, axis_name="sp", causal=True,
                            layout="zigzag"),
          mesh=mesh, in_specs=(P(None, "sp"),) * 3, out_specs=P(None, "sp"))
      step = jax.grad(lambda q, k, v: attend(q, k, v).astype(F32).sum(), (0, 1, 2))
      shape = jax.ShapeDtypeStruct((1, 256 * n, 2, 32), BF16, sharding=spec)
      compiled = jax.jit(step).lower(shape, shape, shape).compile()
      return compiled.memory_analysis().temp_size_in_bytes

    two, eight = temporaries(2), temporaries(8)
    self.assertLess(eight, 1.25 * two)


class CollectivesTest(absltest.TestCase):

  def compiled_text(self, mode):
    q = jnp.zeros((1, 64, 2, 8), F32)
    fn = ring_fn(RING, mode=mode)
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
        ring_fn(RING, **kwargs)(q, q, q)
    with self.assertRaisesRegex(ValueError, "zig-zag layout"):
      jax_flash.zigzag_permute(jnp.zeros((1, 12, 2, 8)), 4)
    with self.assertRaisesRegex(ValueError, "causal needs as many queries as keys"):
      ring_fn(RING)(q, jnp.zeros((1, 32, 2, 8)), jnp.zeros((1, 32, 2, 8)), causal=True)

  def test_dense_mask_or_bias_is_rejected(self):
    q = jnp.zeros((1, 16, 2, 8))
    for name in ("mask", "bias"):
      with self.assertRaisesRegex(TypeError, name):
        jax_flash.ring_attention(q, q, q, axis_name="sp", **{name: q})

  def test_outside_shard_map_names_the_missing_axis(self):
    q = jnp.zeros((1, 16, 2, 8))
    with self.assertRaisesRegex(ValueError, "no mesh axis 'sp'"):
      jax_flash.ring_attention(q, q, q, axis_name="sp")


if __name__ == "__main__":
  absltest.main()
