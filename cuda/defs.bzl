# Bazel macros that compile the kernel library with nvcc (Bazel 4 has no CUDA
# rules of its own): one action per compilation unit, so units build in parallel.

load(":kernel_units.bzl", "COMPILE_FLAGS", "LINK_FLAGS")

_NVCC = "@local_cuda//:nvcc"

# Where the @xla_ffi headers lie in the execution root.
_FFI_INCLUDE = "external/xla_ffi/include"

def _in_own_tmpdir(command):
    """`command` with TMPDIR set to a directory of its own, removed afterwards.
    nvcc names its intermediate files after its process id, and the sandbox gives
    every action its own process ids but a shared /tmp: two units compiled at
    once could otherwise overwrite each other's intermediates and link one
    unit's code under another's name."""
    return ("tmp=$$(mktemp -d) && TMPDIR=$$tmp " + command +
            "; status=$$?; rm -rf $$tmp; exit $$status")

def nvcc_object(name, src, flags):
    """Compiles `src` (with every header of //cuda and the XLA FFI headers) to
    objs/<name>.o."""
    native.genrule(
        name = name,
        srcs = [src, ":headers", "@xla_ffi//:headers"],
        outs = ["objs/%s.o" % name],
        tools = [_NVCC],
        cmd = _in_own_tmpdir(" ".join(
            ["$(execpath %s)" % _NVCC] + COMPILE_FLAGS + ["-isystem", _FFI_INCLUDE] + flags +
            ["-c", "$(execpath %s)" % src, "-o", "$@"],
        )),
    )

def nvcc_shared_library(name, objects, out):
    """Links `objects` into the shared library `out`, the CUDA runtime static."""
    native.genrule(
        name = name,
        srcs = objects,
        outs = [out],
        tools = [_NVCC],
        cmd = _in_own_tmpdir(" ".join(["$(execpath %s)" % _NVCC] + LINK_FLAGS +
                                      ["-o", "$@", "$(SRCS)"])),
    )
