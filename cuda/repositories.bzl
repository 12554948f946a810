# Local repositories of the Bazel build, configured from the environment (no
# network):
#   @local_cuda      nvcc, and the units to compile (config.bzl)
#   @xla_ffi         jaxlib's XLA FFI headers
#   @local_python    the Python interpreter that runs the tests
# plus offline stand-ins for the repositories Bazel 4's own tools would download.
#
# Environment (read when Bazel fetches these repositories; a change refetches):
#   CUDA_HOME / CUDA_PATH / NVCC   where nvcc is (default: nvcc on PATH, then
#                                  /usr/local/cuda/bin/nvcc)
#   JAX_FLASH_CUDA_ARCHS, JAX_FLASH_DTYPES, JAX_FLASH_HEAD_DIMS
#                                  what to compile, as for setup.py
#   JAX_FLASH_FFI_INCLUDE          XLA FFI headers (default: those of the jaxlib
#                                  that PYTHON_BIN_PATH imports)
#   PYTHON_BIN_PATH                the interpreter (default: python3 on PATH)

load("//cuda:kernel_units.bzl", "UNIT_SETTINGS", "configured_settings")

def _find_nvcc(ctx):
    env = ctx.os.environ
    if env.get("NVCC"):
        found = ctx.which(env["NVCC"]) if "/" not in env["NVCC"] else ctx.path(env["NVCC"])
        if found == None or not found.exists:
            fail("jax_flash: NVCC=%s is not an executable nvcc" % env["NVCC"])
        return found
    for var in ["CUDA_HOME", "CUDA_PATH"]:
        if env.get(var):
            found = ctx.path(env[var] + "/bin/nvcc")
            if not found.exists:
                fail("jax_flash: %s=%s has no bin/nvcc" % (var, env[var]))
            return found
    found = ctx.which("nvcc")
    if found != None:
        return found
    found = ctx.path("/usr/local/cuda/bin/nvcc")
    if found.exists:
        return found
    fail("jax_flash: nvcc not found: put it on PATH or set CUDA_HOME (the Bazel " +
         "build compiles the CUDA kernel library; `pip install .` without nvcc " +
         "installs the portable path only)")

def _local_cuda_impl(ctx):
    nvcc = _find_nvcc(ctx)
    # A wrapper rather than a link: nvcc finds its own installation from its path.
    ctx.file("nvcc", "#!/bin/sh\nexec '%s' \"$@\"\n" % nvcc, executable = True)
    settings, error = configured_settings(ctx.os.environ)
    if error:
        fail("jax_flash: " + error)
    config = ["# What //cuda compiles, from the environment at fetch time.\n"]
    for (name, _, _), values in zip(UNIT_SETTINGS, settings):
        config.append("%s = %r\n" % (name.replace("JAX_FLASH_", ""), values))
    ctx.file("config.bzl", "".join(config))
    ctx.file("BUILD", 'exports_files(["nvcc", "config.bzl"])\n')

local_cuda_repository = repository_rule(
    implementation = _local_cuda_impl,
    environ = ["CUDA_HOME", "CUDA_PATH", "NVCC", "PATH"] + [s[0] for s in UNIT_SETTINGS],
    local = True,
)

def _python(ctx):
    """The interpreter's own path (PYTHON_BIN_PATH or python3 on PATH, through
    any shim or virtual environment)."""
    name = ctx.os.environ.get("PYTHON_BIN_PATH", "python3")
    python = ctx.which(name) if "/" not in name else ctx.path(name)
    if python == None or not python.exists:
        fail("jax_flash: no Python interpreter %s: set PYTHON_BIN_PATH" % name)
    result = ctx.execute([python, "-c", "import sys; print(sys.executable)"])
    if result.return_code != 0:
        fail("jax_flash: %s does not run: %s" % (python, result.stderr))
    return result.stdout.strip()

def _xla_ffi_impl(ctx):
    include = ctx.os.environ.get("JAX_FLASH_FFI_INCLUDE")
    origin = "JAX_FLASH_FFI_INCLUDE"
    if not include:
        python = _python(ctx)
        result = ctx.execute([python, "-c", "import jax.ffi, jaxlib; " +
                                            "print(jax.ffi.include_dir()); print(jaxlib.__version__)"])
        if result.return_code != 0:
            fail("jax_flash: %s cannot import jax to find the XLA FFI headers: %s" %
                 (python, result.stderr.strip().split("\n")[-1]) +
                 "\nInstall jax and jaxlib for it, point PYTHON_BIN_PATH at one that has " +
                 "them, or set JAX_FLASH_FFI_INCLUDE")
        include, version = result.stdout.strip().split("\n")
        origin = "jaxlib %s of %s" % (version, python)
    if not ctx.path(include + "/xla/ffi/api/ffi.h").exists:
        fail("jax_flash: no XLA FFI headers (xla/ffi/api/ffi.h) under %s (from %s)" %
             (include, origin))
    ctx.symlink(include, "include")
    ctx.file("BUILD", "\n".join([
        "# XLA FFI headers of %s." % origin,
        "filegroup(",
        '    name = "headers",',
        '    srcs = glob(["include/xla/ffi/**"]),',
        '    visibility = ["//visibility:public"],',
        ")",
        "",
    ]))

xla_ffi_repository = repository_rule(
    implementation = _xla_ffi_impl,
    environ = ["JAX_FLASH_FFI_INCLUDE", "PYTHON_BIN_PATH", "PATH"],
    local = True,
)

def _local_python_impl(ctx):
    python = _python(ctx)
    ctx.file("BUILD", "\n".join([
        'load("@bazel_tools//tools/python:toolchain.bzl", "py_runtime_pair")',
        "",
        "py_runtime(",
        '    name = "python3",',
        '    interpreter_path = "%s",' % python,
        '    python_version = "PY3",',
        ")",
        "",
        'py_runtime_pair(name = "runtimes", py3_runtime = ":python3")',
        "",
        "toolchain(",
        '    name = "toolchain",',
        '    toolchain = ":runtimes",',
        '    toolchain_type = "@bazel_tools//tools/python:toolchain_type",',
        ")",
        "",
    ]))

local_python_repository = repository_rule(
    implementation = _local_python_impl,
    environ = ["PYTHON_BIN_PATH", "PATH"],
    local = True,
)

# Bazel 4's built-in tools load @rules_cc, @rules_java and @rules_proto and name
# @remote_coverage_tools, all of which it would download. Offline, these
# stand-ins forward to the rules built into Bazel 4, and coverage is not offered.
_NATIVE_RULES = {
    "rules_cc": ("cc", ["cc_binary", "cc_import", "cc_library", "cc_proto_library", "cc_test",
                        "cc_toolchain", "cc_toolchain_suite", "fdo_prefetch_hints",
                        "fdo_profile", "objc_library"]),
    "rules_java": ("java", ["java_binary", "java_import", "java_library",
                            "java_lite_proto_library", "java_package_configuration",
                            "java_plugin", "java_proto_library", "java_runtime", "java_test",
                            "java_toolchain"]),
    "rules_proto": ("proto", ["proto_lang_toolchain", "proto_library"]),
}

def _native_rules_impl(ctx):
    package, rules = _NATIVE_RULES[ctx.name]
    ctx.file("BUILD", "")
    ctx.file(package + "/BUILD", "")
    ctx.file(package + "/defs.bzl", "".join([
        "def %s(**kwargs):\n    native.%s(**kwargs)\n\n" % (rule, rule)
        for rule in rules
    ]))

_native_rules_repository = repository_rule(implementation = _native_rules_impl)

def _no_coverage_tools_impl(ctx):
    ctx.file("BUILD", "\n".join([
        "filegroup(",
        '    name = "coverage_report_generator",',
        '    visibility = ["//visibility:public"],',
        ")",
        "",
    ]))

_no_coverage_tools_repository = repository_rule(implementation = _no_coverage_tools_impl)

def jax_flash_repositories():
    """Every repository above that the workspace does not define already."""
    existing = native.existing_rules()
    if "local_cuda" not in existing:
        local_cuda_repository(name = "local_cuda")
    if "xla_ffi" not in existing:
        xla_ffi_repository(name = "xla_ffi")
    if "local_python" not in existing:
        local_python_repository(name = "local_python")
    for name in _NATIVE_RULES:
        if name not in existing:
            _native_rules_repository(name = name)
    if "remote_coverage_tools" not in existing:
        _no_coverage_tools_repository(name = "remote_coverage_tools")
