"""Numba intrinsics shared by the CPU kernels (ALS solvers and SGD): FP16 bits and prefetch.

Numba 0.68 cannot compile ``float16`` arrays on the CPU (``NotImplementedError: float16``), so
factors stored in FP16 are ``uint16`` arrays holding the bits of ``numpy.float16`` values, and the
compiled kernels convert with two LLVM intrinsics defined here: ``fpext half -> float`` and
``fptrunc float -> half`` (round to nearest, ties to even, exactly NumPy's ``astype(float16)``
and CUDA's ``__float2half_rn``). On x86-64 with F16C (every AVX2 CPU) LLVM lowers them to
``vcvtph2ps`` / ``vcvtps2ph`` and vectorizes loops over a row, 8 or 16 values per instruction.

Also here: ``prefetch``, LLVM's software prefetch, which the kernels use to request the factor
rows of a rating a few ratings ahead (rows are visited in random order, so the hardware
prefetchers cannot guess them).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = [
    "FP16_MAX",
    "float_to_half",
    "from_half_bits",
    "half_to_float",
    "non_finite_half",
    "prefetch",
    "to_half_bits",
]

#: Largest finite float16; anything that rounds above it is stored as infinity.
FP16_MAX = 65504.0


@intrinsic
def half_to_float(typingctx, bits):
    """float32 value of the float16 whose bits are the uint16 ``bits`` (exact)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        value = builder.bitcast(args[0], ir.HalfType())
        return builder.fpext(value, ir.FloatType())

    return sig, codegen


@intrinsic
def float_to_half(typingctx, value):
    """uint16 bits of ``value`` (float32) rounded to float16, to nearest with ties to even."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        rounded = builder.fptrunc(args[0], ir.HalfType())
        return builder.bitcast(rounded, ir.IntType(16))

    return sig, codegen


@intrinsic
def prefetch(typingctx, array, row, column):
    """Hint that ``array[row, column]`` (a 2-D C-contiguous array) is about to be written."""
    sig = types.void(array, row, column)

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        struct = context.make_array(array_type)(context, builder, args[0])
        index = [context.cast(builder, args[i], signature.args[i], types.intp) for i in (1, 2)]
        pointer = cgutils.get_item_pointer(
            context, builder, array_type, struct, index, wraparound=False
        )
        byte_pointer = builder.bitcast(pointer, ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), i32, i32, i32]),
            "llvm.prefetch.p0",
        )
        # rw=1 (the row is written back), locality=3 (keep in all cache levels), data cache
        builder.call(
            function, [byte_pointer, ir.Constant(i32, 1), ir.Constant(i32, 3), ir.Constant(i32, 1)]
        )
        return context.get_dummy_value()

    return sig, codegen


def to_half_bits(values: np.ndarray) -> np.ndarray:
    """uint16 bits of ``values`` rounded to float16 (NumPy: round to nearest, ties to even)."""
    return np.asarray(values, dtype=np.float32).astype(np.float16).view(np.uint16)


def from_half_bits(bits: np.ndarray) -> np.ndarray:
    """float32 values of uint16 float16 bits."""
    return np.asarray(bits, dtype=np.uint16).view(np.float16).astype(np.float32)


def non_finite_half(bits: np.ndarray) -> bool:
    """Whether any uint16 float16 bit pattern is an infinity or a NaN (all exponent bits set)."""
    return bool(np.any((np.asarray(bits, dtype=np.uint16) & 0x7C00) == 0x7C00))
