"""The built kernel library (setup.py's or Bazel's): it holds the kernels its
build was configured for and registers its XLA FFI targets. Needs no GPU; skips
where the package was installed without nvcc."""

import os
import pathlib

from absl.testing import absltest
import jax
import jax.numpy as jnp

import jax_flash
from jax_flash import _cuda

KERNEL_UNITS = pathlib.Path(__file__).resolve().parents[1] / "cuda" / "kernel_units.bzl"


def kernel_units_module() -> dict:
  """cuda/kernel_units.bzl, executed as Python the way setup.py reads it."""
  namespace = {}
  exec(compile(KERNEL_UNITS.read_text(), str(KERNEL_UNITS), "exec"), namespace)
  return namespace


def configured_kernels() -> set[tuple[str, str, int, str]]:
  """(family, dtype, head_dim, pass) of every unit the environment's
  JAX_FLASH_* settings compile, from the list both builds read."""
  units = kernel_units_module()
  settings, error = units["configured_settings"](os.environ)
  assert not error, error
  kernels = set()
  for name, _, _ in units["kernel_units"](*settings):
    family, pass_, dtype, head_dim = name.split("_")
    kernels.add((family, dtype, int(head_dim.removeprefix("hd")), pass_))
  return kernels


class KernelUnitListTest(absltest.TestCase):

  def test_default_units_cover_both_families_dtypes_head_dims_and_passes(self):
    units = kernel_units_module()
    names = [name for name, _, _ in units["kernel_units"](
        units["DEFAULT_CUDA_ARCHS"], units["ALL_DTYPES"], units["ALL_HEAD_DIMS"])]
    self.assertLen(names, 2 * 2 * 3 * 2)
    self.assertLen(set(names), len(names))
    self.assertIn("sm90_fwd_bf16_hd128", names)
    self.assertIn("sm80_bwd_f16_hd256", names)

  def test_sm90_units_need_arch_90(self):
    units = kernel_units_module()
    names = [name for name, _, _ in units["kernel_units"](["80"], ["bf16"], ["64"])]
    self.assertEqual(names, ["sm80_fwd_bf16_hd64", "sm80_bwd_bf16_hd64"])

  def test_a_bad_setting_names_the_variable_and_the_allowed_values(self):
    units = kernel_units_module()
    _, error = units["parse_list"]("JAX_FLASH_HEAD_DIMS", "64,96", units["ALL_HEAD_DIMS"],
                                   units["ALL_HEAD_DIMS"])
    self.assertIn("JAX_FLASH_HEAD_DIMS='64,96'", error)
    self.assertIn("64, 128, 256", error)


@absltest.skipUnless(_cuda._library_path().exists(),
                     "jax_flash was installed without its CUDA kernel library")
class BuiltLibraryTest(absltest.TestCase):

  @absltest.skipUnless(os.environ.get("TEST_SRCDIR"), "not under bazel test")
  def test_bazel_tests_run_the_package_and_library_bazel_built(self):
    runfiles = pathlib.Path(os.environ["TEST_SRCDIR"])
    self.assertTrue(pathlib.Path(jax_flash.__file__).is_relative_to(runfiles))
    self.assertTrue(_cuda._library_path().is_relative_to(runfiles))

  def test_library_holds_the_configured_kernels(self):
    self.assertEqual(set(_cuda.compiled_kernels()), configured_kernels())

  def test_library_registers_its_ffi_targets(self):
    self.assertTrue(_cuda.library_loaded(), _cuda.unavailable_reason())
    q = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.bfloat16)
    text = jax.jit(jax.grad(
        lambda q, k, v: jax_flash.flash_attention(q, k, v).astype(jnp.float32).sum())
    ).trace(q, q, q).lower(lowering_platforms=("cuda",)).as_text()
    self.assertIn("jax_flash_fwd", text)
    self.assertIn("jax_flash_bwd", text)


if __name__ == "__main__":
  absltest.main()
