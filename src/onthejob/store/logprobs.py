"""Kept log-probs: an assistant answer as the model produced it, so that learning can reuse
the inference compute (learn/opsd.py takes them as teacher rows instead of scoring the
answer again).

What is kept: the answer's token ids and, at each of its tokens, the k most likely
(token id, log p) under the model's untempered distribution, most likely first; when the
answer ended on an end-of-turn token, one more row: the k most likely tokens at that step
(the row that teaches the answer to end there).

The encoding is binary and compact, little-endian:

    b"OTJL", version (1 byte), n tokens (u32), k (u16), ended (1 byte), id width w (1 byte),
    token ids (n x w bytes), top ids (rows x k x w bytes), top log-probs (rows x k x float16)

with rows = n + ended and w = 2 when every id is below 65536 (the default model's vocabulary
is 49152), else 4. That is w + (w + 2)k bytes a token: 130 at k = 32 with 2-byte ids (an
800-token answer: 104 KB), 196 with 4-byte ids, plus 13 bytes a message and one more row
(the end of turn). float16 keeps a log-prob to 2^-11 of its size (a relative
error of 2.4e-4 at most, 0.005 at log p = -20, where the probability is 2e-9): far below
what top-k truncation already changes in a distillation target. The store keeps these
bytes in their own table (message_logprobs), not in the message's JSON meta: listing a
session does not read them, and they are not inflated by base64.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

MAGIC = b"OTJL"
VERSION = 1
_HEAD = struct.Struct("<4sBIHBB")
_IDS = {2: "H", 4: "I"}  # id width in bytes -> array type
MAX_K = 65535


@dataclass(frozen=True)
class KeptLogprobs:
    """An answer's token ids and its top-k rows (see the module docstring)."""

    token_ids: list[int]
    top_ids: list[list[int]]  # rows x k, most likely first
    top_logprobs: list[list[float]]  # rows x k
    ended: bool  # the last row is the end-of-turn step (rows = len(token_ids) + 1)

    @property
    def k(self) -> int:
        return len(self.top_ids[0]) if self.top_ids else 0

    @property
    def rows(self) -> int:
        return len(self.top_ids)


def bytes_per_token(k: int, vocab: int = 65536) -> int:
    """What keeping the top-k of one token costs in the store, for a vocabulary of `vocab`."""
    width = 2 if vocab <= 65536 else 4
    return width + (width + 2) * k


def encode(token_ids: Sequence[int], tops: Sequence[Sequence[tuple[int, float]]],
           stop_top: Sequence[tuple[int, float]] | None = None, k: int | None = None) -> bytes:
    """The kept form of a completion: `tops` per token (Completion.top_logprobs) and the
    end-of-turn step's list (Completion.stop_top), each cut to its first `k` entries."""
    if len(tops) != len(token_ids):
        raise ValueError(f"{len(token_ids)} tokens but {len(tops)} top lists")
    rows = [list(t) for t in tops] + ([list(stop_top)] if stop_top is not None else [])
    width = min((len(r) for r in rows), default=0) if k is None else k
    if not 0 < width <= MAX_K:
        raise ValueError(f"k must be between 1 and {MAX_K}, not {width}")
    if any(len(r) < width for r in rows):
        raise ValueError(f"a top list has fewer than k={width} entries")
    top = [i for r in rows for i, _ in r[:width]]
    size = 2 if max([*token_ids, *top], default=0) < 65536 else 4
    values = [v for r in rows for _, v in r[:width]]
    head = _HEAD.pack(MAGIC, VERSION, len(token_ids), width, stop_top is not None, size)
    return b"".join([head, _little(array(_IDS[size], token_ids)), _little(array(_IDS[size], top)),
                     struct.pack(f"<{len(values)}e", *values)])


def header(data: bytes) -> tuple[int, int, bool]:
    """(tokens, k, ended) of encoded kept log-probs, checked against their length; ValueError
    for bytes that `encode` did not write."""
    n, k, ended, _ = _header(data)
    return n, k, ended


def _header(data: bytes) -> tuple[int, int, bool, int]:
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) < _HEAD.size:
        raise ValueError("not kept log-probs: too short")
    magic, version, n, k, ended, size = _HEAD.unpack_from(data)
    if magic != MAGIC or version != VERSION or size not in _IDS:
        raise ValueError(f"not kept log-probs of version {VERSION} (magic {magic!r}, "
                         f"version {version}, id width {size})")
    want = _HEAD.size + size * n + (size + 2) * (n + bool(ended)) * k
    if len(data) != want:
        raise ValueError(f"kept log-probs of {n} tokens at k={k} take {want} bytes, not "
                         f"{len(data)}")
    return n, k, bool(ended), size


def decode(data: bytes) -> KeptLogprobs:
    """The KeptLogprobs that `encode` wrote; ValueError for anything else."""
    n, k, ended, size = _header(data)
    rows = n + ended
    at = _HEAD.size
    ids = _read(data[at:at + size * n], size)
    at += size * n
    top_ids = _read(data[at:at + size * rows * k], size)
    at += size * rows * k
    values = struct.unpack(f"<{rows * k}e", data[at:])
    return KeptLogprobs(ids, [top_ids[r * k:(r + 1) * k] for r in range(rows)],
                        [list(values[r * k:(r + 1) * k]) for r in range(rows)], bool(ended))


def _little(values: array) -> bytes:
    if values.itemsize != {"H": 2, "I": 4}[values.typecode]:
        raise RuntimeError(f"this platform's array type {values.typecode!r} is not "
                           f"{values.itemsize} bytes")
    if struct.pack("=I", 1) != struct.pack("<I", 1):
        values = array(values.typecode, values)
        values.byteswap()
    return values.tobytes()


def _read(data: bytes, size: int) -> list[int]:
    values = array(_IDS[size])
    values.frombytes(data)
    if struct.pack("=I", 1) != struct.pack("<I", 1):
        values.byteswap()
    return values.tolist()
