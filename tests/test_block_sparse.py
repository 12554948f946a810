"""Block-sparse attention: the mask's constructors and combinations, the
portable path against the reference with the equivalent element mask (random
masks at several densities, lengths that do not fill the last block, causal,
GQA, outputs and gradients), rows whose blocks are all off, the blocks the
path skips, jit, sharding, and the argument checks."""

import dataclasses
import functools
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

import jax_flash
from jax_flash import BlockSparseMask
from jax_flash import _cuda
from jax_flash import xla
from jax_flash.variants import Variant
import util

F32, BF16 = jnp.float32, jnp.bfloat16
portable = functools.partial(jax_flash.flash_attention, implementation="xla")

setUpModule, tearDownModule = util.pin_float32_precision()


def with_block_mask(block_mask):
  """flash_attention on the portable path with this block mask, taking (and
  ignoring) the reference's element mask."""
  def attention(q, k, v, mask=None, **kwargs):
    del mask
    return portable(q, k, v, block_mask=block_mask, **kwargs)
  return attention


class ConstructorsTest(absltest.TestCase):

  def test_butterfly_is_the_diagonal_and_power_of_two_offsets(self):
    blocks = np.asarray(BlockSparseMask.butterfly(2048, 2048).blocks)
    self.assertEqual(blocks.shape, (16, 16))
    for i in range(16):
      expected = {i} | {i ^ (1 << b) for b in range(4)}
      self.assertEqual(set(np.flatnonzero(blocks[i])), expected)
    self.assertTrue((blocks == blocks.T).all())

  def test_local_follows_the_bottom_right_diagonal(self):
    blocks = np.asarray(BlockSparseMask.local(256, 512, (1, 0), (64, 64)).blocks)
    # Query block i's diagonal keys are block i + 4.
    for i in range(4):
      self.assertEqual(list(np.flatnonzero(blocks[i])), [i + 3, i + 4])
    both = np.asarray(BlockSparseMask.local(512, 512, 1, (128, 128)).blocks)
    np.testing.assert_array_equal(both, np.abs(np.subtract.outer(range(4), range(4))) <= 1)

  def test_global_blocks_rows_and_columns(self):
    blocks = np.asarray(BlockSparseMask.global_blocks(
        512, 384, rows=(3,), cols=2, block_size=(128, 128)).blocks)
    expected = np.zeros((4, 3), bool)
    expected[3] = True
    expected[:, :2] = True
    np.testing.assert_array_equal(blocks, expected)

  def test_from_dense_keeps_every_block_with_a_visible_pair(self):
    mask = np.zeros((2, 200, 130), bool)
    mask[0, 5, 129] = True   # block (0, 2) of the first row
    mask[1, 199, 0] = True   # block (3, 0): the partial last query block
    blocks = np.asarray(BlockSparseMask.from_dense(mask, (64, 64)).blocks)
    self.assertEqual(blocks.shape, (2, 4, 3))
    self.assertEqual([tuple(x) for x in np.argwhere(blocks)], [(0, 0, 2), (1, 3, 0)])

  def test_dense_expands_each_block(self):
    m = BlockSparseMask(jnp.array([[True, False], [False, True]]), (3, 2))
    np.testing.assert_array_equal(
        m.dense(5, 3), [[1, 1, 0], [1, 1, 0], [1, 1, 0], [0, 0, 1], [0, 0, 1]])

  def test_random_density_and_combinations(self):
    m = BlockSparseMask.random(jax.random.key(0), 0.25, 8192, 8192, shape=(4,))
    self.assertEqual(m.blocks.shape, (4, 64, 64))
    self.assertAlmostEqual(float(m.density()), 0.25, delta=0.02)
    local = BlockSparseMask.local(8192, 8192, 2)
    np.testing.assert_array_equal((m & local).blocks, m.blocks & local.blocks)
    np.testing.assert_array_equal((m | local).blocks, m.blocks | local.blocks)

  def test_a_mask_passes_through_jit_as_a_pytree(self):
    m = BlockSparseMask.butterfly(1024, 1024, (128, 128))
    leaves, treedef = jax.tree.flatten(m)
    self.assertLen(leaves, 5)  # the blocks and the index's four arrays
    self.assertEqual(jax.tree.unflatten(treedef, leaves).block_size, (128, 128))
    count = jax.jit(lambda m: (m & BlockSparseMask.local(1024, 1024, 1)).blocks.sum())(m)
    self.assertEqual(int(count), 8 + 2 * 4)  # the diagonal and offsets 1 (i ^ 1)

  def test_bad_arguments_raise(self):
    with self.assertRaisesRegex(ValueError, "block_size"):
      BlockSparseMask(jnp.ones((2, 2), bool), (0, 128))
    with self.assertRaisesRegex(TypeError, "boolean"):
      BlockSparseMask(jnp.ones((2, 2)), (128, 128))
    with self.assertRaisesRegex(ValueError, "one block_size"):
      _ = BlockSparseMask.local(512, 512, 1) & BlockSparseMask.local(512, 512, 1, (64, 64))
    with self.assertRaisesRegex(ValueError, "density"):
      BlockSparseMask.random(jax.random.key(0), 1.5, 128, 128)
    with self.assertRaisesRegex(ValueError, "rows"):
      BlockSparseMask.global_blocks(256, 256, rows=(5,))


# name, density, causal, dtype, shape, block_size, mask shape (leading dims)
CASES = [
    ("sparse_f32", 0.1, False, F32, {}, (16, 16), ()),
    ("half_causal_gqa_bf16", 0.5, True, BF16, {}, (16, 32), ()),
    ("dense_per_head_f32", 0.9, False, F32, {}, (32, 16), (4,)),
    ("per_batch_and_head_causal_mqa", 0.4, True, F32, dict(num_kv_heads=1), (16, 16),
     (2, 4)),
    ("more_queries_than_keys", 0.5, True, F32, dict(seq_q=90, seq_k=53), (32, 16), ()),
]


class BlockSparseMatchesReferenceTest(parameterized.TestCase):

  @parameterized.named_parameters(*CASES)
  def test_output_lse_and_grads_match_reference(self, density, causal, dtype, shape,
                                                block_size, lead):
    shape = dict(dict(batch=2, seq_q=77, seq_k=101, num_heads=4, num_kv_heads=2,
                      head_dim=16), **shape)
    q, k, v, dout, dlse = util.random_inputs(3, dtype=dtype, **shape)
    m = BlockSparseMask.random(jax.random.key(int(density * 10)), density,
                               shape["seq_q"], shape["seq_k"], shape=lead,
                               block_size=block_size)
    util.assert_matches_reference(with_block_mask(m), q, k, v, dout, dlse,
                                  causal=causal, mask=m.dense(shape["seq_q"], shape["seq_k"]))

  @parameterized.parameters((1, 1), (5, 16), (16, 5), (64, 64))
  def test_every_tiling_matches_reference(self, block_q, block_k):
    """Tiles smaller and larger than the mask's blocks, and not aligned to them."""
    q, k, v, dout, dlse = util.random_inputs(5, batch=2, seq_q=77, seq_k=101, num_heads=4,
                                             num_kv_heads=2, head_dim=16, dtype=F32)
    m = BlockSparseMask.random(jax.random.key(1), 0.4, 77, 101, shape=(4,),
                               block_size=(16, 8))
    reference = functools.partial(jax_flash.attention_reference, softmax_scale=0.3,
                                  causal=True, return_lse=True, mask=m.dense(77, 101))
    (ref_out, ref_lse), vjp = jax.vjp(reference, q, k, v)
    expected = (ref_out, jnp.exp(ref_lse), *vjp((dout, dlse)))
    variant, extras = jax_flash.attention._check_variant(q, k, causal=True, block_mask=m)
    run = dict(softmax_scale=0.3, causal=True, variant=variant, block_q=block_q,
               block_k=block_k)
    out, lse = xla.forward(q, k, v, extras, **run)
    dq, dk, dv, _ = xla.backward(q, k, v, out, lse, dout, dlse, extras, **run)
    for name, a, b in zip(("out", "p_lse", "dq", "dk", "dv"),
                          (out, jnp.exp(lse), dq, dk, dv), expected):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-5,
                                 err_msg=name)

  def test_combines_with_the_other_variants(self):
    q, k, v, dout, dlse = util.random_inputs(6, batch=2, seq_q=64, seq_k=64, num_heads=4,
                                             num_kv_heads=2, head_dim=16, dtype=F32)
    m = BlockSparseMask.butterfly(64, 64, (8, 8)) | BlockSparseMask.global_blocks(
        64, 64, block_size=(8, 8))
    ids = util.packed_segments(2, 2, 64, 3)
    util.assert_matches_reference(with_block_mask(m), q, k, v, dout, dlse, causal=True,
                                  mask=m.dense(64, 64), window_size=(30, 0), softcap=2.0,
                                  alibi_slopes=jnp.linspace(0.1, 0.4, 4),
                                  segment_ids=(ids, ids))

  @parameterized.named_parameters(("gqa", 2), ("mqa", 1))
  def test_a_mask_for_all_heads_combines_with_dropout_under_grouped_heads(self,
                                                                        num_kv_heads):
    """The mask's head grouping (one group of every head) and dropout's head
    numbering (the kv heads' groups of query heads) are kept apart."""
    q, k, v, dout, dlse = util.random_inputs(7, batch=2, seq_q=64, seq_k=64, num_heads=4,
                                             num_kv_heads=num_kv_heads, head_dim=16,
                                             dtype=F32)
    m = BlockSparseMask.random(jax.random.key(4), 0.6, 64, 64, block_size=(16, 16))
    rng, rate = jax.random.key(3), 0.2

    def attention(q, k, v, mask=None, dropout_mask=None, **kwargs):
      del mask, dropout_mask
      return portable(q, k, v, block_mask=m, dropout_rng=rng, **kwargs)

    util.assert_matches_reference(
        attention, q, k, v, dout, dlse, causal=False, mask=m.dense(64, 64),
        dropout_rate=rate,
        dropout_mask=jax_flash.dropout_mask(rng, rate, batch=2, num_heads=4, seq_q=64,
                                            seq_k=64))

  def test_rows_whose_blocks_are_all_off_give_zero_and_finite_grads(self):
    q, k, v, dout, _ = util.random_inputs(7, batch=1, seq_q=48, seq_k=48, num_heads=2,
                                          num_kv_heads=2, head_dim=8, dtype=F32)
    blocks = jnp.ones((3, 3), bool).at[1].set(False)  # query block 1 sees nothing
    m = BlockSparseMask(blocks, (16, 16))
    out, lse = portable(q, k, v, block_mask=m, return_lse=True)
    np.testing.assert_array_equal(out[:, 16:32], 0)
    self.assertTrue(np.isneginf(lse[..., 16:32]).all())
    self.assertTrue(np.isfinite(lse[..., :16]).all())
    grads = jax.grad(lambda q, k, v: jnp.sum(portable(q, k, v, block_mask=m) * dout),
                     argnums=(0, 1, 2))(q, k, v)
    for g in grads:
      self.assertTrue(np.isfinite(g).all())
    np.testing.assert_array_equal(grads[0][:, 16:32], 0)


class SkippedTilesTest(absltest.TestCase):

  def tiles_on(self, m, seq, block):
    variant, extras = jax_flash.attention._check_variant(
        jnp.zeros((1, seq, 1, 8)), jnp.zeros((1, seq, 1, 8)), causal=False, block_mask=m)
    t = xla._Tiling.make(seq, seq, block_q=block, block_k=block, causal=False,
                         softmax_scale=1.0, variant=variant)
    return np.asarray(xla._Extras(extras, t, 1, 1, 1).tiles_on)

  def test_only_the_tiles_over_blocks_that_are_on_run(self):
    m = BlockSparseMask.local(4096, 4096, 0, (128, 128))
    # Tiles of 512 over blocks of 128: a tile runs when a block of its 4 x 4 is on.
    np.testing.assert_array_equal(self.tiles_on(m, 4096, 512), np.eye(8, dtype=bool))
    # Tiles of 96, not aligned to the blocks: query tile 1 (96..191) overlaps
    # blocks 0 and 1, whose diagonal blocks key tiles 0-1 and 1-2 overlap.
    on = self.tiles_on(m, 4096, 96)
    self.assertEqual(list(np.flatnonzero(on[1])), [0, 1, 2])

  def test_local_mask_cost_is_linear_in_sequence_length(self):
    counts = [self.tiles_on(BlockSparseMask.local(s, s, 1), s, 512).sum() for s in (4096, 16384)]
    self.assertLess(counts[1], 4.5 * counts[0])


class BlockSparseArgumentsTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("not_a_mask", dict(block_mask=jnp.ones((3, 4), bool)), TypeError, "BlockSparseMask"),
      ("wrong_blocks", dict(block_mask=BlockSparseMask(jnp.ones((2, 4), bool), (16, 16))),
       ValueError, "do not cover"),
      ("leading_dims", dict(block_mask=BlockSparseMask(jnp.ones((3, 3, 4), bool), (16, 16))),
       ValueError, "broadcast"),
  )
  def test_bad_block_masks_raise_naming_them(self, kwargs, error, message):
    q, k, v, _, _ = util.random_inputs(8, batch=2, seq_q=37, seq_k=53, num_heads=4,
                                       num_kv_heads=2, head_dim=16, dtype=F32)
    with self.assertRaisesRegex(error, message):
      portable(q, k, v, **kwargs)

  def test_cuda_implementation_names_a_block_size_the_kernels_cannot_map(self):
    q, k, v, _, _ = util.random_inputs(9, batch=2, seq_q=37, seq_k=53, num_heads=4,
                                       num_kv_heads=2, head_dim=16, dtype=BF16)
    with mock.patch.object(_cuda, "unavailable_reason", return_value=""), \
         mock.patch.object(_cuda, "unsupported_reason", return_value=""):
      with self.assertRaisesRegex(ValueError, "block_size .16, 16."):
        jax_flash.flash_attention(q, k, v, implementation="cuda",
                                  block_mask=BlockSparseMask.local(37, 53, 1, (16, 16)))

  def test_block_masks_of_whole_kernel_tiles_run_on_the_kernels(self):
    q, k, v, _, _ = util.random_inputs(9, batch=2, seq_q=300, seq_k=530, num_heads=4,
                                       num_kv_heads=2, head_dim=16, dtype=BF16)
    m = BlockSparseMask.random(jax.random.key(0), 0.5, 300, 530, shape=(4,),
                               block_size=(128, 256))
    with mock.patch.object(_cuda, "library_loaded", return_value=True):
      text = jax.jit(functools.partial(jax_flash.flash_attention, block_mask=m)).trace(
          q, k, v).lower(lowering_platforms=("cuda",)).as_text()
    self.assertIn("jax_flash_fwd", text)
    self.assertIn("block_q = 128 : i32", text)
    self.assertIn("block_k = 256 : i32", text)

  def test_index_lists_the_blocks_that_are_on(self):
    blocks = jnp.array([[True, False, True], [False, False, False]])
    index = BlockSparseMask(blocks, (128, 128)).index
    np.testing.assert_array_equal(index.q_counts[..., 0], [2, 0])
    np.testing.assert_array_equal(index.q_lists[0, :2], [0, 2])
    np.testing.assert_array_equal(index.k_counts[..., 0], [1, 0, 1])
    np.testing.assert_array_equal(index.k_lists[0, :1], [0])
    np.testing.assert_array_equal(index.k_lists[2, :1], [0])

  def test_index_follows_the_blocks(self):
    m = BlockSparseMask.random(jax.random.key(1), 0.5, 512, 640, shape=(3,))
    off = jnp.zeros_like(m.blocks)
    for mask in (dataclasses.replace(m, blocks=off), m & BlockSparseMask(off)):
      np.testing.assert_array_equal(mask.index.q_counts, 0)
      np.testing.assert_array_equal(mask.index.k_counts, 0)
    first = jax.tree.map(lambda x: x[0], m)  # a function over the leaves
    np.testing.assert_array_equal(first.index.q_lists, BlockSparseMask(m.blocks[0]).index.q_lists)

  def test_a_mask_of_shapes_has_an_index_of_shapes(self):
    spec = BlockSparseMask(jax.ShapeDtypeStruct((2, 4, 4), jnp.bool_))
    self.assertEqual(spec.index.q_lists.shape, (2, 4, 4))
    self.assertEqual(spec.index.k_counts.shape, (2, 4, 1))

  def test_a_mask_as_a_vmap_prefix_maps_its_index_too(self):
    q, k, v, _, _ = util.random_inputs(5, batch=3, seq_q=256, seq_k=256, num_heads=2,
                                       num_kv_heads=2, head_dim=16, dtype=BF16)
    masks = BlockSparseMask(jax.random.bernoulli(jax.random.key(2), 0.5, (3, 2, 2)))
    out = jax.vmap(lambda q, k, v, m: jax_flash.flash_attention(q, k, v, block_mask=m),
                   in_axes=(0, 0, 0, BlockSparseMask(0)))(q[:, None], k[:, None], v[:, None],
                                                          masks)
    for i in range(3):
      ref = jax_flash.flash_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1],
                                      block_mask=BlockSparseMask(masks.blocks[i]))
      np.testing.assert_array_equal(np.asarray(out[i], np.float32), np.asarray(ref, np.float32))

  def test_an_index_that_does_not_fit_its_blocks_is_refused(self):
    q, k, v, _, _ = util.random_inputs(9, batch=1, seq_q=256, seq_k=256, num_heads=2,
                                       num_kv_heads=2, head_dim=16, dtype=BF16)
    m = BlockSparseMask.local(256, 256, 1)
    blocks, treedef = jax.tree.flatten(m)
    other = jax.tree.leaves(BlockSparseMask.local(384, 384, 1))
    wrong = jax.tree.unflatten(treedef, [blocks[0], *other[1:]])  # another mask's index
    with self.assertRaisesRegex(ValueError, "index does not match"):
      jax_flash.flash_attention(q, k, v, block_mask=wrong)

  def test_index_is_built_once_per_mask(self):
    """A mask built outside a jitted step brings its lists as inputs: the
    step sorts nothing, however many calls share the mask."""
    q, k, v, _, _ = util.random_inputs(3, batch=2, seq_q=512, seq_k=512, num_heads=4,
                                       num_kv_heads=2, head_dim=64, dtype=BF16)
    m = BlockSparseMask.random(jax.random.key(3), 0.5, 512, 512)

    def two_layers(q, k, v, m):
      out = jax_flash.flash_attention(q, k, v, block_mask=m)
      return jax_flash.flash_attention(out, k, v, block_mask=m)

    with mock.patch.object(_cuda, "library_loaded", return_value=True):
      text = jax.jit(jax.grad(lambda *a: jnp.sum(two_layers(*a)))).trace(
          q, k, v, m).lower(lowering_platforms=("cuda",)).as_text()
    self.assertIn("jax_flash_fwd", text)
    self.assertIn("jax_flash_bwd", text)
    self.assertNotIn("sort", text)

  def test_variant_names_the_feature(self):
    self.assertEqual(Variant(block_size=(128, 128)).features, ("block_mask",))


class ShardedBlockSparseTest(absltest.TestCase):

  def test_batch_and_head_split_equals_the_unsharded_call(self):
    mesh = util.mesh_2x4()
    q, k, v, dout, _ = util.random_inputs(10, batch=4, seq_q=64, seq_k=64, num_heads=8,
                                          num_kv_heads=4, head_dim=8, dtype=F32)
    m = BlockSparseMask.random(jax.random.key(2), 0.5, 64, 64, shape=(8,),
                               block_size=(16, 16))
    spec = NamedSharding(mesh, P("data", None, "model"))

    def loss(q, k, v, placed):
      if placed:
        q, k, v = (jax.lax.with_sharding_constraint(x, spec) for x in (q, k, v))
      return jnp.sum(jax_flash.flash_attention(q, k, v, causal=True, block_mask=m) * dout)

    grad = lambda placed: jax.jit(jax.value_and_grad(
        functools.partial(loss, placed=placed), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(jax.tree.leaves(grad(True)), jax.tree.leaves(grad(False))):
      np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)

  def test_a_mask_placed_with_one_sharding_places_its_index_too(self):
    devices = util.mesh_devices()[:2]
    mesh = jax.make_mesh((len(devices),), ("model",), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))
    m = BlockSparseMask.random(jax.random.key(4), 0.5, 64, 64, shape=(4,), block_size=(16, 16))
    sharding = NamedSharding(mesh, P("model", None, None))
    placed = jax.device_put(m, sharding)
    for leaf in jax.tree.leaves(placed):
      self.assertTrue(leaf.sharding.is_equivalent_to(sharding, 3))
    q, k, v, _, _ = util.random_inputs(12, batch=1, seq_q=64, seq_k=64, num_heads=4,
                                       num_kv_heads=4, head_dim=8, dtype=F32)
    out = jax.jit(lambda q, k, v, m: jax_flash.flash_attention(q, k, v, block_mask=m))(
        q, k, v, placed)
    np.testing.assert_allclose(out, jax_flash.flash_attention(q, k, v, block_mask=m),
                               atol=1e-6, rtol=1e-6)

  def test_ring_attention_refuses_a_block_mask(self):
    devices = util.mesh_devices()[:2]
    mesh = jax.make_mesh((2,), ("seq",), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))
    q, k, v, _, _ = util.random_inputs(11, batch=1, seq_q=64, seq_k=64, num_heads=2,
                                       num_kv_heads=2, head_dim=8, dtype=F32)
    spec = NamedSharding(mesh, P(None, "seq"))
    m = BlockSparseMask.local(64, 64, 1, (16, 16))
    attention = jax.jit(lambda q, k, v: jax_flash.flash_attention(
        *(jax.lax.with_sharding_constraint(x, spec) for x in (q, k, v)), block_mask=m))
    with self.assertRaisesRegex(Exception, "block mask"):
      attention(q, k, v)


if __name__ == "__main__":
  absltest.main()
