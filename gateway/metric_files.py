"""The files under the workers' shared metrics, with their blocks allocated.

prometheus_client keeps each process's values in a file it maps into memory
(``MmapedDict``), made and grown with ``truncate``: a sparse file. Writing into a page
of the mapping that has no block yet makes the kernel find one, and on a full disk (or
a full tmpfs) it cannot: the process gets SIGBUS and dies, with every call in it. A full
disk under the embedded database did exactly that to a worker. Here a file is made and
grown with ``posix_fallocate``, so each page of the mapping has its block before it is
written, and a disk that has none left fails that one change with ``OSError``
(``ENOSPC``), which ``metrics`` logs and the process survives.

Installed by ``metrics`` as the class ``prometheus_client.values`` maps files with;
reading files (a scrape) is left as it is.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from prometheus_client import mmap_dict


class AllocatedMmapedDict(mmap_dict.MmapedDict):
    """``MmapedDict`` over a file whose every mapped byte is allocated."""

    def __init__(self, filename: str, read_mode: bool = False) -> None:
        if not read_mode:
            _allocate_new(filename, mmap_dict._INITIAL_MMAP_SIZE)
        super().__init__(filename, read_mode)
        if not read_mode:
            self._f = _Allocating(self._f)

    def _init_value(self, key: str) -> None:
        capacity = self._capacity
        try:
            super()._init_value(key)
        except BaseException:
            self._capacity = capacity  # it was doubled before the file failed to grow
            raise


class _Allocating:
    """The file object ``MmapedDict`` grows with ``truncate``: grown allocated instead."""

    __slots__ = ("_file",)

    def __init__(self, file: Any) -> None:
        self._file = file

    def fileno(self) -> int:
        return int(self._file.fileno())

    def truncate(self, size: int) -> None:
        os.posix_fallocate(self._file.fileno(), 0, size)

    def close(self) -> None:
        self._file.close()


def _allocate_new(filename: str, size: int) -> None:
    """Give a file not made yet ``size`` allocated bytes, or raise OSError and leave no
    file (a scrape cannot read an empty one)."""
    fd = os.open(filename, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size:
            return
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(filename)
            raise
    finally:
        os.close(fd)
