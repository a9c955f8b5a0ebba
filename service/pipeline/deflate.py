"""zlib streams and checksums by ISA-L, leaving the thread's vector registers clean.

ISA-L (``isal``, Intel's Intelligent Storage Acceleration Library) deflates, inflates and
checksums the zlib format in a fraction of zlib's time: a 256 x 256 heatmap's rows in 0.09
instead of 0.56 ms, a PNG's pixel stream in a third of the time (docs/performance-log.md).

Its AVX2 and AVX-512 routines return without ``vzeroupper`` (by design: intel/isa-l#24
leaves it to the caller). Until something executes that instruction, legacy-SSE code in the
same thread pays for the dirty upper halves of the vector registers: on a 2.6 GHz Xeon with
AVX-512, Pillow's Lanczos resize (how the server brings an upload to the model's size) ran
30% slower after any ISA-L call, and stayed so until a library that clears them ran
(libjpeg-turbo and onnxruntime do; libspng, Pillow's resampling and the interpreter do not).
So every function here ends with :func:`clear_upper_vector_state`
(``python -m loadtests.vector_state`` measures it).

Where ``isal`` has no wheel, the standard library's zlib does the same work, more slowly.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from types import ModuleType

import numpy as np

try:
    from isal import isal_zlib as _isal_zlib
except ImportError:  # pragma: no cover - a platform without an isal wheel: zlib's speed
    _isal_zlib = None

ZLIB: ModuleType = _isal_zlib if _isal_zlib is not None else zlib
_SCRATCH = np.zeros(256, np.float32)  # stays zero, so threads sharing it race harmlessly


def clear_upper_vector_state() -> None:
    """Execute ``vzeroupper``: numpy's AVX2/AVX-512 loops end with it (compilers put it in
    the epilogue of every function that used 256- or 512-bit registers). A 256-element
    float32 add takes the vector loop; about a microsecond."""
    np.add(_SCRATCH, _SCRATCH, out=_SCRATCH)


def compress_bands(bands: Iterable[bytes | memoryview | np.ndarray], level: int,
                   zlib_module: ModuleType | None = None) -> bytes:
    """One zlib stream of ``bands`` one after another, deflated as each comes (the caller may
    reuse a band's buffer for the next): the whole input is never held at once."""
    compressor = (zlib_module or ZLIB).compressobj(level)
    parts = []
    try:
        for band in bands:
            parts.append(compressor.compress(band))
            clear_upper_vector_state()  # before the caller's code writes the next band
        parts.append(compressor.flush())
        return b"".join(parts)
    finally:
        clear_upper_vector_state()


def inflate_exactly(stream: bytes, size: int) -> bytes | None:
    """The ``size`` bytes a zlib ``stream`` holds, or None unless it holds exactly those (no
    more, no fewer, nothing after its end) with a right Adler-32. Never inflates more than
    ``size`` + 1 bytes, whatever the stream claims."""
    inflater = ZLIB.decompressobj()
    try:
        data = inflater.decompress(stream, size + 1)
    except ZLIB.error:
        return None
    finally:
        clear_upper_vector_state()
    if len(data) != size or not inflater.eof or inflater.unused_data:
        return None
    return data


def crc32(parts: Iterable[bytes | memoryview], value: int = 0) -> int:
    """The CRC-32 of ``parts`` one after another (a PNG chunk's type and data)."""
    try:
        for part in parts:
            value = ZLIB.crc32(part, value)
        return value
    finally:
        clear_upper_vector_state()


def adler32(data: bytes | memoryview) -> int:
    try:
        return ZLIB.adler32(data)
    finally:
        clear_upper_vector_state()
