"""Bit streams of small non-negative integers: fixed-width, or canonical Huffman.

Everything is vectorised with numpy (no Python loop per symbol), so a stream of millions of
symbols codes in well under a second. Huffman codes are canonical and length-limited to
``MAX_LENGTH`` bits, so a code is described by one 4-bit length per symbol of the alphabet
(the table the packed format stores) and decoding uses one table of ``2**MAX_LENGTH`` rows.

    lengths = code_lengths(np.bincount(symbols, minlength=alphabet))
    data = encode(symbols, lengths)
    assert (decode(data, lengths, len(symbols)) == symbols).all()
"""

from __future__ import annotations

import heapq

import numpy as np

MAX_LENGTH = 15
"""Longest Huffman code: lengths fit a nibble (0 = symbol absent)."""


def code_lengths(counts: np.ndarray, limit: int = MAX_LENGTH) -> np.ndarray:
    """Huffman code length of each symbol (0 where its count is 0), none above ``limit``.

    A lone symbol gets length 1. When the optimal code is deeper than ``limit`` the counts
    are flattened (halved, kept above zero) until it is not: slightly longer streams, never
    an undecodable one.
    """
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(len(counts), dtype=np.int64)
    present = np.flatnonzero(counts)
    if len(present) > 2 ** limit:
        raise ValueError(f"alphabet of {len(present)} symbols does not fit {limit}-bit codes")
    if len(present) == 1:
        lengths[present[0]] = 1
        return lengths
    weights = counts[present]
    while len(present):
        depth = _huffman_depths(weights)
        if depth.max() <= limit:
            lengths[present] = depth
            break
        weights = (weights >> 1) | 1
    return lengths


def _huffman_depths(weights: np.ndarray) -> np.ndarray:
    """Depth of each leaf in a Huffman tree over ``weights`` (ties broken by order)."""
    depth = np.zeros(len(weights), dtype=np.int64)
    heap = [(int(w), i, [i]) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    tie = len(weights)
    while len(heap) > 1:
        w1, _, leaves1 = heapq.heappop(heap)
        w2, _, leaves2 = heapq.heappop(heap)
        merged = leaves1 + leaves2
        depth[merged] += 1
        heapq.heappush(heap, (w1 + w2, tie, merged))
        tie += 1
    return depth


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical code of each symbol (shorter codes first, then by symbol)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(len(lengths), dtype=np.int64)
    code, previous = 0, 0
    for symbol in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[symbol]) - previous
        previous = int(lengths[symbol])
        codes[symbol] = code
        code += 1
    return codes


def stream_bits(counts: np.ndarray, lengths: np.ndarray) -> int:
    """Bits a stream with these symbol ``counts`` takes under code ``lengths``."""
    return int(np.dot(np.asarray(counts, dtype=np.int64), np.asarray(lengths, dtype=np.int64)))


def _write_bits(values: np.ndarray, widths: np.ndarray) -> bytes:
    """Concatenate ``values[i]`` written MSB-first in ``widths[i]`` bits; pad to a byte."""
    values = np.asarray(values, dtype=np.int64)
    widths = np.asarray(widths, dtype=np.int64)
    total = int(widths.sum())
    bits = np.zeros(total, dtype=np.uint8)
    starts = np.cumsum(widths) - widths
    for j in range(int(widths.max()) if len(widths) else 0):
        has = widths > j
        bits[starts[has] + j] = (values[has] >> (widths[has] - 1 - j)) & 1
    return np.packbits(bits).tobytes()


def encode(symbols: np.ndarray, lengths: np.ndarray) -> bytes:
    """Huffman-code ``symbols`` with the canonical code of ``lengths``."""
    symbols = np.asarray(symbols, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(symbols) and (lengths[symbols] == 0).any():
        raise ValueError("a symbol to encode has no code (length 0)")
    return _write_bits(canonical_codes(lengths)[symbols], lengths[symbols])


def decode(data: bytes, lengths: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` symbols of the Huffman stream ``data`` (canonical ``lengths``)."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    longest = int(lengths.max())
    codes = canonical_codes(lengths)
    # one row per possible window of `longest` bits: the symbol it starts with, and its length
    table_symbol = np.zeros(2 ** longest, dtype=np.int64)
    table_length = np.ones(2 ** longest, dtype=np.int64)
    for symbol in np.flatnonzero(lengths):
        shift = longest - int(lengths[symbol])
        low = int(codes[symbol]) << shift
        table_symbol[low:low + (1 << shift)] = symbol
        table_length[low:low + (1 << shift)] = lengths[symbol]
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8)).astype(np.int64)
    total = len(bits)
    bits = np.concatenate([bits, np.zeros(longest, dtype=np.int64)])
    window = np.zeros(total, dtype=np.int64)
    for j in range(longest):
        window = (window << 1) | bits[j:j + total]
    # where each code starts: follow position -> position + code length from 0, by doubling
    jump = np.minimum(np.arange(total) + table_length[window], total)
    jump = np.append(jump, total)
    starts, steps = np.zeros(1, dtype=np.int64), 1
    while steps < count:
        starts = np.concatenate([starts, jump[starts]])
        jump = jump[jump]
        steps *= 2
    starts = np.unique(starts)
    starts = starts[starts < total][:count]
    if len(starts) < count:
        raise ValueError(f"Huffman stream ends after {len(starts)} of {count} symbols")
    return table_symbol[window[starts]]


def fixed_width(alphabet: int) -> int:
    """Bits a fixed-width code needs for ``alphabet`` symbols (at least 1)."""
    return max(1, int(alphabet - 1).bit_length())


def pack_fixed(symbols: np.ndarray, width: int) -> bytes:
    """``symbols`` in ``width`` bits each, MSB-first, padded to a byte."""
    symbols = np.asarray(symbols, dtype=np.int64)
    return _write_bits(symbols, np.full(len(symbols), width, dtype=np.int64))


def unpack_fixed(data: bytes, width: int, count: int) -> np.ndarray:
    """The first ``count`` ``width``-bit symbols of ``data``."""
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[:count * width]
    if len(bits) < count * width:
        raise ValueError(f"fixed-width stream holds fewer than {count} symbols")
    weights = 1 << np.arange(width - 1, -1, -1, dtype=np.int64)
    return bits.reshape(count, width).astype(np.int64) @ weights
