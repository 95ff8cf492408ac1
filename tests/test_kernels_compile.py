"""Every kernels/*.cu compiles for sm_80 and sm_90, with no register spills.

NVRTC through CuPy's low-level binding is the compiler ``cupy.RawModule`` uses on executors, with
the same source (includes inlined by ``cuda_kernels``), options and include directories; unlike
RawModule it needs no GPU. nvcc, where present, is a second opinion. Both report ptxas' resource
usage (``-v``), which is parsed: a spill store or load fails the test, as does a kernel that the
launcher can ask for but the source does not define. docs/performance.md quotes these reports.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from spark_gpu_mf.backends import cuda_kernels

ARCHS = ("80", "90")

# Every kernel name cuda_kernels can launch: one per instantiated configuration.
EXPECTED = {
    "hermitian.cu": {
        f"hermitian_t{tile}_{out}" for tile in (4, 8) for out in ("f32", "f16", "f64")
    },
    "cg_solver.cu": {
        f"cg_solve_{a}_p{p}_{where}"
        for a in ("f32", "f16")
        for p in (1, 2, 4, 8, 16)
        for where in ("smem", "global")
    },
    "sgd_mascot.cu": {f"mascot_sgd_d{d}" for d in (1, 2, 4, 8)} | {"mascot_group_sums"},
    "sgd_pruned.cu": {f"sgd_pruned_d{d}" for d in (1, 2, 4, 8)},
}
ALS_FILES = tuple(cuda_kernels.KERNEL_FILES)


@dataclass(frozen=True)
class Resources:
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    smem_bytes: int


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas(log: str) -> dict[str, Resources]:
    """Per-kernel resources from a ``ptxas -v`` report (nvcc's stderr or NVRTC's log)."""
    found: dict[str, Resources] = {}
    name = props = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            name, props = m.group(1), None
        elif (m := _PROPS.search(line)) and name:
            props = tuple(int(g) for g in m.groups())
        elif (m := _USED.search(line)) and name and props:
            stack, stores, loads = props
            found[name] = Resources(int(m.group(1)), stores, loads, stack, int(m.group(2) or 0))
            name = props = None
    return found


def _nvrtc():
    cupy = pytest.importorskip("cupy", reason="the gpu extra (CuPy + NVRTC) is not installed")
    from cupy.cuda import nvrtc

    try:
        nvrtc.getVersion()
    except Exception as error:  # noqa: BLE001 - libnvrtc missing or unloadable
        pytest.skip(f"NVRTC is not usable: {error}")
    return cupy, nvrtc


def _nvrtc_include_options(cupy) -> list[str]:
    """The -I options RawModule uses (CuPy's private helper; a fallback if it changes)."""
    try:
        from cupy._core.core import assemble_cupy_compiler_options

        return [o for o in assemble_cupy_compiler_options(()) if o.startswith("-I")]
    except Exception:  # noqa: BLE001 - private API
        import nvidia

        roots = [Path(p) / "cu13" / "include" for p in nvidia.__path__]
        return [f"-I{root}" for root in roots if (root / "cuda_fp16.h").exists()]


def nvrtc_compile(source: str, name: str, arch: str) -> tuple[str, bytes]:
    """Compile with NVRTC to a cubin for ``sm_<arch>``; returns (log, cubin)."""
    cupy, nvrtc = _nvrtc()
    options = [
        *cuda_kernels.COMPILE_OPTIONS,
        *_nvrtc_include_options(cupy),
        f"-arch=sm_{arch}",
        "--ptxas-options=-v",
    ]
    program = nvrtc.createProgram(source, name, [], [])
    try:
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError:
            pytest.fail(f"NVRTC failed on {name} for sm_{arch}:\n{nvrtc.getProgramLog(program)}")
        return nvrtc.getProgramLog(program), nvrtc.getCUBIN(program)
    finally:
        nvrtc.destroyProgram(program)


def assert_no_spills(report: dict[str, Resources], expected: set[str], where: str) -> None:
    assert set(report) == expected, f"{where}: kernels {set(report) ^ expected} differ"
    spilled = {k: r for k, r in report.items() if r.spill_stores or r.spill_loads}
    assert not spilled, f"{where}: register spills in {spilled}"
    # __launch_bounds__(256): every kernel must fit 256 threads in one SM's 64K registers.
    assert all(r.registers * 256 <= 65536 for r in report.values())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", sorted(EXPECTED))
def test_nvrtc_compiles_without_spills(source, arch):
    log, cubin = nvrtc_compile(cuda_kernels.kernel_source(source), source, arch)
    assert len(cubin) > 0
    report = parse_ptxas(log)
    assert_no_spills(report, EXPECTED[source], f"NVRTC {source} sm_{arch}")
    if source.startswith("sgd_"):
        # The SGD kernels keep a warp's factors in registers: no shared memory, no stack.
        assert all(r.smem_bytes == 0 and r.stack_bytes == 0 for r in report.values())


def test_the_module_runtime_compiles_is_every_file_together():
    """RawModule compiles module_source(): all files in one program, headers inlined once."""
    source = cuda_kernels.module_source()
    assert source.count("namespace gpumf {") >= 2 and '#include "' not in source
    log, _ = nvrtc_compile(source, "spark_gpu_mf_kernels.cu", "80")
    assert set(parse_ptxas(log)) == set().union(*(EXPECTED[f] for f in ALS_FILES))


def test_every_kernel_file_is_compiled_here():
    assert {p.name for p in cuda_kernels_dir().glob("*.cu")} == set(EXPECTED)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", sorted(EXPECTED))
def test_nvcc_compiles_without_spills(tmp_path, source, arch):
    path = tmp_path / source
    path.write_text(cuda_kernels.kernel_source(source))
    cmd = ["nvcc", f"-arch=sm_{arch}", "-cubin", "-Xptxas", "-v", "-o", str(path) + ".cubin"]
    result = subprocess.run([*cmd, str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert_no_spills(parse_ptxas(result.stderr), EXPECTED[source], f"nvcc {source} sm_{arch}")


def test_ptxas_report_parser():
    log = """ptxas info    : Compiling entry function 'k' for 'sm_80'
ptxas info    : Function properties for k
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 8320 bytes smem, 472 bytes cmem[0]"""
    assert parse_ptxas(log) == {"k": Resources(96, 4, 12, 8, 8320)}


def test_kernel_files_follow_the_shim_rules():
    """What the host shim needs: extern "C" entry points, no inline PTX, dynamic shared memory
    only through GPUMF_DYNAMIC_SMEM."""
    for path in sorted(cuda_kernels_dir().glob("*.cu*")):
        text = path.read_text()
        assert "asm(" not in text and "asm volatile" not in text, path.name
        assert "extern __shared__" not in text.replace(
            "#define GPUMF_DYNAMIC_SMEM(type, name) extern __shared__", ""
        ), path.name
        if path.suffix == ".cu":
            assert 'extern "C" __global__' in text, path.name


def cuda_kernels_dir() -> Path:
    return Path(cuda_kernels.__file__).resolve().parents[2] / "kernels"
