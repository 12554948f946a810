"""Attention variants on the portable path: sliding windows, soft cap, ALiBi,
segment ids (packed sequences), dense mask and bias, a value head_dim of its
own; each against the plain reference with the correctness rule, alone and
combined with causal masks and GQA, plus their argument checks."""

import functools
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

import jax_flash
from jax_flash import _cuda
from jax_flash import xla
from jax_flash.variants import Variant
import util

F32, BF16 = jnp.float32, jnp.bfloat16
portable = functools.partial(jax_flash.flash_attention, implementation="xla")


setUpModule, tearDownModule = util.pin_float32_precision()


def inputs(seed, dtype=F32, *, batch=2, seq_q=37, seq_k=53, num_heads=4,
           num_kv_heads=2, head_dim=16):
  return util.random_inputs(seed, batch=batch, seq_q=seq_q, seq_k=seq_k,
                            num_heads=num_heads, num_kv_heads=num_kv_heads,
                            head_dim=head_dim, dtype=dtype)


def variant_arrays(seed, batch, num_heads, seq_q, seq_k):
  keys = jax.random.split(jax.random.key(seed), 4)
  return dict(
      slopes=jax.random.uniform(keys[0], (num_heads,), F32, 0.05, 0.5),
      q_ids=util.packed_segments(seed, batch, seq_q, 3),
      kv_ids=util.packed_segments(seed + 1, batch, seq_k, 3),
      mask=jax.random.bernoulli(keys[1], 0.8, (batch, 1, seq_q, seq_k)),
      bias=jax.random.normal(keys[2], (num_heads, seq_q, seq_k), F32))


def variant_kwargs(names, arrays):
  every = dict(
      window=dict(window_size=(9, 4)),
      window_left=dict(window_size=(6, None)),
      window_right=dict(window_size=(-1, 3)),
      softcap=dict(softcap=1.5),
      alibi=dict(alibi_slopes=arrays["slopes"]),
      segments=dict(segment_ids=(arrays["q_ids"], arrays["kv_ids"])),
      mask=dict(mask=arrays["mask"]),
      bias=dict(bias=arrays["bias"]))
  kwargs = {}
  for name in names:
    kwargs.update(every[name])
  return kwargs


CASES = [
    # name, variants, causal, dtype, shape
    ("window", ["window"], False, BF16, {}),
    ("window_causal_gqa", ["window_left"], True, BF16, {}),
    ("window_right_only_more_queries", ["window_right"], False, F32,
     dict(seq_q=53, seq_k=37)),
    ("softcap", ["softcap"], False, BF16, {}),
    ("softcap_causal_mqa", ["softcap"], True, F32, dict(num_kv_heads=1)),
    ("alibi", ["alibi"], False, BF16, {}),
    ("alibi_causal", ["alibi"], True, F32, {}),
    ("segments", ["segments"], False, BF16, {}),
    ("segments_causal_gqa", ["segments"], True, BF16, {}),
    ("mask", ["mask"], False, F32, {}),
    ("bias", ["bias"], False, BF16, {}),
    ("softcap_alibi_window_causal", ["softcap", "alibi", "window_left"], True,
     BF16, {}),
    ("segments_window", ["segments", "window"], False, F32, {}),
    ("mask_bias_alibi_causal", ["mask", "bias", "alibi"], True, F32, {}),
]


class VariantsMatchReferenceTest(parameterized.TestCase):

  @parameterized.named_parameters(*CASES)
  def test_output_lse_and_grads_match_reference(self, names, causal, dtype,
                                                shape):
    q, k, v, dout, dlse = inputs(len(names), dtype, **shape)
    arrays = variant_arrays(7, q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    util.assert_matches_reference(portable, q, k, v, dout, dlse, causal=causal,
                                  **variant_kwargs(names, arrays))

  @parameterized.named_parameters(*CASES)
  def test_every_tiling_matches_reference(self, names, causal, dtype, shape):
    """Small blocks leave padding, partial tiles and skipped ones."""
    del dtype
    q, k, v, dout, dlse = inputs(11, F32, **shape)
    arrays = variant_arrays(3, q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    kwargs = variant_kwargs(names, arrays)
    reference = functools.partial(jax_flash.attention_reference,
                                  softmax_scale=0.3, causal=causal,
                                  return_lse=True, **kwargs)
    (ref_out, ref_lse), vjp = jax.vjp(reference, q, k, v)
    expected = (ref_out, jnp.exp(ref_lse), *vjp((dout, dlse)))
    for block_q, block_k in ((1, 1), (5, 16), (16, 5)):
      variant, extras = jax_flash.attention._check_variant(
          q, k, causal=causal, **kwargs)
      run = dict(softmax_scale=0.3, causal=causal, variant=variant,
                 block_q=block_q, block_k=block_k)
      out, lse = xla.forward(q, k, v, extras, **run)
      dq, dk, dv, _ = xla.backward(q, k, v, out, lse, dout, dlse, extras, **run)
      got = (out, jnp.exp(lse), dq, dk, dv)
      for name, a, b in zip(("out", "p_lse", "dq", "dk", "dv"), got, expected):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-5,
            err_msg=f"{name}, blocks ({block_q}, {block_k})")


class DropoutTest(parameterized.TestCase):

  def with_rng(self, rng):
    """flash_attention on the portable path with this key, taking (and
    ignoring) the reference's dropout_mask argument."""
    def attention(q, k, v, dropout_mask=None, **kwargs):
      del dropout_mask
      return portable(q, k, v, dropout_rng=rng, **kwargs)
    return attention

  @parameterized.named_parameters(
      ("bf16", 0.2, False, BF16, []),
      ("causal_gqa_window_f32", 0.5, True, F32, ["window_left"]),
      ("segments_softcap_bf16", 0.1, False, BF16, ["segments", "softcap"]),
  )
  def test_output_lse_and_grads_match_reference_with_the_same_mask(
      self, rate, causal, dtype, names):
    q, k, v, dout, dlse = inputs(21, dtype)
    rng = jax.random.key(4)
    mask = jax_flash.dropout_mask(rng, rate, batch=2, num_heads=4, seq_q=37,
                                  seq_k=53)
    arrays = variant_arrays(7, 2, 4, 37, 53)
    util.assert_matches_reference(
        self.with_rng(rng), q, k, v, dout, dlse, causal=causal,
        dropout_rate=rate, dropout_mask=mask, **variant_kwargs(names, arrays))

  def test_every_tiling_matches_reference_with_the_same_mask(self):
    q, k, v, dout, dlse = inputs(22)
    rng, rate = jax.random.key(6), 0.3
    mask = jax_flash.dropout_mask(rng, rate, batch=2, num_heads=4, seq_q=37,
                                  seq_k=53)
    (ref_out, ref_lse), vjp = jax.vjp(functools.partial(
        jax_flash.attention_reference, softmax_scale=0.3, causal=True,
        return_lse=True, dropout_rate=rate, dropout_mask=mask), q, k, v)
    expected = (ref_out, ref_lse, *vjp((dout, dlse)))
    variant, extras = jax_flash.attention._check_variant(
        q, k, causal=True, dropout_rate=rate, dropout_rng=rng)
    for block_q, block_k in ((1, 1), (5, 16), (16, 5)):
      run = dict(softmax_scale=0.3, causal=True, variant=variant,
                 block_q=block_q, block_k=block_k)
      out, lse = xla.forward(q, k, v, extras, **run)
      dq, dk, dv, _ = xla.backward(q, k, v, out, lse, dout, dlse, extras, **run)
      for name, a, b in zip(("out", "lse", "dq", "dk", "dv"),
                            (out, lse, dq, dk, dv), expected):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-5,
            err_msg=f"{name}, blocks ({block_q}, {block_k})")

  @parameterized.parameters(0.1, 0.5, 0.9)
  def test_kept_fraction_is_within_one_percent_of_one_minus_rate(self, rate):
    mask = jax_flash.dropout_mask(jax.random.key(3), rate, batch=1, num_heads=8,
                                  seq_q=512, seq_k=512)
    kept = float(mask.mean())
    self.assertLess(abs(kept - (1 - rate)), 0.01 * (1 - rate))
    # Heads and rows draw their own entries.
    self.assertFalse(bool(jnp.all(mask[0, 0] == mask[0, 1])))
    self.assertFalse(bool(jnp.all(mask[0, 0, 0] == mask[0, 0, 1])))

  def test_same_key_repeats_bitwise_and_another_key_differs(self):
    q, k, v, dout, _ = inputs(23)

    def run(rng):
      fn = lambda q, k, v: jnp.sum(portable(q, k, v, dropout_rate=0.4,
                                            dropout_rng=rng) * dout)
      return jax.jit(jax.value_and_grad(fn, (0, 1, 2)))(q, k, v)

    first, again, other = run(jax.random.key(1)), run(jax.random.key(1)), run(
        jax.random.key(2))
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    self.assertNotEqual(float(first[0]), float(other[0]))

  def test_philox_matches_its_known_answers(self):
    # Known-answer vectors of Philox-4x32-10 (Random123).
    for counter, key, expected in (
        ((0, 0, 0, 0), (0, 0),
         (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
        ((0xffffffff,) * 4, (0xffffffff,) * 2,
         (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
        ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344),
         (0xa4093822, 0x299f31d0),
         (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1))):
      words = jax_flash.dropout.philox4x32(
          [jnp.uint32(c) for c in counter], [jnp.uint32(k) for k in key])
      self.assertEqual(tuple(int(w) for w in words), expected)


class VariantGradientsTest(parameterized.TestCase):

  @parameterized.parameters(
      ((4, 37, 53),), ((1, 37, 53),), ((2, 4, 1, 53),), ((37, 1),))
  def test_bias_gradient_matches_reference(self, bias_shape):
    q, k, v, dout, dlse = inputs(5)
    bias = jax.random.normal(jax.random.key(1), bias_shape, F32)

    def loss(attention, bias):
      out, lse = attention(q, k, v, bias=bias, causal=True, return_lse=True)
      return jnp.sum(out * dout) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0) * dlse)

    got = jax.grad(functools.partial(loss, portable))(bias)
    expected = jax.grad(functools.partial(loss, jax_flash.attention_reference))(
        bias)
    self.assertEqual(got.shape, bias.shape)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)

  @parameterized.parameters(((4,),), ((2, 4),))
  def test_alibi_slope_gradient_matches_reference(self, slopes_shape):
    q, k, v, dout, dlse = inputs(6)
    slopes = jax.random.uniform(jax.random.key(2), slopes_shape, F32, 0.1, 0.5)

    def loss(attention, slopes):
      out, lse = attention(q, k, v, alibi_slopes=slopes, return_lse=True)
      return jnp.sum(out * dout) + jnp.sum(lse * dlse)

    got = jax.grad(functools.partial(loss, portable))(slopes)
    expected = jax.grad(functools.partial(loss, jax_flash.attention_reference))(
        slopes)
    self.assertGreater(float(jnp.abs(expected).max()), 1e-3)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)


class ValueHeadDimTest(parameterized.TestCase):

  @parameterized.parameters((False, F32), (True, BF16))
  def test_value_head_dim_other_than_query_head_dim(self, causal, dtype):
    q, k, _, _, dlse = inputs(8, dtype, head_dim=24)
    keys = jax.random.split(jax.random.key(9), 2)
    v = jax.random.normal(keys[0], k.shape[:3] + (16,), F32).astype(dtype)
    dout = jax.random.normal(keys[1], q.shape[:3] + (16,), F32).astype(dtype)
    got = util.assert_matches_reference(portable, q, k, v, dout, dlse,
                                        causal=causal)
    self.assertEqual(got[0].shape, q.shape[:3] + (16,))


class SkippedBlocksTest(absltest.TestCase):

  def tiling(self, variant, causal=False, seq=4096, block=512):
    return xla._Tiling.make(seq, seq, block_q=block, block_k=block,
                            causal=causal, softmax_scale=1.0, variant=variant)

  def test_window_visits_only_the_key_blocks_it_reaches(self):
    t = self.tiling(Variant(window=(256, 0)))
    self.assertEqual([tuple(map(int, t.key_blocks(i))) for i in range(8)],
                     [(0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7),
                      (6, 8)])
    self.assertEqual([tuple(map(int, t.query_blocks(j))) for j in (0, 7)],
                     [(0, 2), (7, 8)])

  def test_window_cost_is_linear_in_sequence_length(self):
    for seq in (4096, 16384):
      t = self.tiling(Variant(window=(1000, 1000)), seq=seq)
      tiles = sum(int(end) - int(start)
                  for start, end in map(t.key_blocks, range(t.num_q)))
      self.assertLessEqual(tiles, 6 * t.num_q)

  def test_tiles_of_segments_that_cannot_meet_are_skipped(self):
    ids = jnp.repeat(jnp.arange(4, dtype=jnp.int32), 128)[None]  # 4 documents
    t = self.tiling(Variant(segments=True), seq=512, block=128)
    extras = xla._Extras({"q_segment_ids": ids, "kv_segment_ids": ids}, t,
                         batch=1, num_heads=1, num_kv_heads=1)
    meets = [[bool(extras.tiles_meet(i, j)) for j in range(4)] for i in range(4)]
    self.assertEqual(meets, np.eye(4, dtype=bool).tolist())


class EmptyRowsTest(absltest.TestCase):

  def test_queries_whose_segment_has_no_key_give_zero_and_finite_grads(self):
    q, k, v, dout, dlse = inputs(12, seq_q=8, seq_k=8)
    q_ids = jnp.array([[0, 0, 1, 1, 2, 2, 2, 2]] * 2, jnp.int32)
    kv_ids = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1]] * 2, jnp.int32)
    out, lse = portable(q, k, v, segment_ids=(q_ids, kv_ids), return_lse=True)
    np.testing.assert_array_equal(np.asarray(out[:, 4:]), 0)
    self.assertTrue(np.isneginf(np.asarray(lse[:, :, 4:])).all())
    grads = jax.grad(lambda q, k, v: jnp.sum(portable(
        q, k, v, segment_ids=(q_ids, kv_ids)) * dout), (0, 1, 2))(q, k, v)
    for g in grads:
      self.assertTrue(np.isfinite(np.asarray(g)).all())


class TransformsTest(absltest.TestCase):

  def test_vmap_with_segment_ids_equals_a_loop_of_calls(self):
    q, k, v, _, _ = inputs(13, batch=3)
    arrays = variant_arrays(4, 3, 4, q.shape[1], k.shape[1])
    fn = lambda q, k, v, qi, ki: portable(q[None], k[None], v[None],
                                          segment_ids=(qi[None], ki[None]),
                                          window_size=(10, 10))[0]
    batched = jax.jit(jax.vmap(fn))(q, k, v, arrays["q_ids"], arrays["kv_ids"])
    for b in range(3):
      np.testing.assert_allclose(
          batched[b], fn(q[b], k[b], v[b], arrays["q_ids"][b],
                         arrays["kv_ids"][b]), atol=1e-6)


class VariantArgumentsTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("window_not_a_pair", dict(window_size=5), TypeError, "window_size"),
      ("window_negative", dict(window_size=(-2, 0)), ValueError, "window_size left"),
      ("window_float", dict(window_size=(1.5, 0)), TypeError, "window_size left"),
      ("window_right_with_causal", dict(window_size=(4, 2), causal=True),
       ValueError, "causal=True"),
      ("softcap_zero", dict(softcap=0.0), ValueError, "softcap"),
      ("softcap_array", dict(softcap=jnp.ones(2)), TypeError, "softcap"),
      ("alibi_shape", dict(alibi_slopes=jnp.ones(3)), ValueError, "alibi_slopes"),
      ("alibi_int", dict(alibi_slopes=jnp.ones(4, jnp.int32)), TypeError,
       "alibi_slopes"),
      ("segments_not_a_pair", dict(segment_ids=jnp.zeros((2, 37), jnp.int32)),
       TypeError, "segment_ids"),
      ("segments_shape", dict(segment_ids=(jnp.zeros((2, 37), jnp.int32),
                                           jnp.zeros((2, 52), jnp.int32))),
       ValueError, "kv_segment_ids"),
      ("segments_float", dict(segment_ids=(jnp.zeros((2, 37)),
                                           jnp.zeros((2, 53)))),
       TypeError, "q_segment_ids"),
      ("mask_not_bool", dict(mask=jnp.ones((37, 53))), TypeError, "mask"),
      ("mask_shape", dict(mask=jnp.ones((3, 37, 53), bool)), ValueError, "mask"),
      ("bias_shape", dict(bias=jnp.ones((37, 52))), ValueError, "bias"),
      ("bias_int", dict(bias=jnp.ones((37, 53), jnp.int32)), TypeError, "bias"),
      ("dropout_without_rng", dict(dropout_rate=0.1), ValueError, "dropout_rng"),
      ("dropout_rate_one", dict(dropout_rate=1.0, dropout_rng=jax.random.key(0)),
       ValueError, "dropout_rate"),
      ("dropout_rng_not_a_key", dict(dropout_rate=0.1, dropout_rng="seed"),
       TypeError, "dropout_rng"),
  )
  def test_bad_variant_arguments_raise_naming_them(self, kwargs, error, message):
    q, k, v, _, _ = inputs(14)
    with self.assertRaisesRegex(error, message):
      portable(q, k, v, **kwargs)

  def test_value_with_other_seq_len_is_rejected(self):
    q, k, v, _, _ = inputs(15)
    with self.assertRaisesRegex(ValueError, "key and value must agree"):
      portable(q, k, v[:, 1:])

  def test_cuda_implementation_names_the_variants_it_cannot_run(self):
    q, k, v, _, _ = inputs(16, BF16)
    with mock.patch.object(_cuda, "unavailable_reason", return_value=""), \
         mock.patch.object(_cuda, "unsupported_reason", return_value=""):
      with self.assertRaisesRegex(ValueError, "mask, bias"):
        jax_flash.flash_attention(q, k, v, implementation="cuda", window_size=(4, 4),
                                  softcap=2.0, alibi_slopes=jnp.ones(4),
                                  mask=jnp.ones((37, 53), bool),
                                  bias=jnp.zeros((37, 53)))

  def test_dense_masks_choose_the_portable_path_on_cuda(self):
    q, k, v, _, _ = inputs(17, BF16)
    with mock.patch.object(_cuda, "library_loaded", return_value=True):
      text = jax.jit(functools.partial(
          jax_flash.flash_attention, mask=jnp.ones((37, 53), bool))).trace(
              q, k, v).lower(lowering_platforms=("cuda",)).as_text()
    self.assertNotIn("jax_flash_fwd", text)

  def test_the_other_variants_run_on_the_kernels(self):
    q, k, v, _, _ = inputs(18, BF16)
    arrays = variant_arrays(7, 2, 4, 37, 53)
    with mock.patch.object(_cuda, "library_loaded", return_value=True):
      text = jax.jit(functools.partial(
          jax_flash.flash_attention, window_size=(8, 3), softcap=2.5,
          alibi_slopes=arrays["slopes"],
          segment_ids=(arrays["q_ids"], arrays["kv_ids"]), dropout_rate=0.25,
          dropout_rng=jax.random.key(0))).trace(
              q, k, v).lower(lowering_platforms=("cuda",)).as_text()
    self.assertIn("jax_flash_fwd", text)
    self.assertIn("window_left = 8 : i32", text)
    self.assertIn("window_right = 3 : i32", text)
    self.assertIn("softcap = 2.500000e+00 : f32", text)
    self.assertIn(f"dropout_threshold = {2**30} : ui32", text)

  def test_a_value_head_dim_of_its_own_runs_on_the_kernels(self):
    q, k, _, _, _ = inputs(19, BF16, head_dim=96)
    v = jnp.ones(k.shape[:3] + (40,), BF16)
    with mock.patch.object(_cuda, "library_loaded", return_value=True):
      text = jax.jit(jax_flash.flash_attention).trace(q, k, v).lower(
          lowering_platforms=("cuda",)).as_text()
    self.assertIn("jax_flash_fwd", text)
    self.assertIn("tensor<2x37x4x128xbf16>", text)  # both padded to 128

  def test_segment_range_tables(self):
    ids = jnp.array([[0] * 70 + [1] * 60 + [-1] * 5, [3] * 64 + [2] * 71], jnp.int32)
    np.testing.assert_array_equal(
        _cuda._segment_ranges(ids),
        [[[0, 0, 0, -1], [0, 1, 1, -1], [-1, 1, 1, -1]],
         [[3, 3, 3, 2], [2, 2, 3, 2], [2, 2, 3, 2]]])

if __name__ == "__main__":
  absltest.main()
