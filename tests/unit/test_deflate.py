"""service.pipeline.deflate: ISA-L's zlib streams and checksums agree with the standard
library's, and an inflate never yields more than it was asked for."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from service.pipeline import deflate

DATA = np.random.default_rng(0).integers(0, 8, 300_000, dtype=np.uint8).tobytes()  # compressible, not trivially


def test_isal_is_the_implementation_and_its_streams_are_zlibs() -> None:
    assert deflate.ZLIB.__name__.endswith("isal_zlib")  # a dependency: the server's path
    stream = deflate.compress_bands([DATA[:100_000], memoryview(DATA)[100_000:]], 1)  # in bands: one stream
    assert zlib.decompress(stream) == DATA
    assert deflate.inflate_exactly(zlib.compress(DATA, 9), len(DATA)) == DATA
    assert deflate.compress_bands([DATA], 1, zlib_module=zlib) == zlib.compress(DATA, 1)


def test_checksums_are_zlibs() -> None:
    parts = [b"IDAT", DATA[:70_000], memoryview(DATA)[70_000:]]
    assert deflate.crc32(parts) == zlib.crc32(b"IDAT" + DATA)
    assert deflate.crc32([DATA], 12345) == zlib.crc32(DATA, 12345)
    assert deflate.adler32(DATA) == zlib.adler32(DATA)


@pytest.mark.parametrize("case", ["short", "long", "trailing bytes", "no end", "bad adler", "not zlib"])
def test_inflate_exactly_refuses_any_other_stream(case: str) -> None:
    stream = zlib.compress(DATA)
    bad = {"short": zlib.compress(DATA[:-1]), "long": zlib.compress(DATA + b"\0"), "trailing bytes": stream + b"\0",
           "no end": stream[:-8], "bad adler": stream[:-4] + bytes(b ^ 1 for b in stream[-4:]),
           "not zlib": b"\x1f\x8b" + stream[2:]}[case]
    assert deflate.inflate_exactly(bad, len(DATA)) is None


def test_a_bomb_inflates_no_further_than_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = zlib.compress(bytes(200 * 1024 * 1024), 9)  # 200 MB of zeros in about 200 KB
    assert len(bomb) < 300_000
    inflater_calls: list[int] = []
    real = deflate.ZLIB.decompressobj

    class Counting:
        def __init__(self) -> None:
            self.inner = real()

        def decompress(self, data: bytes, max_length: int) -> bytes:
            out = self.inner.decompress(data, max_length)
            inflater_calls.append(len(out))
            return out

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

    monkeypatch.setattr(deflate.ZLIB, "decompressobj", Counting)
    assert deflate.inflate_exactly(bomb, 1000) is None
    assert inflater_calls == [1001]  # one call, bounded: the 200 MB never exist
