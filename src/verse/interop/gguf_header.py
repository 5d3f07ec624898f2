"""A bounded reader of a GGUF file's header: metadata key/values and tensor infos, every count and length checked
against the bytes that remain before anything is read or allocated.

gguf-py's `GGUFReader` trusts the counts it reads (a 56-byte file whose metadata array claims 2^62 items keeps it
looping forever), so every GGUF goes through `read_header` first; the tokenizer reads its metadata here too.
Layout (llama.cpp's docs/gguf.md, v2/v3): magic, version u32, tensor count u64, metadata count u64, metadata
(key string, type u32, value), tensor infos (name, n_dims u32, dims u64[n], type u32, offset u64), aligned data.
"""

import mmap
import struct
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Tuple

from verse.errors import VerseError

GGUF_MAGIC = b"GGUF"
# GGUF metadata value types -> struct format (8 string and 9 array are read separately).
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
MAX_DEPTH = 4  # arrays of arrays: llama.cpp writes none; deeper nesting is refused, never recursed into
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32


class GGUFFormatError(ValueError):
    """The file is not a well-formed GGUF header (the message says where)."""


class TensorInfo(NamedTuple):
    """A tensor's entry in a GGUF header: `shape` as stored (ggml order, fastest dimension first), `tensor_type`
    (a ggml type number), `offset` from the start of the file and its size in bytes (checked to fit the file)."""

    name: str
    shape: Tuple[int, ...]
    tensor_type: int
    offset: int
    nbytes: int


class _Cursor:
    """Reads little-endian GGUF values from a memory-mapped file, front to back, never past its end."""

    def __init__(self, data: mmap.mmap):
        self.data, self.offset = data, 0

    def need(self, n: int, what: str) -> None:
        if n > len(self.data) - self.offset:
            raise GGUFFormatError(f"{what} needs {n} bytes at offset {self.offset}, but the file ends at "
                                  f"{len(self.data)}")

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, "a value")
        value = struct.unpack_from(fmt, self.data, self.offset)[0]
        self.offset += size
        return value

    def string(self, keep: bool = True) -> str:
        size = self.scalar("<Q")
        self.need(size, "a string")
        start, self.offset = self.offset, self.offset + size
        return self.data[start:self.offset].decode("utf-8", errors="replace") if keep else ""

    def value(self, kind: int, keep: bool = True, depth: int = 0) -> Any:
        if kind == STRING:
            return self.string(keep)
        if kind == ARRAY:
            if depth >= MAX_DEPTH:
                raise GGUFFormatError(f"arrays nested more than {MAX_DEPTH} deep at offset {self.offset}")
            item_kind, count = self.scalar("<I"), self.scalar("<Q")
            if item_kind in SCALARS:
                fmt = f"<{count}{SCALARS[item_kind][1]}"
                self.need(count * struct.calcsize(SCALARS[item_kind]), f"an array of {count} items")
                values = list(struct.unpack_from(fmt, self.data, self.offset)) if keep else []
                self.offset += struct.calcsize(fmt)
                return values
            if item_kind not in (STRING, ARRAY):
                raise GGUFFormatError(f"unknown metadata value type {item_kind} at offset {self.offset}")
            self.need(count * (8 if item_kind == STRING else 12), f"an array of {count} items")  # smallest item
            values = [self.value(item_kind, keep, depth + 1) for _ in range(count)]
            return values if keep else []
        if kind not in SCALARS:
            raise GGUFFormatError(f"unknown metadata value type {kind} at offset {self.offset}")
        return self.scalar(SCALARS[kind])


def _read(data: mmap.mmap, keep: bool, tensors: bool) -> Tuple[Dict[str, Any], List[TensorInfo]]:
    cursor = _Cursor(data)
    if data[:4] != GGUF_MAGIC:
        raise GGUFFormatError("no GGUF magic at the start")
    cursor.offset = 4
    version = cursor.scalar("<I")
    if version not in (2, 3):
        raise GGUFFormatError(f"GGUF version {version} (supported: 2, 3)")
    n_tensors, n_fields = cursor.scalar("<Q"), cursor.scalar("<Q")
    cursor.need(n_fields * 13, f"{n_fields} metadata entries")  # key length u64 + type u32 + 1 byte, at least
    fields: Dict[str, Any] = {}
    for _ in range(n_fields):
        key = cursor.string()
        kind = cursor.scalar("<I")
        fields[key] = cursor.value(kind, keep or key == "general.alignment")
    if not tensors:
        return fields, []
    from gguf import GGML_QUANT_SIZES  # numpy-heavy; only the model loader needs tensor infos

    sizes = {int(kind): size for kind, size in GGML_QUANT_SIZES.items()}
    cursor.need(n_tensors * 24, f"{n_tensors} tensor infos")  # name length + n_dims + type + offset, at least
    raw = []
    for _ in range(n_tensors):
        name = cursor.string()
        n_dims = cursor.scalar("<I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFFormatError(f"tensor {name} has {n_dims} dimensions (1..{MAX_DIMS})")
        shape = tuple(cursor.scalar("<Q") for _ in range(n_dims))
        kind, offset = cursor.scalar("<I"), cursor.scalar("<Q")
        if kind not in sizes:
            raise GGUFFormatError(f"tensor {name} has unknown ggml type {kind}")
        raw.append((name, shape, kind, offset))
    alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or not 1 <= alignment <= 2**20:
        raise GGUFFormatError(f"general.alignment is {alignment!r}")
    start = -(-cursor.offset // alignment) * alignment
    infos = []
    for name, shape, kind, offset in raw:
        block, type_size = sizes[kind]
        count = 1
        for n in shape:
            count *= n
        if shape[0] % block:
            raise GGUFFormatError(f"tensor {name} has {shape[0]} columns, not a multiple of its {block}-value blocks")
        nbytes = count // block * type_size
        if start + offset + nbytes > len(data):
            raise GGUFFormatError(f"tensor {name} ({nbytes} bytes at offset {offset}) lies past the end of the file")
        infos.append(TensorInfo(name, shape, kind, start + offset, nbytes))
    return fields, infos


def read_header(path: str | Path, keep: bool = True, tensors: bool = True) -> Tuple[Dict[str, Any], List[TensorInfo]]:
    """Read (or only check) a GGUF file's metadata and tensor infos, bounded by the file's size.

    Args:
        path (str | Path): the .gguf file.
        keep (bool): return the metadata values; False only checks them (arrays come back empty).
        tensors (bool): also read and check the tensor infos (every tensor's bytes lie inside the file).

    Returns:
        Tuple[Dict[str, Any], List[TensorInfo]]: key -> value (lists for arrays), and the tensors.

    Raises:
        GGUFFormatError: a malformed header (also for a truncated file); OSError when it cannot be read.
    """
    with open(path, "rb") as f:
        if f.seek(0, 2) < 24:
            raise GGUFFormatError("the file is shorter than a GGUF header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                return _read(data, keep, tensors)
            except struct.error as e:
                raise GGUFFormatError(str(e)) from None


def read_gguf_header(path: Path) -> Tuple[Dict[str, object], Dict[str, TensorInfo]]:
    """The key/value metadata and the tensor table of a GGUF file (v2/v3), without reading any tensor.

    gguf-py's GGUFReader maps every tensor and array element up front (about 14 s for the 135M SmolLM2 file on a
    small CPU); the metadata and the tensor table sit at the start of the file and are read here (by the bounded
    `read_header` reader) in a fraction of that.

    Args:
        path: the .gguf file.

    Returns:
        Tuple[Dict[str, object], Dict[str, TensorInfo]]: key -> value (lists for arrays), name -> tensor.

    Raises:
        VerseError: when the file is not a readable GGUF file.
    """
    try:
        fields, tensors = read_header(path)
    except (OSError, GGUFFormatError) as e:
        raise VerseError(f"cannot read GGUF file {path}: {e}; check that it is a complete .gguf file") from None
    return fields, {t.name: t for t in tensors}


def read_gguf_metadata(path: Path) -> Dict[str, object]:
    """The key/value metadata of a GGUF file (see `read_gguf_header`); the tensor table is not read."""
    try:
        return read_header(path, tensors=False)[0]
    except (OSError, GGUFFormatError) as e:
        raise VerseError(f"cannot read GGUF file {path}: {e}; check that it is a complete .gguf file") from None
