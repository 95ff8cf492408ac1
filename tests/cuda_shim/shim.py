"""Build the CUDA host shim around the unchanged ``kernels/*.cu`` and call kernels through ctypes.

``build_library`` compiles one shared library per (sources, mode) under ``tests/cuda_shim/build/``,
keyed by a hash of every input, so that repeated test runs reuse it. ``ShimModule`` mimics the part
of ``cupy.RawModule`` / ``RawKernel`` that spark_gpu_mf uses (``get_function(name)(grid, block,
args, shared_mem=...)``) on NumPy arrays: arrays are passed as pointers, NumPy scalars by value at
their own type, exactly as CuPy passes them to ``cuLaunchKernel``. The CuPy backend's launch code
can therefore be run unchanged against the shim.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

SHIM_DIR = Path(__file__).resolve().parent
KERNEL_DIR = SHIM_DIR.parent.parent / "kernels"
BUILD_DIR = SHIM_DIR / "build"
SHIM_FILES = ("cudashim.h", "cudashim_runtime.h", "cuda_fp16.h")

MODES = {
    # Deterministic and fast: one OS thread, a fiber per CUDA thread.
    "fibers": ["-O2"],
    # One std::thread per CUDA thread, instrumented for ThreadSanitizer (run it with libtsan
    # preloaded, see tsan_environment).
    "tsan": ["-O1", "-g", "-fsanitize=thread", "-DCUDASHIM_THREADS"],
}

_ENTRY = re.compile(r'extern\s+"C"\s+void\s+(\w+)\s*\(')


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _kernel_names(cxx: str, source: Path, include_dirs: list[Path]) -> list[str]:
    """The extern "C" entry points of ``source``, read from its preprocessed text."""
    cmd = [cxx, "-std=c++20", "-E", "-P", "-x", "c++", "-include", str(SHIM_DIR / "cudashim.h")]
    cmd += [f"-I{d}" for d in include_dirs] + [str(source)]
    text = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return sorted(set(_ENTRY.findall(text)))


def build_library(
    sources: list[Path] | None = None,
    mode: str = "fibers",
    *,
    kernel_dir: Path = KERNEL_DIR,
    defines: tuple[str, ...] = (),
) -> Path:
    """Compile the shim library for ``sources`` (default: every ``kernels/*.cu``); cached."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) on PATH")
    sources = sorted(sources or kernel_dir.glob("*.cu"))
    flags = ["-std=c++20", "-fPIC", "-shared", *MODES[mode], *[f"-D{d}" for d in defines]]
    include_dirs = [SHIM_DIR, kernel_dir]
    digest = hashlib.sha256()
    version = subprocess.run([cxx, "--version"], check=False, capture_output=True, text=True).stdout
    for part in (version, " ".join(flags)):
        digest.update(part.encode())
    inputs = [*sources, *kernel_dir.glob("*.cuh"), *(SHIM_DIR / f for f in SHIM_FILES)]
    for path in inputs:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    out_dir = BUILD_DIR / f"{mode}-{digest.hexdigest()[:16]}"
    library = out_dir / "libcudashim.so"
    if library.exists():
        return library
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [n for s in sources for n in _kernel_names(cxx, s, include_dirs)]
    lines = ['#include "cudashim.h"']
    lines += [f'#include "{s}"' for s in sources]
    lines += ['#include "cudashim_runtime.h"']
    lines += [f"CUDASHIM_KERNEL({n})" for n in names]
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        main = Path(tmp) / "library.cpp"
        main.write_text("\n".join(lines) + "\n")
        built = Path(tmp) / "libcudashim.so"
        cmd = [cxx, *flags, *[f"-I{d}" for d in include_dirs], str(main), "-o", str(built)]
        result = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"shim build failed:\n{' '.join(cmd)}\n{result.stderr}")
        shutil.copy(main, out_dir / "library.cpp")
        os.replace(built, library)  # atomic: concurrent test runs never see half a library
    return library


def tsan_environment() -> dict[str, str]:
    """Environment for a Python process that loads a ``mode="tsan"`` library."""
    cxx = compiler()
    runtime = subprocess.run(
        [cxx, "-print-file-name=libtsan.so"], check=False, capture_output=True, text=True
    ).stdout.strip()
    env = dict(os.environ)
    env["LD_PRELOAD"] = runtime
    env["TSAN_OPTIONS"] = "halt_on_error=0 exitcode=66 report_signal_unsafe=0"
    return env


class ShimKernel:
    """One kernel of a ``ShimModule``; called like ``cupy.RawKernel``."""

    def __init__(self, module: ShimModule, name: str):
        self._module = module
        self.name = name
        self.attributes = {}
        self.max_dynamic_shared_size_bytes = 0  # accepted and ignored, as a real kernel's

    def __call__(self, grid, block, args, *, shared_mem: int = 0) -> None:
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        keep = []  # ctypes objects must live until the launch returns
        pointers = (ctypes.c_void_p * len(args))()
        for i, arg in enumerate(args):
            if isinstance(arg, np.ndarray):
                if not arg.flags.c_contiguous:
                    raise ValueError(f"argument {i} of {self.name} is not C-contiguous")
                holder = ctypes.c_void_p(arg.ctypes.data)
            elif isinstance(arg, np.generic):
                holder = np.array(arg)  # its own dtype, as CuPy passes NumPy scalars
            else:
                raise TypeError(
                    f"argument {i} of {self.name}: pass arrays or NumPy scalars, got {type(arg)}"
                )
            keep.append(holder)
            pointers[i] = (
                ctypes.addressof(holder)
                if isinstance(holder, ctypes.c_void_p)
                else holder.ctypes.data
            )
        rc = self._module.lib.cudashim_launch(
            self.name.encode(), *grid, *block, ctypes.c_size_t(int(shared_mem)), pointers
        )
        if rc == 1:
            raise KeyError(f"no kernel {self.name!r} in the shim library")
        if rc != 0:
            raise ValueError(f"bad launch of {self.name}: block {block}")


class ShimModule:
    """``cupy.RawModule`` look-alike backed by a shim library."""

    def __init__(self, library: Path):
        self.lib = ctypes.CDLL(str(library))
        self.lib.cudashim_launch.restype = ctypes.c_int
        self.lib.cudashim_launch.argtypes = (
            [ctypes.c_char_p]
            + [ctypes.c_uint] * 6
            + [
                ctypes.c_size_t,
                ctypes.POINTER(ctypes.c_void_p),
            ]
        )
        self.lib.cudashim_kernel_names.restype = ctypes.c_char_p

    @property
    def kernel_names(self) -> list[str]:
        return self.lib.cudashim_kernel_names().decode().split()

    def get_function(self, name: str) -> ShimKernel:
        if name not in self.kernel_names:
            raise KeyError(f"no kernel {name!r} in the shim library")
        return ShimKernel(self, name)
