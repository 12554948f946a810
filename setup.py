"""Builds jax_flash: the Python package plus the CUDA kernel library.

The kernel library (`jax_flash/_lib/libjax_flash_cuda.so`) is a plain shared
object with C-linkage XLA FFI handlers and the CUDA runtime linked statically; it
has no Python ABI, so one build serves every Python version. Without nvcc the
package installs the portable path only.

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
LIB_NAME = "libjax_flash_cuda.so"

ALL_HEAD_DIMS = ("64", "128", "256")
ALL_DTYPES = ("bf16", "f16")
HOST_SOURCES = ("ffi/flash_ffi.cc", "kernel_registry.cc")
# Passes with sm90 kernels; what they lack (the head_dim 256 backward) runs the
# sm80 kernel on Hopper too.
SM90_PASSES = ("fwd", "bwd")


def _list_env(name, default, allowed):
  values = [v.strip() for v in os.environ.get(name, default).replace(";", ",").split(",")
            if v.strip()]
  bad = [v for v in values if allowed is not None and v not in allowed]
  if bad or not values:
    raise SystemExit(f"{name}={os.environ.get(name)!r}: allowed values are "
                     f"{', '.join(allowed)}")
  return values


def kernel_units(archs):
  """(object name, source, defines, gencode) of every kernel compilation unit.

  The sm80 family is compiled for every arch in `archs` (it runs everywhere);
  the sm90 family (wgmma, TMA) only for sm_90a, when 90 is among them.
  """
  gencode = []
  for arch in archs:
    gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
  # PTX of the newest arch lets newer GPUs JIT-compile the sm80 family.
  gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
  families = [("sm80", gencode, ("fwd", "bwd"))]
  if "90" in archs:
    families.append(("sm90", ["-gencode", "arch=compute_90a,code=sm_90a"], SM90_PASSES))
  units = []
  for family, family_gencode, passes in families:
    for dtype in _list_env("JAX_FLASH_DTYPES", ",".join(ALL_DTYPES), ALL_DTYPES):
      for head_dim in _list_env("JAX_FLASH_HEAD_DIMS", ",".join(ALL_HEAD_DIMS), ALL_HEAD_DIMS):
        for pass_ in passes:
          units.append((f"{family}_{pass_}_{dtype}_hd{head_dim}", f"{family}/instantiate.cu",
                        [f"-DJAX_FLASH_PASS={pass_}", f"-DJAX_FLASH_DTYPE={dtype}",
                         f"-DJAX_FLASH_HEAD_DIM={head_dim}"], family_gencode))
  return units


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
    return os.path.join(*ext_name.split(".")[:-1], LIB_NAME)

  def build_extension(self, ext):
    target = pathlib.Path(self.get_ext_fullpath(ext.name))
    nvcc = None if os.environ.get("JAX_FLASH_SKIP_CUDA") == "1" else find_nvcc()
    if nvcc is None:
      print("jax_flash: nvcc not found (or JAX_FLASH_SKIP_CUDA=1): installing the "
            "portable path only; the CUDA kernels are not built.", file=sys.stderr)
      return
    archs = _list_env("JAX_FLASH_CUDA_ARCHS", "80;90", None)
    include = ffi_include_dir()
    obj_dir = pathlib.Path(self.build_temp).resolve() / "jax_flash_cuda"
    obj_dir.mkdir(parents=True, exist_ok=True)

    common = ["-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-isystem", include]
    jobs = []
    for name, source, defines, gencode in kernel_units(archs):
      jobs.append((obj_dir / f"{name}.o",
                   [nvcc, *common, *gencode, *defines, "-c", str(CUDA_DIR / source)]))
    for src in HOST_SOURCES:
      obj = obj_dir / (src.replace("/", "_") + ".o")
      jobs.append((obj, [nvcc, *common, "-c", str(CUDA_DIR / src)]))

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
    subprocess.run([nvcc, "-shared", "-cudart", "static", "-o", str(target),
                    *[str(obj) for obj, _ in jobs]], check=True)
    print(f"jax_flash: built {target}", flush=True)


setup(
    ext_modules=[Extension("jax_flash._lib.libjax_flash_cuda", sources=[])],
    cmdclass={"build_ext": BuildCudaLibrary},
)
