"""Reader for the IDX files of the MNIST family (Fashion-MNIST's release among them), gzip-compressed or not.

An IDX file is a big-endian header, then the data row by row:

    0x00 0x00 <type> <ndim>     magic: two zero bytes, the element type (0x08 = uint8), the number of dimensions
    ndim x uint32               the size of each dimension (images: count, rows, cols; labels: count)
    data                        prod(sizes) elements of the type

So the images' magic reads 2051 (0x00000803) as one big-endian uint32 and the labels' 2049 (0x00000801).
Everything is checked (magic, sizes against the file's length); any mismatch is a DataError naming the file.
Used by both image paths: the LRA image protocol (sat/data/prepare/fashion_mnist.py) and the ViT's
image source (sat/data/image_stream.py).
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from sat.data.format import DataError

UBYTE = 0x08
IMAGES_MAGIC = 2051  # uint8, 3 dimensions
LABELS_MAGIC = 2049  # uint8, 1 dimension


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it is a gzip file (recognised by its own magic, not by its name)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror}); check the path") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is a truncated or corrupt gzip file ({e}); download it again") from None


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """The uint8 array stored in one IDX file, shaped by its header. `magic` is the value the header must
    hold (IMAGES_MAGIC or LABELS_MAGIC), so an images file passed as labels is an error."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path} is too short to be an IDX file ({len(data)} bytes)")
    (found,) = struct.unpack(">I", data[:4])
    if found != magic:
        raise DataError(f"{path}: IDX magic {found}, expected {magic} "
                        f"({'images' if magic == IMAGES_MAGIC else 'labels'}); is it the right file?")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise DataError(f"{path}: {len(data)} bytes, but its header {tuple(shape)} says {expected}; "
                        f"the file is truncated or not an IDX file")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_idx_pair(images: str | Path, labels: str | Path, side: int | None = None,
                  num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, rows, cols) uint8, labels (n,) int64) of an images file and its labels file, checked to
    agree in count, and, when given, on the image side and the label range."""
    x = read_idx(images, IMAGES_MAGIC)
    y = read_idx(labels, LABELS_MAGIC).astype(np.int64)
    if x.ndim != 3:
        raise DataError(f"{images}: {x.ndim} dimensions, expected 3 (count, rows, cols)")
    if side is not None and x.shape[1:] != (side, side):
        raise DataError(f"{images}: images of {x.shape[1]}x{x.shape[2]}, expected {side}x{side}")
    if y.shape != (x.shape[0],):
        raise DataError(f"{labels} holds {y.shape[0]} labels but {images} holds {x.shape[0]} images; "
                        f"they are not a pair")
    if num_classes is not None and y.size and y.max() >= num_classes:
        raise DataError(f"{labels}: label {int(y.max())} outside 0..{num_classes - 1}")
    return x, y


def write_idx(path: str | Path, array: np.ndarray, compress: bool = True) -> None:
    """Write a uint8 array as an IDX file (gzip-compressed by default), the way the release is laid out. For
    tests and for users who build their own IDX files."""
    a = np.ascontiguousarray(array, dtype=np.uint8)
    body = struct.pack(">I", (UBYTE << 8) | a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()
    Path(path).write_bytes(gzip.compress(body, mtime=0) if compress else body)
