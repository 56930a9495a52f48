"""Classic compressors on the test bytes: an anchor for the models' bits per byte.

Each compressor, at its strongest setting, compresses the whole test split as
one stream; its size in bits over the number of bytes is a bits-per-byte figure
on the same text the models are scored on. It is not like for like: a
compressor learns only from the test text itself, as it goes, with a long
memory (lzma's dictionary holds the whole split), while the models learned from
the train split and see at most one window of context. It says where the
models stand: a model worse than lzma has not yet learned what a general-purpose
compressor finds by matching repeats.
"""

from __future__ import annotations

import bz2
import lzma
import zlib

import numpy as np

#: name -> (compress function, the setting, said in words)
COMPRESSORS = {
    "lzma": (lambda data: lzma.compress(data, preset=9 | lzma.PRESET_EXTREME), "preset 9 extreme (xz)"),
    "bz2": (lambda data: bz2.compress(data, compresslevel=9), "level 9"),
    "zlib": (lambda data: zlib.compress(data, level=9), "level 9 (deflate)"),
}


def bits_per_byte(data) -> list:
    """One dict per compressor: ``compressor``, ``setting``, ``bits_per_byte``, ``n_bytes``."""
    raw = np.asarray(data, dtype=np.uint8).tobytes()
    if not raw:
        raise ValueError("data: expected at least one byte, got none")
    return [{"compressor": name, "setting": setting, "bits_per_byte": 8 * len(compress(raw)) / len(raw),
             "n_bytes": len(raw)}
            for name, (compress, setting) in COMPRESSORS.items()]
