"""The disk tier: one verified entry file per block, in a folder that survives restarts and may be
shared by several processes at once.

- Paths are deterministic: ``<folder>/<namespace hex>/<hash hex[:2]>/<hash hex>.kvb``, so a new process
  finds what an earlier one stored without any index.
- Writes go to a temp file in the same folder, then ``os.replace``: a reader sees a whole entry or none,
  even if the writer is killed. Temp files of dead writers are removed by the size sweep.
- Writes happen on a background thread fed by a bounded queue. A full queue drops the write and counts
  it: ``generate()`` never waits on the disk. Blocks already on disk are skipped. At interpreter exit
  queued writes are flushed with a bounded wait (``EXIT_FLUSH_S``).
- ``size`` is enforced by deleting the least recently used entries (file mtime; a hit touches its file)
  of the whole folder, whichever process wrote them. Each process re-scans the folder every
  ``RESCAN_EVERY`` writes and whenever its estimate exceeds the limit, so with several writers the folder
  can overshoot by at most about that many entries per process between scans.
- Every failure (bad entry, unreadable or read-only folder, full disk) is a miss or a dropped write,
  counted and warned about once; a bad entry is deleted.
- With a ``TierKey`` (``tier_secret``) every entry carries a MAC and only entries with a valid one are
  read (see ``entry``); a file whose size is outside the layout's ``size_bounds`` is rejected from its
  ``stat`` alone, before it is mapped or checksummed.
- Reads map the file (``torch.from_file``, private mapping) instead of copying it into fresh memory:
  the checksum reads the page cache directly and the promotion into the device pool is the only copy.
  Entries are immutable once renamed into place (never truncated; an eviction unlinks, which a mapping
  survives), so do not edit entry files in place while processes read them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..layout import LayerLayout
from ..memory import format_bytes, parse_bytes, suggested_size
from .base import BlockData, BlockRequest, Tier
from .entry import EntryError, TierKey, decode, encode, size_bounds
from .kind import TierKind
from .state_entry import decode_state, encode_state
from .writer import EXIT_FLUSH_S, BackgroundWriter

logger = logging.getLogger(__name__)

SUFFIX = ".kvb"
STATE_SUFFIX = ".kvs"  # a recurrent-state snapshot (state_entry), beside the block it ends with
TEMP_SUFFIX = ".tmp"
DEFAULT_DISK_SIZE = "16GiB"
RESCAN_EVERY = 32
STALE_TEMP_S = 600.0  # a temp file this old belongs to a writer that died
LOW_WATER = 0.9  # an eviction sweep deletes down to this fraction of the limit


def write_file(path: Path, data: bytes, fsync: bool) -> None:
    """Write ``data`` to ``path`` (a new temp file). A seam for tests that simulate a full disk."""
    with open(path, "xb") as handle:
        handle.write(data)
        if fsync:
            handle.flush()
            os.fsync(handle.fileno())


class DiskTier(Tier):
    name = "disk"

    def __init__(
        self,
        folder: str | os.PathLike,
        layouts: list[LayerLayout],
        *,
        size: int | str | None = None,
        max_queued_blocks: int = 128,
        fsync: bool = True,
        key: TierKey | None = None,
    ):
        super().__init__()
        self.folder = Path(folder).expanduser()
        self.layouts = layouts
        self.mac_key = key  # MAC key of the tier_secret (entries are authenticated with it); never shown
        self.size = parse_bytes(size if size is not None else DEFAULT_DISK_SIZE, "disk_size")
        self.fsync = fsync
        self.writer = BackgroundWriter(
            lambda batch: [self._write(*item) for item in batch],
            lambda error: self.error("writer", f"write failed ({error!r})"),
            name="hf_prefix_cache-disk",
            max_items=max_queued_blocks,
        )
        self._known: set[tuple[bytes, bytes]] = set()  # entries this process wrote or read
        self._used: int | None = None  # estimated bytes in the folder; None until the first scan
        self._writes_since_scan = 0
        self._closed = False
        self.usable = self._make_folder()

    def _make_folder(self) -> bool:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            self.error("folder", f"cannot use the folder {self.folder} ({error}); the disk tier is off")
            return False
        return True

    # -- paths ---------------------------------------------------------------------------------------
    def path(self, namespace: bytes, block_hash: bytes) -> Path:
        name = block_hash.hex()
        return self.folder / namespace.hex() / name[:2] / f"{name}{SUFFIX}"

    def has(self, namespace: bytes, block_hash: bytes) -> bool:
        if (namespace, block_hash) in self._known:
            return True
        return self.usable and self.path(namespace, block_hash).exists()

    # -- reads ---------------------------------------------------------------------------------------
    def get(self, namespace: bytes, requests: Sequence[BlockRequest]) -> list[BlockData]:
        return [block for batch in self.stream(namespace, requests, len(requests) or 1) for block in batch]

    def stream(
        self, namespace: bytes, requests: Sequence[BlockRequest], batch: int
    ) -> Iterator[list[BlockData]]:
        """Map and verify ``batch`` entries at a time (where the store overlaps reads, the caller copies one
        batch into the pool while a prefetch thread maps and checksums the next)."""
        if not self.usable or self._closed:
            return
        hits = 0
        try:
            for start in range(0, len(requests), batch):
                found, stopped = [], False
                for index in range(start, min(len(requests), start + batch)):
                    block = self._read(namespace, requests[index])
                    if block is None:
                        self.count(misses=1)
                        # Past a missing entry (another process's size sweep deleted it, say) this
                        # process's memory of what is on disk is stale: forget the rest, so a later store
                        # checks the folder again instead of skipping blocks that are gone.
                        for later in requests[index + 1 :]:
                            self._known.discard((namespace, later.block_hash))
                        stopped = True
                        break
                    found.append(block)
                hits += len(found)
                if found:
                    yield found
                if stopped:
                    return
        finally:
            self.count(hits=hits)

    def _read(self, namespace: bytes, request: BlockRequest) -> BlockData | None:
        path = self.path(namespace, request.block_hash)
        try:
            info = path.stat()
            size = info.st_size
            low, high = size_bounds(len(request.tokens), self.layouts)
            if stat.S_ISREG(info.st_mode) and not low <= size <= high:  # a huge or sparse file is never read
                error = EntryError("size", f"{size} bytes, an entry of this layout has {low} to {high}")
                return self._reject(namespace, request, path, error)
            data = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
        except FileNotFoundError:
            self._known.discard((namespace, request.block_hash))
            return None
        except (OSError, RuntimeError) as error:  # torch reports a failed open or mapping as RuntimeError
            if not path.exists():  # deleted between the stat and the mapping: a plain miss
                self._known.discard((namespace, request.block_hash))
                return None
            self.error("read", f"cannot read {path} ({error})")
            return None
        try:
            block = decode(data, namespace, request, self.layouts, self.mac_key)
        except EntryError as error:
            return self._reject(namespace, request, path, error)
        self.count(bytes_read=len(data))
        self._known.add((namespace, request.block_hash))
        with contextlib.suppress(OSError):
            os.utime(path)  # most recently used: the size sweep deletes it last
        return block

    def _reject(self, namespace: bytes, request: BlockRequest, path: Path, error: EntryError) -> None:
        """A bad entry: counted (its kind in ``error_kinds``), deleted, a miss."""
        self.error(error.kind, f"bad entry {path} ({error}), deleted")
        self._remove(path)
        self._known.discard((namespace, request.block_hash))

    # -- writes --------------------------------------------------------------------------------------
    def put(self, namespace: bytes, blocks: Sequence[BlockData]) -> None:
        if not self.usable or self._closed:
            self.count(dropped=len(blocks))
            return
        for block in blocks:
            if (namespace, block.block_hash) in self._known:
                self.count(skipped=1)
            elif not self.writer.submit((namespace, block)):
                self.count(dropped=1)

    def _write(self, namespace: bytes, block: BlockData) -> None:
        path = self.path(namespace, block.block_hash)
        if path.exists():
            self._known.add((namespace, block.block_hash))
            self.count(skipped=1)
            return
        data = encode(namespace, block) if self.mac_key is None else encode(namespace, block, self.mac_key)
        if not self._write_entry(path, data, "block"):
            return
        self._known.add((namespace, block.block_hash))
        self.count(puts=1)

    def _write_entry(self, path: Path, data: bytes, what: str) -> bool:
        """Put ``data`` at ``path`` whole or not at all (a temp file, then a rename), within ``size``;
        False (counted, warned once) when the folder refuses it."""
        temp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}{TEMP_SUFFIX}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._make_room(len(data))
            write_file(temp, data, self.fsync)
            os.replace(temp, path)
        except OSError as error:
            self._remove(temp)
            kind = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk full", errno.EROFS: "read-only"}.get(
                error.errno, "read-only" if error.errno in (errno.EACCES, errno.EPERM) else "write"
            )
            self.error(kind, f"cannot write {path} ({error}); the {what} stays uncached on disk")
            return False
        self._used = (self._used or 0) + len(data)
        self.count(bytes_written=len(data))
        return True

    # -- state snapshots (hybrid models) ---------------------------------------------------------------
    def state_path(self, namespace: bytes, block_hash: bytes) -> Path:
        return self.path(namespace, block_hash).with_suffix(STATE_SUFFIX)

    def put_state(self, namespace: bytes, block_hash: bytes, tokens: int, layers: list) -> None:
        """Written now, not queued: one file per snapshot, at most a few per call."""
        if not self.usable or self._closed:
            return
        data = encode_state(namespace, block_hash, tokens, layers, self.mac_key)
        self._write_entry(self.state_path(namespace, block_hash), data, "state")

    def get_state(self, namespace: bytes, block_hash: bytes, layouts: list) -> tuple[int, list] | None:
        if not self.usable or self._closed:
            return None
        path = self.state_path(namespace, block_hash)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            self.error("read", f"cannot read {path} ({error})")
            return None
        try:
            found = decode_state(data, namespace, block_hash, layouts, self.mac_key)
        except EntryError as error:
            self.error(error.kind, f"bad state entry {path} ({error}), deleted")
            self._remove(path)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)
        self.count(bytes_read=len(data))
        return found

    # -- size ----------------------------------------------------------------------------------------
    def _make_room(self, incoming: int) -> None:
        """Delete least recently used entries until ``incoming`` more bytes fit within ``size``."""
        self._writes_since_scan += 1
        if self._used is None or self._writes_since_scan >= RESCAN_EVERY or self._used + incoming > self.size:
            entries = self._scan()
            self._writes_since_scan = 0
            self._used = sum(size for _, size, _ in entries)
            if self._used + incoming > self.size:
                target = min(self.size - incoming, int(self.size * LOW_WATER))
                kept = {h.hex() for h in self.kept()}  # blocks pinned in this process: their entries stay
                for path, size, _ in sorted(entries, key=lambda entry: entry[2]):
                    if self._used <= target:
                        break
                    if path.name[: -len(SUFFIX)] in kept:
                        continue
                    if self._remove(path):
                        self.count(evictions=1)
                    self._used -= size
                    self._forget(path)

    def _scan(self) -> list[tuple[Path, int, float]]:
        """Every entry of the folder as (path, bytes, mtime); stale temp files are deleted on the way."""
        entries = []
        now = time.time()
        for root, _, files in os.walk(self.folder):
            for name in files:
                path = Path(root) / name
                try:
                    info = path.stat()
                except OSError:
                    continue
                if name.endswith(TEMP_SUFFIX):
                    if now - info.st_mtime > STALE_TEMP_S:
                        self._remove(path)
                    continue
                if name.endswith((SUFFIX, STATE_SUFFIX)):
                    entries.append((path, info.st_size, info.st_mtime))
        return entries

    def used_bytes(self) -> int:
        """Bytes of entries in the folder now (all namespaces, all processes)."""
        return sum(size for _, size, _ in self._scan()) if self.usable else 0

    def _forget(self, path: Path) -> None:
        if not path.name.endswith(SUFFIX):
            return
        try:
            key = (bytes.fromhex(path.parent.parent.name), bytes.fromhex(path.name[: -len(SUFFIX)]))
        except ValueError:
            return
        self._known.discard(key)

    @staticmethod
    def _remove(path: Path) -> bool:
        try:
            path.unlink()
        except OSError:
            return False
        return True

    # -- maintenance ---------------------------------------------------------------------------------
    def delete(self, namespace: bytes, block_hash: bytes) -> None:
        self._known.discard((namespace, block_hash))
        self._remove(self.path(namespace, block_hash))

    def clear(self, namespace: bytes | None = None) -> int:
        """Delete the entries of ``namespace`` (every namespace with None) after queued writes land."""
        if not self.usable:
            return 0
        self.flush(EXIT_FLUSH_S)
        folder = self.folder / namespace.hex() if namespace is not None else self.folder
        removed = 0
        for root, _, files in os.walk(folder):
            for name in files:
                if name.endswith(SUFFIX) and self._remove(Path(root) / name):
                    removed += 1
        self._known = {key for key in self._known if namespace is not None and key[0] != namespace}
        self._used = None
        return removed

    def flush(self, timeout: float | None = None) -> bool:
        return self.writer.flush(timeout)

    def close(self, timeout: float = EXIT_FLUSH_S) -> None:
        if self._closed:
            return
        self.writer.close(timeout)
        self._closed = True


def check_disk_size(disk: str | os.PathLike, disk_size: int | str | None) -> None:
    """Refuse, with the fix, a disk tier larger than its filesystem can hold: the free space plus the
    entries already in the folder (which the limit counts)."""
    size = parse_bytes(disk_size if disk_size is not None else DEFAULT_DISK_SIZE, "disk_size")
    if disk_size is None:
        return  # the default is capped by the filesystem in practice; only an explicit size is checked
    folder = Path(disk).expanduser()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return  # the disk tier reports an unusable folder itself
    if size <= free:
        return
    held = _entry_bytes(folder)
    if size > free + held:
        raise ValueError(
            f"disk_size={disk_size!r} ({format_bytes(size)}) is more than the {format_bytes(free + held)} the "
            f"filesystem of {folder} can hold (free space plus entries already there); pass a smaller "
            f"disk_size= (e.g. '{suggested_size(free + held)}') or another disk= folder"
        )


def _entry_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(root) / name).stat().st_size
    return total


def build(disk: str | os.PathLike, *, layouts: list[LayerLayout], key=None, size=None) -> DiskTier:
    """The disk tier of ``PrefixCache(disk=..., disk_size=...)``."""
    check_disk_size(disk, size)
    return DiskTier(disk, layouts, size=size, key=key)


DISK = TierKind("disk", "disk", "the folder of the disk tier", build, {"disk_size": "size"}, shared=True)
