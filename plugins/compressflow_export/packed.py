"""The Deep Compression storage format (Han et al. 2016, section 3-4), bit-exact.

Every tensor of a model's state dict, in state-dict order, is written in the smallest of:

- ``plain``: its raw bytes; floats in fp16 when every value survives the trip (lossless).
  Biases, norms, counters and every other small tensor end up here.
- ``sparse``: the nonzero positions as relative indices (gaps of ``b`` bits, ``b`` chosen per
  tensor; a gap too long for ``b`` bits is bridged by filler entries), the nonzero values
  either as indices into a codebook of the tensor's distinct values (fp16 when lossless,
  else the tensor's own dtype) or raw. Zero is ``value == 0``: a ``-0.0`` weight comes back
  as ``+0.0`` (equal under ``==`` and ``torch.equal``, and in every output).
- ``dense-codebook``: every element as an index into a codebook (a clustered dense tensor).

Index and value streams are Huffman-coded (canonical, one 4-bit length per symbol) or
fixed-width, whichever the caller allows and is smaller.

Decision: **the file holds tensors, not the architecture.** ``load_packed(path, like=model)``
fills a copy of a module of the same architecture, checking a CRC32 fingerprint of the state
dict's names, dtypes and shapes. A pickled skeleton would cost about 1 KB (a fifth of a
40x-compressed digits MLP) and would run code on load; the architecture is code, which the
loader already has (``zoo:mlp`` and its args, say).

Relative indices: with ``b``-bit gap codes and ``M = 2**b - 1``, a code ``c < M`` means "skip
``c`` zeros, then the next nonzero value"; ``c == M`` is a filler: "skip ``M`` zeros, no
value" (Deep Compression's filler zero, whose zero value is implied by the code rather
than stored). Zeros after the last nonzero are implied by the shape.

File layout (integers ``u8`` or LEB128 ``varint``)::

    b"CFPK" u8 version  u32 fingerprint  varint tensor_count
    per tensor: u8 encoding  u8 dtype  varint ndim  varint dims...  body
    plain body:   u8 storage_dtype  raw bytes
    sparse body:  u8 index_bits  varint entries  stream(gaps, 2**index_bits)  values
    dense body:   values (with numel entries)
    values:       u8 mode (0 raw, 1 codebook)
                  raw:      u8 storage_dtype  raw bytes
                  codebook: varint size  u8 storage_dtype  raw bytes  stream(indices, size)
    stream:       u8 0 fixed: ceil(count * width / 8) bytes (width from the alphabet)
                  u8 1 huffman: ceil(alphabet / 2) bytes of 4-bit code lengths,
                                varint byte_count, bytes
"""

from __future__ import annotations

import copy
import io
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compressflow import CompressflowError
from compressflow_export import huffman

MAGIC = b"CFPK"
VERSION = 1
PLAIN, SPARSE, DENSE = 0, 1, 2
ENCODINGS = {PLAIN: "plain", SPARSE: "sparse", DENSE: "dense-codebook"}
RAW, CODEBOOK = 0, 1
FIXED, HUFFMAN = 0, 1

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool]
DTYPE_CODE = {dtype: code for code, dtype in enumerate(DTYPES)}
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
BITS_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16,
             torch.bfloat16: torch.int16, torch.float64: torch.int64}
INDEX_BITS = range(2, 9)


@dataclass
class PackOptions:
    """What the writer may use (the benchmark turns parts off to show each one's share).

    Attributes:
        codebook: store values as indices into a codebook when a tensor has at most
            ``max_codebook`` distinct nonzero values.
        huffman: Huffman-code index and value streams where that is smaller than fixed width.
        sparse: store positions as relative indices where that is smaller than dense.
        fp16: store floats in fp16 where every value survives the round trip.
        index_bits: gap-code width, or None to pick the smallest per tensor (2..8).
    """

    codebook: bool = True
    huffman: bool = True
    sparse: bool = True
    fp16: bool = True
    max_codebook: int = 256
    index_bits: int | None = None


@dataclass
class PackReport:
    """Bytes of the file by part, and how each tensor was stored."""

    path: Path
    total: int = 0
    parts: dict[str, int] = field(default_factory=lambda: {
        "header": 0, "index": 0, "values": 0, "codebook": 0, "plain": 0})
    tensors: list[dict] = field(default_factory=list)

    def table(self) -> str:
        """A Markdown table, one row a tensor."""
        rows = ["| tensor | shape | encoding | nonzero | index bits | codebook | bytes |",
                "|---|---|---|---|---|---|---|"]
        for t in self.tensors:
            rows.append(f"| {t['name']} | {t['shape']} | {t['encoding']} | {t['nonzero']} | "
                        f"{t.get('index_bits', '')} | {t.get('codebook_size', '')} | {t['bytes']} |")
        rows.append(f"| total | | | | | | {self.total} |")
        return "\n".join(rows) + "\n"


# --- bytes ----------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, count: int) -> bytes:
        if self.pos + count > len(self.data):
            raise CompressflowError("packed file is truncated", "write it again with export/packed")
        chunk = self.data[self.pos:self.pos + count]
        self.pos += count
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """A float tensor's bit patterns as integers (exact identity, -0.0 and NaNs included)."""
    return tensor.contiguous().view(BITS_VIEW[tensor.dtype])


def _raw(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bfloat16:
        flat = flat.view(torch.int16)
    return flat.numpy().tobytes()


def _from_raw(data: bytes, dtype: torch.dtype, count: int) -> torch.Tensor:
    view = torch.int16 if dtype == torch.bfloat16 else dtype
    itemsize = torch.empty(0, dtype=view).element_size()
    if len(data) != count * itemsize:
        raise CompressflowError("packed file is corrupt: a tensor's byte count is wrong")
    array = np.frombuffer(data, dtype=torch.empty(0, dtype=view).numpy().dtype).copy()
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor


def _storage_dtype(values: torch.Tensor, allow_fp16: bool) -> torch.dtype:
    """The narrowest dtype holding every value exactly (fp16 or fp32 for floats, int8... for ints)."""
    dtype = values.dtype
    if dtype in (torch.int64, torch.int32, torch.int16):
        for narrow in (torch.int8, torch.int16, torch.int32):
            info = torch.iinfo(narrow)
            if narrow.itemsize < dtype.itemsize and (
                    not values.numel() or info.min <= int(values.min()) <= int(values.max()) <= info.max):
                return narrow
        return dtype
    if dtype not in FLOATS:
        return dtype
    candidates = [torch.float16] if allow_fp16 else []
    if dtype == torch.float64:
        candidates.append(torch.float32)
    for narrow in candidates:
        if narrow == dtype:
            continue
        back = values.to(narrow).to(dtype)
        if torch.equal(_bits(back), _bits(values)):
            return narrow
    return dtype


def _plain(values: torch.Tensor, options: PackOptions) -> bytes:
    storage = _storage_dtype(values, options.fp16)
    return bytes([DTYPE_CODE[storage]]) + _raw(values.to(storage))


# --- streams --------------------------------------------------------------------------------


def _stream(symbols: np.ndarray, alphabet: int, options: PackOptions) -> bytes:
    """A stream of symbols < ``alphabet``: fixed width or Huffman, the smaller."""
    width = huffman.fixed_width(alphabet)
    fixed = bytes([FIXED]) + huffman.pack_fixed(symbols, width)
    if not options.huffman or alphabet > 2 ** huffman.MAX_LENGTH or not len(symbols):
        return fixed
    counts = np.bincount(symbols, minlength=alphabet)
    lengths = huffman.code_lengths(counts)
    table = np.zeros(alphabet + alphabet % 2, dtype=np.uint8)
    table[:alphabet] = lengths
    nibbles = ((table[0::2] << 4) | table[1::2]).astype(np.uint8).tobytes()
    body = huffman.encode(symbols, lengths)
    coded = bytes([HUFFMAN]) + nibbles + _varint(len(body)) + body
    return coded if len(coded) < len(fixed) else fixed


def _read_stream(reader: _Reader, alphabet: int, count: int) -> np.ndarray:
    kind = reader.u8()
    if kind == FIXED:
        width = huffman.fixed_width(alphabet)
        symbols = huffman.unpack_fixed(reader.take((count * width + 7) // 8), width, count)
    elif kind == HUFFMAN:
        nibbles = np.frombuffer(reader.take((alphabet + 1) // 2), dtype=np.uint8)
        lengths = np.stack([nibbles >> 4, nibbles & 0x0F], axis=1).reshape(-1)[:alphabet]
        body = reader.take(reader.varint())
        symbols = huffman.decode(body, lengths.astype(np.int64), count)
    else:
        raise CompressflowError(f"packed file is corrupt: unknown stream kind {kind}")
    if len(symbols) and symbols.max() >= alphabet:
        raise CompressflowError("packed file is corrupt: a symbol outside its alphabet")
    return symbols


def relative_indices(positions: np.ndarray, index_bits: int) -> np.ndarray:
    """Gap codes for sorted flat ``positions`` (see the module doc: ``2**b - 1`` is a filler)."""
    filler = (1 << index_bits) - 1
    positions = np.asarray(positions, dtype=np.int64)
    gaps = np.diff(positions, prepend=-1) - 1
    fillers = gaps // filler
    rest = gaps - fillers * filler
    # each gap becomes `fillers` filler codes then its remainder
    sizes = fillers + 1
    codes = np.full(int(sizes.sum()), filler, dtype=np.int64)
    codes[np.cumsum(sizes) - 1] = rest
    return codes


def positions_from(codes: np.ndarray, index_bits: int) -> np.ndarray:
    """Flat positions of the nonzeros that gap ``codes`` describe (inverse of the above)."""
    filler = (1 << index_bits) - 1
    codes = np.asarray(codes, dtype=np.int64)
    advance = np.where(codes == filler, filler, codes + 1)
    ends = np.cumsum(advance) - 1
    return ends[codes != filler]


def _values(values: torch.Tensor, options: PackOptions) -> tuple[bytes, dict]:
    """Values as a codebook plus an index stream, or raw: the smaller allowed."""
    raw = bytes([RAW]) + _plain(values, options)
    best, info = raw, {}
    if options.codebook and values.numel() and values.dtype in FLOATS:
        patterns, indices = torch.unique(_bits(values), return_inverse=True)
        if len(patterns) <= options.max_codebook:
            book = patterns.view(values.dtype)
            coded = (bytes([CODEBOOK]) + _varint(len(book)) + _plain(book, options)
                     + _stream(indices.numpy().astype(np.int64), len(book), options))
            if len(coded) < len(raw):
                best, info = coded, {"codebook_size": len(book),
                                     "codebook_bytes": 1 + len(_plain(book, options))}
    return best, info


def _read_values(reader: _Reader, dtype: torch.dtype, count: int) -> torch.Tensor:
    mode = reader.u8()
    if mode == RAW:
        return _read_plain(reader, dtype, count)
    if mode == CODEBOOK:
        size = reader.varint()
        book = _read_plain(reader, dtype, size)
        indices = _read_stream(reader, size, count)
        return book[torch.from_numpy(indices)]
    raise CompressflowError(f"packed file is corrupt: unknown value mode {mode}")


def _read_plain(reader: _Reader, dtype: torch.dtype, count: int) -> torch.Tensor:
    storage = DTYPES[reader.u8()]
    itemsize = torch.empty(0, dtype=storage).element_size()
    return _from_raw(reader.take(count * itemsize), storage, count).to(dtype)


# --- tensors --------------------------------------------------------------------------------


def _encode_tensor(tensor: torch.Tensor, options: PackOptions) -> tuple[int, bytes, dict]:
    """The smallest allowed encoding of one tensor: (encoding, body, details)."""
    flat = tensor.detach().contiguous().reshape(-1)
    plain = _plain(flat, options)
    best = (PLAIN, plain, {"plain": len(plain)})
    if flat.dtype not in FLOATS or not flat.numel():
        return best
    if options.codebook:
        values, info = _values(flat, options)
        if info and len(values) < len(best[1]):
            best = (DENSE, values, {"values": len(values) - info["codebook_bytes"],
                                    "codebook": info["codebook_bytes"], **info})
    if options.sparse:
        positions = torch.nonzero(flat != 0).flatten().numpy()
        values, info = _values(flat[torch.from_numpy(positions)], options)
        widths = [options.index_bits] if options.index_bits else INDEX_BITS
        for bits in widths:
            codes = relative_indices(positions, bits)
            index = bytes([bits]) + _varint(len(codes)) + _stream(codes, 1 << bits, options)
            if len(index) + len(values) < len(best[1]):
                best = (SPARSE, index + values, {
                    "index": len(index), "values": len(values) - info.get("codebook_bytes", 0),
                    "codebook": info.get("codebook_bytes", 0), "index_bits": bits, **info})
    return best


def _decode_tensor(reader: _Reader, encoding: int, dtype: torch.dtype,
                   shape: tuple[int, ...]) -> torch.Tensor:
    numel = int(np.prod(shape)) if shape else 1
    if encoding == PLAIN:
        flat = _read_plain(reader, dtype, numel)
    elif encoding == DENSE:
        flat = _read_values(reader, dtype, numel)
    elif encoding == SPARSE:
        bits = reader.u8()
        if not 1 <= bits <= 16:
            raise CompressflowError(f"packed file is corrupt: index width {bits}")
        codes = _read_stream(reader, 1 << bits, reader.varint())
        positions = positions_from(codes, bits)
        values = _read_values(reader, dtype, len(positions))
        flat = torch.zeros(numel, dtype=dtype)
        if len(positions) and positions[-1] >= numel:
            raise CompressflowError("packed file is corrupt: a position outside its tensor")
        flat[torch.from_numpy(positions)] = values
    else:
        raise CompressflowError(f"packed file is corrupt: unknown encoding {encoding}")
    return flat.reshape(shape)


def fingerprint(state: dict[str, torch.Tensor]) -> int:
    """CRC32 of the state dict's names, dtypes and shapes: which architecture a file fits."""
    text = ";".join(f"{name}:{str(t.dtype).removeprefix('torch.')}:{tuple(t.shape)}"
                    for name, t in state.items())
    return zlib.crc32(text.encode())


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CompressflowError(
                f"export/packed: state entry '{name}' is a {type(value).__name__}, not a tensor "
                "(a torch.ao quantized model?)",
                "export/packed stores float and integer tensors; cluster weights with "
                "quantize/kmeans instead of quantize/dynamic-int8 before it")
        if value.is_quantized or value.layout != torch.strided or value.dtype not in DTYPE_CODE:
            raise CompressflowError(
                f"export/packed: tensor '{name}' ({value.dtype}, {value.layout}) is not "
                "supported", "export/packed stores dense float/int/bool tensors; quantized "
                "weights: use quantize/kmeans before it")
    return state


# --- the file -------------------------------------------------------------------------------


def save_packed(model: nn.Module, path: str | Path, options: PackOptions | None = None) -> PackReport:
    """Write ``model``'s state dict in the packed format; returns the bytes by part."""
    options = options or PackOptions()
    path = Path(path)
    state = _state(model)
    report = PackReport(path)
    out = io.BytesIO()
    head = MAGIC + bytes([VERSION]) + struct.pack("<I", fingerprint(state)) + _varint(len(state))
    out.write(head)
    report.parts["header"] += len(head)
    for name, tensor in state.items():
        encoding, body, parts = _encode_tensor(tensor, options)
        descriptor = (bytes([encoding, DTYPE_CODE[tensor.dtype]]) + _varint(tensor.dim())
                      + b"".join(_varint(d) for d in tensor.shape))
        out.write(descriptor + body)
        report.parts["header"] += len(descriptor)
        for part in ("index", "values", "codebook", "plain"):
            report.parts[part] += parts.get(part, 0)
        report.tensors.append({
            "name": name, "shape": tuple(tensor.shape), "encoding": ENCODINGS[encoding],
            "nonzero": int(torch.count_nonzero(tensor)), "bytes": len(descriptor) + len(body),
            **{k: parts[k] for k in ("index_bits", "codebook_size") if k in parts}})
    data = out.getvalue()
    path.write_bytes(data)
    report.total = len(data)
    assert report.total == sum(report.parts.values()), (report.total, report.parts)
    return report


def read_packed(path: str | Path) -> tuple[int, list[torch.Tensor]]:
    """The fingerprint and the tensors of a packed file, in state-dict order."""
    reader = _Reader(Path(path).read_bytes())
    if reader.take(4) != MAGIC:
        raise CompressflowError(f"{path} is not a compressflow packed file",
                                "export/packed writes them (model.cfpk)")
    version = reader.u8()
    if version != VERSION:
        raise CompressflowError(f"{path}: packed format version {version}, this reads {VERSION}",
                                "install the compressflow version that wrote it")
    (print_,) = struct.unpack("<I", reader.take(4))
    tensors = []
    for _ in range(reader.varint()):
        encoding, dtype_code = reader.u8(), reader.u8()
        if dtype_code >= len(DTYPES):
            raise CompressflowError(f"{path} is corrupt: unknown dtype code {dtype_code}")
        shape = tuple(reader.varint() for _ in range(reader.varint()))
        tensors.append(_decode_tensor(reader, encoding, DTYPES[dtype_code], shape))
    if reader.pos != len(reader.data):
        raise CompressflowError(f"{path} is corrupt: {len(reader.data) - reader.pos} bytes left over")
    return print_, tensors


def load_packed(path: str | Path, like: nn.Module) -> nn.Module:
    """A copy of ``like`` (any module of the same architecture) with every tensor from ``path``.

    Every entry of the state dict is replaced, so nothing of ``like``'s weights survives; a
    file written for another architecture is refused (names, dtypes or shapes differ).
    """
    print_, tensors = read_packed(path)
    model = copy.deepcopy(like)
    state = _state(model)
    if print_ != fingerprint(state) or len(tensors) != len(state):
        raise CompressflowError(
            f"{path} was written for another architecture than {type(like).__name__} "
            f"({len(tensors)} tensors, fingerprint {print_:08x}; this model: {len(state)}, "
            f"{fingerprint(state):08x})",
            "pass `like=` a model built exactly as the one exported (same class and args)")
    model.load_state_dict(dict(zip(state, tensors)), strict=True)
    return model


def verify_same(model: nn.Module, rebuilt: nn.Module, loader, task=None) -> None:
    """Raise unless ``rebuilt`` has ``model``'s tensors and bit-identical outputs on ``loader``
    (batches split and fed by ``task``)."""
    from compressflow.task import Task

    task = task or Task()
    for (name, a), b in zip(model.state_dict().items(), rebuilt.state_dict().values()):
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            raise RuntimeError(f"packed round trip changed tensor '{name}'")
    model.eval()
    rebuilt.eval()
    with torch.inference_mode():
        for batch in loader:
            inputs, _ = task.split(batch)
            if not torch.equal(task.predict(model, inputs), task.predict(rebuilt, inputs)):
                raise RuntimeError("the model rebuilt from the packed file gives other outputs")
