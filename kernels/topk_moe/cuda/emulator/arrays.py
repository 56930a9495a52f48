"""The array module of the emulated device: NumPy arrays in guarded, poisoned buffers.

It stands where CuPy stands for the real device (``xp`` in topk_moe.cuda.device):
``empty`` gives an array whose bytes are 0xff (NaN for floats, -1 for integers)
until a kernel writes them, as uninitialised device memory would be garbage, and
every buffer is fenced by GUARD_BYTES on each side. Before each launch the
launcher fills the fences of every array it passes with fresh pseudo-random
bytes (garbage, as a neighbouring allocation would hold: a read out of bounds
gets arbitrary values, and a read-modify-write such as relu rarely writes them
back unchanged) and checks them after the launch: a changed byte is an
out-of-bounds write, reported with the kernel's name.
Data starts on a 256-byte boundary, as cudaMalloc's do.

``asarray`` copies anything that is not already such an array (as CuPy copies
host memory to the device); ``matmul`` stands in for cuBLAS with NumPy (float16
computed in float32 and rounded once, as cuBLAS accumulates float16 in float32).
"""

from __future__ import annotations

import weakref

import numpy

ndarray = numpy.ndarray
int32, int64, float16, float32, uint8 = numpy.int32, numpy.int64, numpy.float16, numpy.float32, numpy.uint8
isfinite = numpy.isfinite

GUARD_BYTES = 256
ALIGNMENT = 256
POISON = 0xFF

#: data address -> (weak reference to the whole buffer, offset of the data in it, data bytes)
_BUFFERS: dict = {}


def _allocate(shape, dtype) -> numpy.ndarray:
    dtype = numpy.dtype(dtype)
    shape = (shape,) if isinstance(shape, (int, numpy.integer)) else tuple(shape)
    nbytes = int(numpy.prod(shape, dtype=numpy.int64)) * dtype.itemsize
    buffer = numpy.full(nbytes + 2 * GUARD_BYTES + ALIGNMENT, POISON, dtype=numpy.uint8)
    start = GUARD_BYTES + (-(buffer.ctypes.data + GUARD_BYTES)) % ALIGNMENT
    data = buffer[start:start + nbytes].view(dtype).reshape(shape)
    _forget_dead()
    # (NumPy may move the data pointer of a zero-size view: register the one it reports.)
    _BUFFERS[data.ctypes.data if nbytes == 0 else buffer.ctypes.data + start] = (weakref.ref(buffer), start, nbytes)
    return data


def _forget_dead() -> None:
    for address in [a for a, (ref, _, _) in _BUFFERS.items() if ref() is None]:
        del _BUFFERS[address]


def guarded_buffer(a):
    """(buffer, data offset, data bytes) of the guarded allocation holding array ``a``; None if none does."""
    if not isinstance(a, numpy.ndarray):
        return None
    address = a.ctypes.data
    for start_address, (ref, start, nbytes) in _BUFFERS.items():
        buffer = ref()
        if buffer is not None and start_address <= address <= start_address + nbytes:
            if address + a.nbytes <= start_address + nbytes:
                return buffer, start, nbytes
    return None


def arm_guards(buffer_info, rng: numpy.random.Generator) -> tuple:
    """Fill both fences of a guarded buffer with random bytes; returns them."""
    buffer, start, nbytes = buffer_info
    before = rng.integers(0, 256, size=start, dtype=numpy.uint8)
    after = rng.integers(0, 256, size=buffer.size - start - nbytes, dtype=numpy.uint8)
    buffer[:start] = before
    buffer[start + nbytes:] = after
    return before, after


def guard_damage(buffer_info, armed: tuple) -> str:
    """'' when both fences of a guarded buffer still hold what ``arm_guards`` put
    there, else where they were written."""
    buffer, start, nbytes = buffer_info
    before = numpy.flatnonzero(buffer[:start] != armed[0])
    after = numpy.flatnonzero(buffer[start + nbytes:] != armed[1])
    parts = []
    if before.size:
        parts.append(f"{start - int(before[0])} bytes before the start")
    if after.size:
        parts.append(f"{int(after[-1]) + 1} bytes past the end")
    return " and ".join(parts)


def empty(shape, dtype=numpy.float32) -> numpy.ndarray:
    return _allocate(shape, dtype)


def zeros(shape, dtype=numpy.float32) -> numpy.ndarray:
    a = _allocate(shape, dtype)
    a.fill(0)
    return a


def asarray(a, dtype=None) -> numpy.ndarray:
    if guarded_buffer(a) is not None and (dtype is None or numpy.dtype(dtype) == a.dtype):
        return a
    host = numpy.asarray(a, dtype=dtype)
    out = _allocate(host.shape, host.dtype)
    out[...] = host
    return out


def ascontiguousarray(a, dtype=None) -> numpy.ndarray:
    a = asarray(a, dtype=dtype)
    if a.flags.c_contiguous:
        return a
    out = _allocate(a.shape, a.dtype)
    out[...] = a
    return out


def matmul(a, b) -> numpy.ndarray:
    """cuBLAS's place: NumPy, float16 through float32 (one rounding at the end)."""
    if a.dtype == numpy.float16:
        return asarray(numpy.matmul(a.astype(numpy.float32), b.astype(numpy.float32)).astype(numpy.float16))
    return asarray(numpy.matmul(a, b))
