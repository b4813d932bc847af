"""System (POSIX) shared-memory regions that clients register for tensor inputs and outputs.

Triton's system shared-memory extension: a client creates a POSIX shared-memory object
(`shm_open`, visible here as /dev/shm/<key>), registers a region of it by name, key, offset and
size, and then names the region in an input's or output's parameters instead of sending the bytes
in the message. The registry maps each region once and checks every access against its bounds.

Safety: keys are plain names (no path), opened without following links, and must be regular
files; the number of regions is bounded; every read and write checks offset + size against the
region and the object's current size (a client that shrinks its object after registering gets an
error, not a SIGBUS). Reads copy the bytes out under the registry's lock and writes copy them in
under it, so a region unregistered while a request uses it is never touched after it is unmapped:
the request fails with a message saying so.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidInput, ServingError, shorten

SHM_DIR = Path("/dev/shm")
MAX_REGIONS = 256
MAX_NAME_CHARS = 128
# shm_open names: an optional leading slash, then one path component of safe characters.
_KEY = re.compile(r"/?[A-Za-z0-9_.\-]{1,250}")
_NAME = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces

# The tensor parameters that point at a region (Triton's names).
REGION = "shared_memory_region"
BYTE_SIZE = "shared_memory_byte_size"
OFFSET = "shared_memory_offset"


class RegionExists(ServingError):
    """A region of that name is already registered."""

    status = "ALREADY_EXISTS"


class RegionNotFound(ServingError):
    """No region of that name is registered."""

    status = "NOT_FOUND"


class TooManyRegions(ServingError):
    """The registry holds its maximum number of regions."""

    status = "RESOURCE_EXHAUSTED"


@dataclass(frozen=True)
class RegionInfo:
    """What status reports for one region."""

    name: str
    key: str
    offset: int
    byte_size: int


class _Region:
    """One registered region: its object's file descriptor and a mapping of the whole object."""

    def __init__(self, info: RegionInfo, fd: int, mapping: mmap.mmap) -> None:
        self.info = info
        self.fd = fd
        self.mapping = mapping

    def check(self, offset: int, size: int, what: str) -> int:
        """The absolute start of [offset, offset + size) in the object, after every bound check."""
        info = self.info
        if offset < 0 or size < 0:
            raise InvalidInput(f"{what}: offset and byte size must not be negative")
        if offset + size > info.byte_size:
            raise InvalidInput(
                f"{what}: offset {offset} + byte size {size} exceeds shared-memory region "
                f"'{shorten(info.name)}' of {info.byte_size} bytes"
            )
        start = info.offset + offset
        if start + size > os.fstat(self.fd).st_size:  # the client shrank its object
            raise InvalidInput(
                f"{what}: shared-memory object '{info.key}' is now smaller than region "
                f"'{shorten(info.name)}'"
            )
        return start

    def close(self) -> None:
        self.mapping.close()
        os.close(self.fd)


class SharedMemoryRegistry:
    """The registered regions of one server process; safe to use from several threads."""

    def __init__(self, max_regions: int = MAX_REGIONS, directory: Path = SHM_DIR) -> None:
        self.max_regions = max_regions
        self._directory = directory
        self._regions: dict[str, _Region] = {}
        self._lock = threading.Lock()
        self.reads = self.writes = 0  # tensors read from and written into regions

    def __len__(self) -> int:
        return len(self._regions)

    def register(self, name: str, key: str, offset: int, byte_size: int) -> RegionInfo:
        """Map `byte_size` bytes from `offset` of shared-memory object `key` as region `name`."""
        if not _NAME.fullmatch(name):
            raise InvalidInput(
                f"shared-memory region name '{shorten(name)}' must be 1 to {MAX_NAME_CHARS} "
                "printable characters without spaces"
            )
        if not _KEY.fullmatch(key) or key.lstrip("/") in (".", ".."):
            raise InvalidInput(
                f"shared-memory key '{shorten(key)}' must be a POSIX shared-memory name such as "
                "'/my_region' (letters, digits, '_', '.', '-'; no other '/')"
            )
        if byte_size <= 0:
            raise InvalidInput(f"shared-memory region '{name}': byte_size must be positive")
        with self._lock:
            if name in self._regions:
                raise RegionExists(f"shared-memory region '{name}' is already registered")
            if len(self._regions) >= self.max_regions:
                raise TooManyRegions(
                    f"{self.max_regions} shared-memory regions are registered, the most this "
                    "server allows; unregister some first"
                )
            region = self._open(RegionInfo(name, key, offset, byte_size))
            self._regions[name] = region
            return region.info

    def _open(self, info: RegionInfo) -> _Region:
        path = self._directory / info.key.lstrip("/")
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise InvalidInput(
                f"shared-memory region '{info.name}': no shared-memory object '{info.key}'"
            ) from None
        except OSError as exc:
            raise InvalidInput(
                f"shared-memory region '{info.name}': cannot open '{info.key}': {exc.strerror}"
            ) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidInput(f"shared-memory key '{info.key}' is not a shared-memory object")
            if info.offset + info.byte_size > st.st_size:
                raise InvalidInput(
                    f"shared-memory region '{info.name}': offset {info.offset} + byte_size "
                    f"{info.byte_size} exceeds object '{info.key}' of {st.st_size} bytes"
                )
            mapping = mmap.mmap(fd, st.st_size)
        except BaseException:
            os.close(fd)
            raise
        return _Region(info, fd, mapping)

    def unregister(self, name: str = "") -> None:
        """Unregister one region, or every region when `name` is empty."""
        with self._lock:
            if not name:
                regions = list(self._regions.values())
                self._regions.clear()
            elif name in self._regions:
                regions = [self._regions.pop(name)]
            else:
                raise RegionNotFound(f"no shared-memory region '{shorten(name)}' is registered")
            for region in regions:
                region.close()

    def status(self, name: str = "") -> list[RegionInfo]:
        """Every region, or the one named (NOT_FOUND when it is not registered)."""
        with self._lock:
            if not name:
                return [r.info for r in self._regions.values()]
            if name not in self._regions:
                raise RegionNotFound(f"no shared-memory region '{shorten(name)}' is registered")
            return [self._regions[name].info]

    def _region(self, name: str, what: str) -> _Region:
        region = self._regions.get(name)
        if region is None:
            raise InvalidInput(f"{what}: shared-memory region '{shorten(name)}' is not registered")
        return region

    def read(self, name: str, offset: int, size: int, what: str) -> bytes:
        """A copy of `size` bytes at `offset` in region `name`."""
        with self._lock:
            region = self._region(name, what)
            start = region.check(offset, size, what)
            self.reads += 1
            return region.mapping[start : start + size]

    def write(self, name: str, offset: int, data: bytes | memoryview, what: str) -> None:
        """Copy `data` into region `name` at `offset`."""
        with self._lock:
            region = self._region(name, what)
            start = region.check(offset, len(data), what)
            region.mapping[start : start + len(data)] = data
            self.writes += 1

    def close(self) -> None:
        """Unregister everything (server shutdown)."""
        self.unregister("")
