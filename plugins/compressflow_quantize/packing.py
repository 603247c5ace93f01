"""Unsigned integer codes of 1-8 bits packed into a little-endian bit stream of uint8 bytes:
what a quantized layer stores (``qweight``). 8 and 4 bits take fast paths that write the
very same stream (a byte a code; two codes a byte, low nibble first); other widths go a bit
at a time."""

from __future__ import annotations

import torch


def packed_length(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take."""
    return (count * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (< 2**bits) as a little-endian bit stream in uint8 bytes."""
    codes = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return codes.clone()
    if bits == 4:  # the same stream, two codes a byte (low nibble first), without the bit loop
        pairs = torch.cat([codes, codes.new_zeros(codes.numel() % 2)]).view(-1, 2)
        return pairs[:, 0] | (pairs[:, 1] << 4)
    return pack_bits(codes, bits)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`pack` for any width, a bit at a time."""
    stream = ((codes.reshape(-1).to(torch.uint8).unsqueeze(1)
               >> torch.arange(bits, dtype=torch.uint8)) & 1).reshape(-1)
    padding = (-stream.numel()) % 8
    if padding:
        stream = torch.cat([stream, stream.new_zeros(padding)])
    weights = torch.arange(8, dtype=torch.uint8)
    return (stream.view(-1, 8) << weights).sum(dim=1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` codes of a stream written by :func:`pack` (uint8)."""
    if bits == 8:
        return packed[:count]
    if bits == 4:  # an int4 layer unpacks on every forward: nibbles, not a bit per element
        return torch.stack([packed & 15, packed >> 4], dim=1).reshape(-1)[:count]
    return unpack_bits(packed, bits, count)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """:func:`unpack` for any width, a bit at a time."""
    stream = ((packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)
    stream = stream[: count * bits].view(count, bits)
    return (stream << torch.arange(bits, dtype=torch.uint8)).sum(dim=1).to(torch.uint8)
