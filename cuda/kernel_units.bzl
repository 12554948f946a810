# The kernel library's sources, compilation units and compiler flags: the one
# list both builds read. Bazel loads this file as Starlark; setup.py executes it
# as Python. Keep to what the two languages share (literals, functions, list
# comprehensions, `%` formatting; no f-strings, imports or exceptions).

# Host code: the XLA FFI handlers and the kernel registry.
HOST_SOURCES = ["ffi/flash_ffi.cc", "kernel_registry.cc"]

# Each kernel family's translation unit, compiled once per (dtype, head dim, pass)
# with the configuration in -D defines (see unit_config.h).
FAMILY_SOURCES = {"sm80": "sm80/instantiate.cu", "sm90": "sm90/instantiate.cu"}
PASSES = ["fwd", "bwd"]

# What a build compiles unless JAX_FLASH_CUDA_ARCHS / JAX_FLASH_DTYPES /
# JAX_FLASH_HEAD_DIMS say otherwise.
DEFAULT_CUDA_ARCHS = ["80", "90"]
ALL_DTYPES = ["bf16", "f16"]
ALL_HEAD_DIMS = ["64", "128", "256"]

COMPILE_FLAGS = ["-std=c++17", "-O3", "-Xcompiler", "-fPIC"]
LINK_FLAGS = ["-shared", "-cudart", "static"]
LIBRARY_NAME = "libjax_flash_cuda.so"

def parse_list(name, value, default, allowed):
    """The entries of a comma- or semicolon-separated setting, and an error
    message ("" if none) naming the setting and what it allows."""
    if value == None:
        value = ",".join(default)
    values = [v.strip() for v in value.replace(";", ",").split(",") if v.strip()]
    bad = [v for v in values if allowed != None and v not in allowed]
    if bad or not values:
        allowed_text = ", ".join(allowed) if allowed != None else "compute capabilities such as 80, 90"
        return values, "%s=%r: allowed values are %s" % (name, value, allowed_text)
    return values, ""

# The settings that choose what to compile: (variable, default, allowed values;
# None: any).
UNIT_SETTINGS = [
    ("JAX_FLASH_CUDA_ARCHS", DEFAULT_CUDA_ARCHS, None),
    ("JAX_FLASH_DTYPES", ALL_DTYPES, ALL_DTYPES),
    ("JAX_FLASH_HEAD_DIMS", ALL_HEAD_DIMS, ALL_HEAD_DIMS),
]

def configured_settings(environ):
    """[archs, dtypes, head_dims] from the UNIT_SETTINGS in `environ` (a dict of
    the environment), and an error message ("" if none)."""
    settings = []
    for name, default, allowed in UNIT_SETTINGS:
        values, error = parse_list(name, environ.get(name), default, allowed)
        if error:
            return settings, error
        settings.append(values)
    return settings, ""

def kernel_units(archs, dtypes, head_dims):
    """(name, source, flags) of every kernel compilation unit.

    The sm80 family is compiled for every arch in `archs` (it runs everywhere),
    with the PTX of the newest so that newer GPUs can compile it at load time;
    the sm90 family (wgmma, TMA) only for sm_90a, when 90 is among them.
    """
    sm80_gencode = []
    for arch in archs:
        sm80_gencode += ["-gencode", "arch=compute_%s,code=sm_%s" % (arch, arch)]
    sm80_gencode += ["-gencode", "arch=compute_%s,code=compute_%s" % (archs[-1], archs[-1])]
    families = [("sm80", sm80_gencode)]
    if "90" in archs:
        families.append(("sm90", ["-gencode", "arch=compute_90a,code=sm_90a"]))
    units = []
    for family, gencode in families:
        for dtype in dtypes:
            for head_dim in head_dims:
                for pass_ in PASSES:
                    defines = [
                        "-DJAX_FLASH_PASS=" + pass_,
                        "-DJAX_FLASH_DTYPE=" + dtype,
                        "-DJAX_FLASH_HEAD_DIM=" + head_dim,
                    ]
                    name = "%s_%s_%s_hd%s" % (family, pass_, dtype, head_dim)
                    units.append((name, FAMILY_SOURCES[family], gencode + defines))
    return units

def host_units():
    """(name, source, flags) of the host compilation units."""
    return [(src.replace("/", "_").replace(".", "_"), src, []) for src in HOST_SOURCES]
