"""Row-sharded arrays: one array stored as several ``.npy`` files, read as one without copying.

A crops directory (docs/ARCHITECTURE.md, "Crops directory") keeps each shard's lesions in its
own ``.npy`` files; :class:`ShardedArray` presents them as one read-only ``[n, ...]`` array whose
row ``i`` is row ``row[i]`` of shard ``shard[i]``. Shards are memory-mapped on first use and only
the rows asked for are read, so opening a cohort costs the lesion table, not the arrays.

>>> import tempfile; root = Path(tempfile.mkdtemp())
>>> np.save(root / "a.npy", np.arange(6, dtype=np.float16).reshape(3, 2))
>>> np.save(root / "b.npy", np.arange(6, 10, dtype=np.float16).reshape(2, 2))
>>> array = ShardedArray([root / "a.npy", root / "b.npy"], shard=[0, 1, 0, 1, 0],
...                      row=[0, 0, 1, 1, 2], item_shape=(2,))
>>> array.shape, array.dtype, array[1].tolist(), array[[4, 3], 1].tolist()
((5, 2), dtype('float32'), [6.0, 7.0], [5.0, 9.0])
"""

from __future__ import annotations

import collections
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .errors import InputError

#: Memory-mapped shard files kept open at once (each holds a file descriptor).
MAX_OPEN_SHARDS = 32


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` (shard ``i`` of ``N``, numbered from 0) as ``(i, N)``.

    Raises:
        InputError: not of the form ``i/N``, ``N < 1`` or ``i >= N``.

    >>> parse_shard("3/16")
    (3, 16)
    >>> parse_shard("3/2")
    Traceback (most recent call last):
    ...
    psma_lib.errors.InputError: --shard 3/2: the shard index must be below the number of shards 2 (shards are numbered 0 to 1)
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if match is None:
        raise InputError(f"--shard {text}: expected i/N, shard i of N numbered from 0 (e.g. 3/16)")
    index, count = int(match[1]), int(match[2])
    if count < 1:
        raise InputError(f"--shard {text}: the number of shards must be at least 1")
    if index >= count:
        raise InputError(f"--shard {text}: the shard index must be below the number of shards "
                         f"{count} (shards are numbered 0 to {count - 1})")
    return index, count


def split_contiguous(n_items: int, n_groups: int) -> list[range]:
    """``n_items`` in order split into ``n_groups`` contiguous ranges whose sizes differ by at
    most one (the first ``n_items % n_groups`` ranges are the longer ones).

    >>> [list(r) for r in split_contiguous(5, 3)]
    [[0, 1], [2, 3], [4]]
    """
    base, extra = divmod(n_items, n_groups)
    ranges, start = [], 0
    for group in range(n_groups):
        size = base + (group < extra)
        ranges.append(range(start, start + size))
        start += size
    return ranges


def npy_header(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a ``.npy`` file, read from its header alone.

    Checks that the file holds exactly the bytes the header announces, so a truncated or padded
    file is refused without reading its data.

    Raises:
        InputError: missing file, not a ``.npy`` file, object dtype, Fortran order, wrong size.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            offset = f.tell()
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError as exc:
        raise InputError("array file missing", file=str(path)) from exc
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"cannot read .npy header ({exc})", file=str(path)) from exc
    if dtype.hasobject or fortran:
        raise InputError(f"expected a plain C-ordered numeric array, got {dtype} "
                         f"{'Fortran' if fortran else 'C'} order", file=str(path))
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size != expected:
        raise InputError(f"file holds {size} bytes but its header announces {expected} "
                         f"({dtype} {list(shape)}): truncated or overwritten", file=str(path))
    return tuple(int(n) for n in shape), dtype


class ShardedArray:
    """A read-only, lazily read ``[n, *item_shape]`` float32 array over row shards.

    Row ``i`` is row ``row[i]`` of the ``.npy`` file ``files[shard[i]]`` (any numeric dtype,
    e.g. float16, converted to float32 when read). Supports ``shape``, ``dtype``, ``ndim``,
    ``len``, iteration, ``np.asarray`` (reads every row) and indexing of rows by an integer, a
    slice, a list/array of integers or a boolean mask, optionally followed by indices into each
    row (``a[rows, 0]``); every read returns a new float32 numpy array.

    Args:
        files: the shard files, each ``[n_k, *item_shape]``.
        shard, row: per row of the whole array, its shard number and its row in that shard.
        item_shape: the shape of one row.
    """

    def __init__(self, files: Sequence[str | os.PathLike], shard: Sequence[int],
                 row: Sequence[int], item_shape: Sequence[int]):
        self.files = [Path(f) for f in files]
        self._shard = np.asarray(shard, dtype=np.int64)
        self._row = np.asarray(row, dtype=np.int64)
        if self._shard.shape != self._row.shape or self._shard.ndim != 1:
            raise ValueError("shard and row must be 1-D and of the same length")
        self.item_shape = tuple(int(n) for n in item_shape)
        self._open: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self._shard), *self.item_shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    @property
    def ndim(self) -> int:
        return 1 + len(self.item_shape)

    def __len__(self) -> int:
        return len(self._shard)

    def __repr__(self) -> str:
        return f"ShardedArray(shape={self.shape}, dtype=float32, shards={len(self.files)})"

    def __iter__(self) -> Iterator[np.ndarray]:
        for index in range(len(self)):
            yield self[index]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self._gather(np.arange(len(self)))
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getitem__(self, key) -> np.ndarray:
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = (key[0], key[1:]) if key else (slice(None), ())
            if key is Ellipsis:
                key, rest = slice(None), (Ellipsis, *rest)
        if key is Ellipsis:
            key = slice(None)
        if isinstance(key, (int, np.integer)):
            n = len(self)
            if not -n <= key < n:
                raise IndexError(f"index {key} is out of bounds for {n} rows")
            out = self._gather(np.array([int(key) % n]))[0]
            return out[rest] if rest else out
        rows = np.arange(*key.indices(len(self))) if isinstance(key, slice) else np.arange(len(self))[key]
        if rows.ndim != 1:
            raise IndexError("rows must be selected by an integer, a slice, a 1-D index or a mask")
        out = self._gather(rows)
        return out[(slice(None), *rest)] if rest else out

    def __getstate__(self) -> dict:
        # Pickling (e.g. to a worker process) must not copy mapped data: reopen there instead.
        return {**self.__dict__, "_open": collections.OrderedDict()}

    def _mapped(self, shard: int) -> np.ndarray:
        """Shard ``shard``'s file, memory-mapped read-only (least recently used ones closed)."""
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        array = np.load(self.files[shard], mmap_mode="r", allow_pickle=False)
        self._open[shard] = array
        if len(self._open) > MAX_OPEN_SHARDS:
            self._open.popitem(last=False)
        return array

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self.item_shape), dtype=np.float32)
        shards, local = self._shard[rows], self._row[rows]
        for shard in np.unique(shards):
            where = np.flatnonzero(shards == shard)
            wanted = local[where]
            mapped = self._mapped(int(shard))
            first = int(wanted[0])
            if np.array_equal(wanted, np.arange(first, first + len(wanted))):
                out[where] = mapped[first:first + len(wanted)]  # one sequential read
            else:
                out[where] = mapped[wanted]
        return out
