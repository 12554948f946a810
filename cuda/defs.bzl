# Bazel macros that compile the kernel library with nvcc (Bazel 4 has no CUDA
# rules of its own): one action per compilation unit, so units build in parallel.

load(":kernel_units.bzl", "COMPILE_FLAGS", "LINK_FLAGS")

_NVCC = "@local_cuda//:nvcc"

# Where the @xla_ffi headers lie in the execution root.
_FFI_INCLUDE = "external/xla_ffi/include"

def nvcc_object(name, src, flags):
    """Compiles `src` (with every header of //cuda and the XLA FFI headers) to
    objs/<name>.o."""
    native.genrule(
        name = name,
        srcs = [src, ":headers", "@xla_ffi//:headers"],
        outs = ["objs/%s.o" % name],
        tools = [_NVCC],
        cmd = " ".join(["$(execpath %s)" % _NVCC] + COMPILE_FLAGS + ["-isystem", _FFI_INCLUDE] +
                       flags + ["-c", "$(execpath %s)" % src, "-o", "$@"]),
    )

def nvcc_shared_library(name, objects, out):
    """Links `objects` into the shared library `out`, the CUDA runtime static."""
    native.genrule(
        name = name,
        srcs = objects,
        outs = [out],
        tools = [_NVCC],
        cmd = " ".join(["$(execpath %s)" % _NVCC] + LINK_FLAGS + ["-o", "$@", "$(SRCS)"]),
    )
