"""Read and verify an engine's weights on threads at process start, while Python imports torch.

`import torch` is 1.2-1.9 s of a daemon start on our devices, spent running Python with the
GIL held. Reading the weights file and hashing it need no torch, and os.preadv and hashlib
both drop the GIL, so `edgellm serve` starts them first and they run beside the import
instead of after it (bench/probe_load.py: 0.14 s of reading and hashing for a 1B-shape
engine, 0.8 s for an 8B one, on 8 threads). load_weights then takes the bytes from memory.

What reaches the device is what was checked: the chunks are hashed in the buffer they were
read into, and that buffer is what load_weights copies from. It is used only if the file
load_weights opens is the one read here (same device, inode, size and modification time)
and the manifest entry it checks against is the one checked here; anything else, including
a chunk that did not match, discards the buffer and leaves the whole job, and the error
message, to load_weights. The cost is host memory of the file's size until the engine is
placed, so this is done only where that is at most a quarter of the memory available (on a
Jetson, host memory is GPU memory); otherwise load_weights streams the file as it always has.
Torch-free on purpose, like cuda_context: it must run before torch is imported.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from edgellm.engine.manifest import (
    WEIGHTS_NAME,
    chunk_spans,
    hash_threads,
    open_listed_file,
    read_into,
    read_manifest,
    usable_cores,
)
from edgellm.errors import EdgeLLMError

MEMORY_SHARE = 4  # prefetch only files of at most 1/MEMORY_SHARE of the available memory

_started: dict[Path, "WeightsPrefetch"] = {}
_lock = threading.Lock()


class WeightsPrefetch:
    """One engine's weights file being read and verified into host memory on a thread."""

    def __init__(self, engine_dir: Path, entry: dict[str, Any]):
        self.engine_dir = engine_dir
        self.entry = entry
        self.buffer: mmap.mmap | None = None  # the whole file, once every chunk matched
        self.identity: tuple | None = None
        self._thread = threading.Thread(target=self._run, name="edgellm-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            fd = open_listed_file(self.engine_dir, WEIGHTS_NAME, self.entry)
        except EdgeLLMError:
            return  # load_weights reports it
        try:
            st = os.fstat(fd)
            # Anonymous memory, not a bytearray: bytearray(n) zero-fills its n bytes with the GIL
            # held, which stalled the import beside it (by 3.2 s for an 8B engine's 5.8 GB on the
            # H200); these pages are first touched by preadv, which runs without the GIL.
            buffer = mmap.mmap(-1, max(st.st_size, 1))
            try:
                buffer.madvise(mmap.MADV_HUGEPAGE)  # fewer page faults, where the kernel has huge pages
            except (AttributeError, OSError):
                pass
            view = memoryview(buffer)
            spans = chunk_spans(st.st_size, self.entry["chunk_size"])

            def matches(i: int) -> bool:
                a, b = spans[i]
                if read_into(fd, view[a:b], a) != b - a:
                    return False
                return hashlib.sha256(view[a:b]).hexdigest() == self.entry["chunk_sha256"][i]

            with ThreadPoolExecutor(min(prefetch_threads(), len(spans)) or 1, thread_name_prefix="edgellm-prefetch") as pool:
                every_chunk_matched = all(pool.map(matches, range(len(spans))))
            if every_chunk_matched:
                self.buffer, self.identity = buffer, file_identity(st)
        except Exception:  # noqa: BLE001 - any failure: load_weights reads the file itself and reports what is wrong
            return
        finally:
            os.close(fd)

    def join(self) -> None:
        self._thread.join()


def prefetch_threads() -> int:
    """The loader's thread count, less one core left to the import beside them: on a 2-core
    host, two prefetch threads of a 1 GB file made `import torch` 0.6-1.6 s slower, one 0.1-0.2 s
    (and was done 0.1-0.45 s after the import)."""
    return max(1, min(hash_threads(), usable_cores() - 1))


def file_identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def available_memory_bytes() -> int:
    import psutil

    return psutil.virtual_memory().available


def start_prefetching_weights(engine_dir: Path, available_bytes: int | None = None) -> WeightsPrefetch | None:
    """Begin reading and verifying engine_dir's weights into memory; None where there is
    nothing to prefetch (no readable manifest, a manifest without chunk hashes, a file too
    large for the memory available). Never raises for a bad engine: loading reports it."""
    engine_dir = Path(engine_dir).absolute()
    try:
        entry = read_manifest(engine_dir).files.get(WEIGHTS_NAME)
    except (EdgeLLMError, OSError, ValueError):
        return None
    if not isinstance(entry, dict) or "chunk_sha256" not in entry or not isinstance(entry.get("size"), int):
        return None
    available = available_memory_bytes() if available_bytes is None else available_bytes
    if entry["size"] * MEMORY_SHARE > available:
        return None
    prefetch = WeightsPrefetch(engine_dir, entry)
    with _lock:
        _started[engine_dir] = prefetch
    return prefetch


def take_prefetched(engine_dir: Path, entry: dict[str, Any] | None, fd: int) -> memoryview | None:
    """The verified bytes of the weights file open as fd, if a prefetch of engine_dir read this
    very file and checked it against this manifest entry; waits for the prefetch to finish.
    The prefetch is forgotten either way, so its memory goes once the caller drops the view."""
    with _lock:
        prefetch = _started.pop(Path(engine_dir).absolute(), None)
    if prefetch is None:
        return None
    prefetch.join()
    if prefetch.buffer is None or entry != prefetch.entry or prefetch.identity != file_identity(os.fstat(fd)):
        return None
    return memoryview(prefetch.buffer)
