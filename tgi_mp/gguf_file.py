"""A GGUF file's metadata and tensor index, read in milliseconds.

gguf's `GGUFReader` builds numpy views of every part of every metadata field, the
vocabulary's ~100k strings included: ~2 s on the bundled model, paid by the
launcher and again by every executor at each start. This reads the header with
`struct`, keeps scalar, string and small array values, skips the big arrays (the
tokenizer's: tgi-mp reads the tokenizer through transformers), and gives each
tensor as a view of one read-only memmap, shaped as `GGUFReader` shapes it, so
`gguf.quants.dequantize` and the loader read it unchanged.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q"}
_SCALAR |= {11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
SMALL_ARRAY = 1024  # arrays up to this length are kept (as lists); longer ones skipped
_PLAIN = {  # tensor types stored as plain numbers, viewed with their dtype
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclass
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray  # dims, fastest first (ggml's order, as GGUFReader's `shape`)
    data: np.ndarray  # a read-only view: plain types shaped (slowest first), else bytes


class GGUFFile:
    def __init__(self, path: str) -> None:
        self.buf = np.memmap(path, mode="r")
        if bytes(self.buf[:4]) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        self._at = 4
        version, n_tensors, n_fields = self._read("<I"), self._read("<Q"), self._read("<Q")
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported")
        self.fields: dict[str, Any] = {}
        for _ in range(n_fields):
            key = self._string()
            value, kept = self._value(self._read("<I"))
            if kept:
                self.fields[key] = value
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._read("<Q") for _ in range(self._read("<I"))]
            infos.append((name, dims, GGMLQuantizationType(self._read("<I")), self._read("<Q")))
        align = int(self.fields.get("general.alignment", 32))
        start = -(-self._at // align) * align
        self.tensors = [self._tensor(start, *info) for info in infos]

    def _read(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self._at)
        self._at += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._read("<Q")
        text = bytes(self.buf[self._at : self._at + n]).decode("utf-8", errors="replace")
        self._at += n
        return text

    def _value(self, kind: int) -> tuple[Any, bool]:
        """The next value of type `kind`, and whether it was kept (not a big array)."""
        if kind in _SCALAR:
            return self._read(_SCALAR[kind]), True
        if kind == _STRING:
            return self._string(), True
        if kind != _ARRAY:
            raise ValueError(f"unknown GGUF value type {kind}")
        item, count = self._read("<I"), self._read("<Q")
        if count <= SMALL_ARRAY:
            return [self._value(item)[0] for _ in range(count)], True
        if item in _SCALAR:  # fixed-size items: jump over them
            self._at += count * struct.calcsize(_SCALAR[item])
        elif item == _STRING:  # a vocabulary: only the lengths are read
            for _ in range(count):
                self._at += 8 + struct.unpack_from("<Q", self.buf, self._at)[0]
        else:
            for _ in range(count):
                self._value(item)
        return None, False

    def _tensor(
        self, start: int, name: str, dims: list[int], kind: GGMLQuantizationType, offset: int
    ) -> GGUFTensor:
        n = int(np.prod(dims))
        block, size = GGML_QUANT_SIZES[kind]
        shape = tuple(reversed(dims))
        at = start + offset
        if kind in _PLAIN:
            dtype = np.dtype(_PLAIN[kind])
            data = self.buf[at : at + n * dtype.itemsize].view(dtype).reshape(shape)
        else:
            data = self.buf[at : at + n * size // block].reshape(
                quant_shape_to_byte_shape(shape, kind)
            )
        return GGUFTensor(name, kind, np.array(dims, dtype=np.uint64), data)
