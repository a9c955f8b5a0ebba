"""What an ISA-L call leaves behind: the CPU of the work that follows it in the same thread.

    python -m loadtests.vector_state [--rounds 3]

ISA-L's AVX2 and AVX-512 routines return without ``vzeroupper`` (intel/isa-l#24), and
legacy-SSE code the thread runs afterwards can pay for the dirty upper halves of the vector
registers, until something executes it (:mod:`service.pipeline.deflate`). This times a
Lanczos resize of a 1024 x 1024 RGB image to 256 x 256 (Pillow, as the server resizes
uploads) and, as a control that does not pay,
libspng's decode of a 256 x 256 PNG, each right after: nothing; a raw ISA-L CRC-32 of the
PNG; the same CRC through ``service.pipeline.deflate`` (which clears the registers after
it). On a CPU without AVX the three columns should agree.
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable

import numpy as np
import pyspng
from PIL import Image

from models.preprocessing import resize_rgb
from service.pipeline import deflate


def _cpu_ms(before: Callable[[], object], work: Callable[[], object], repeat: int) -> float:
    spent = 0.0
    for _ in range(repeat):
        before()
        started = time.thread_time()
        work()
        spent += time.thread_time() - started
    return spent / repeat * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    photo = np.asarray(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).resize((1024, 1024)))
    buffer = io.BytesIO()
    Image.fromarray(photo[:256, :256]).save(buffer, "PNG")
    png = buffer.getvalue()
    raw_isal = deflate.ZLIB  # ISA-L's module itself, without the clearing
    befores: dict[str, Callable[[], object]] = {
        "nothing": lambda: None,
        "ISA-L crc32, raw": lambda: raw_isal.crc32(png),
        "ISA-L crc32, registers cleared": lambda: deflate.crc32([png]),
    }
    works: dict[str, tuple[Callable[[], object], int]] = {
        "Lanczos 1024² -> 256²": (lambda: resize_rgb(Image.fromarray(photo), 256), 40),
        "libspng 256² PNG": (lambda: pyspng.load(png), 400),
    }
    print(f"ISA-L: {raw_isal.__name__}")
    for work_name, (work, repeat) in works.items():
        for round_ in range(1, args.rounds + 1):
            cells = [f"{name}: {_cpu_ms(before, work, repeat):.3f} ms" for name, before in befores.items()]
            print(f"{work_name}, round {round_}: " + " | ".join(cells))


if __name__ == "__main__":
    main()
