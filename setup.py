"""Builds jax_flash: the Python package plus the CUDA kernel library.

The kernel library (`jax_flash/_lib/libjax_flash_cuda.so`) is a plain shared
object with C-linkage XLA FFI handlers and the CUDA runtime linked statically; it
has no Python ABI, so one build serves every Python version. Without nvcc the
package installs the portable path only. The sources, compilation units and
compiler flags come from cuda/kernel_units.bzl, which the Bazel build reads too.

Environment variables:
  JAX_FLASH_CUDA_ARCHS   compute capabilities to compile for (default "80;90"); the
                         sm80 kernels are built for each, and with 90 the sm90
                         kernels for sm_90a
  JAX_FLASH_HEAD_DIMS    native head dims to compile (default "64,128,256")
  JAX_FLASH_DTYPES       element types to compile (default "bf16,f16")
  JAX_FLASH_BUILD_JOBS   parallel compiler processes (default: CPU count)
  JAX_FLASH_SKIP_CUDA    "1" installs the portable path only
  JAX_FLASH_FFI_INCLUDE  XLA FFI headers to build against (default: the
                         jaxlib of the build environment, pinned in pyproject.toml)
  CUDA_HOME / NVCC       where to find nvcc (default: nvcc on PATH)
"""

import concurrent.futures
import os
import pathlib
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = pathlib.Path(__file__).parent.resolve()
CUDA_DIR = ROOT / "cuda"


def _load_kernel_units():
  """cuda/kernel_units.bzl, the source and unit list Bazel reads too, as a module."""
  namespace = {}
  path = CUDA_DIR / "kernel_units.bzl"
  exec(compile(path.read_text(), str(path), "exec"), namespace)
  return namespace


UNITS = _load_kernel_units()


def compilation_units():
  """(object name, source, flags) of every unit this build compiles, and the archs."""
  settings, error = UNITS["configured_settings"](os.environ)
  if error:
    raise SystemExit(error)
  return UNITS["kernel_units"](*settings) + UNITS["host_units"](), settings[0]


def find_nvcc():
  if os.environ.get("NVCC"):
    return shutil.which(os.environ["NVCC"])
  cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
  if cuda_home and (pathlib.Path(cuda_home) / "bin" / "nvcc").exists():
    return str(pathlib.Path(cuda_home) / "bin" / "nvcc")
  return shutil.which("nvcc")


def ffi_include_dir():
  if os.environ.get("JAX_FLASH_FFI_INCLUDE"):
    return os.environ["JAX_FLASH_FFI_INCLUDE"]
  try:
    import jaxlib  # the build environment's, pinned to the oldest supported
  except ImportError as e:
    raise SystemExit("jax_flash: building the CUDA library needs jaxlib's XLA FFI "
                     "headers; install jaxlib or set JAX_FLASH_FFI_INCLUDE") from e
  include = pathlib.Path(jaxlib.__file__).parent / "include"
  if not (include / "xla" / "ffi" / "api" / "ffi.h").exists():
    raise SystemExit(f"jax_flash: no XLA FFI headers under {include}")
  print(f"jax_flash: building against the XLA FFI headers of jaxlib "
        f"{getattr(jaxlib, '__version__', '?')}")
  return str(include)


def _newest_source_mtime():
  return max(p.stat().st_mtime for p in CUDA_DIR.rglob("*") if p.is_file())


class BuildCudaLibrary(build_ext):
  """Compiles the kernel units in parallel with nvcc and links one shared object."""

  def get_ext_filename(self, ext_name):
    # A plain library name: no Python ABI tag, since the library has no Python ABI.
    return os.path.join(*ext_name.split(".")[:-1], UNITS["LIBRARY_NAME"])

  def build_extension(self, ext):
    target = pathlib.Path(self.get_ext_fullpath(ext.name))
    nvcc = None if os.environ.get("JAX_FLASH_SKIP_CUDA") == "1" else find_nvcc()
    if nvcc is None:
      print("jax_flash: nvcc not found (or JAX_FLASH_SKIP_CUDA=1): installing the "
            "portable path only; the CUDA kernels are not built.", file=sys.stderr)
      return
    units, archs = compilation_units()
    include = ffi_include_dir()
    obj_dir = pathlib.Path(self.build_temp).resolve() / "jax_flash_cuda"
    obj_dir.mkdir(parents=True, exist_ok=True)

    common = [*UNITS["COMPILE_FLAGS"], "-isystem", include]
    jobs = [(obj_dir / f"{name}.o", [nvcc, *common, *flags, "-c", str(CUDA_DIR / source)])
            for name, source, flags in units]

    newest = _newest_source_mtime()
    todo = [(obj, cmd) for obj, cmd in jobs
            if not obj.exists() or obj.stat().st_mtime < newest]
    n_jobs = int(os.environ.get("JAX_FLASH_BUILD_JOBS", os.cpu_count() or 1))
    print(f"jax_flash: compiling {len(todo)} of {len(jobs)} units for sm_{',sm_'.join(archs)} "
          f"with {n_jobs} jobs", flush=True)

    def compile_one(job):
      obj, cmd = job
      result = subprocess.run(cmd + ["-o", str(obj)], capture_output=True, text=True)
      if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{result.stdout}{result.stderr}")
      print(f"jax_flash: compiled {obj.name}", flush=True)

    with concurrent.futures.ThreadPoolExecutor(max_workers=n_jobs) as pool:
      for future in [pool.submit(compile_one, job) for job in todo]:
        future.result()

    target.parent.mkdir(parents=True, exist_ok=True)
    # In-place (editable) builds copy the library next to the sources afterwards.
    (ROOT / "jax_flash" / "_lib").mkdir(exist_ok=True)
    subprocess.run([nvcc, *UNITS["LINK_FLAGS"], "-o", str(target),
                    *[str(obj) for obj, _ in jobs]], check=True)
    print(f"jax_flash: built {target}", flush=True)


setup(
    ext_modules=[Extension("jax_flash._lib.libjax_flash_cuda", sources=[])],
    cmdclass={"build_ext": BuildCudaLibrary},
)
