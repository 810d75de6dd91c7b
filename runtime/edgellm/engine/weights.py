"""Read model.safetensors once: each chunk is read, hashed and placed on the device in one pass.

Loading used to read the file twice: a sequential sha256 of the whole file (~1 GB/s), then
safetensors.torch.load_file. safetensors cannot hash what it reads, so to check the very bytes
that end up on the device we read the file ourselves. The format is small enough to parse here:

    8 bytes   N, little-endian u64: the length of the JSON header
    N bytes   JSON {name: {"dtype": "F16", "shape": [..], "data_offsets": [begin, end]}, ...,
                    "__metadata__": {str: str} (optional)}
    the rest  the data section; each tensor's bytes are data[begin:end]

The manifest holds a sha256 for every 64 MiB chunk of the file (manifest.CHUNK_SIZE), so the
chunks are checked independently, on several threads, as they are read. Nothing read is handed
out before every chunk matched. Engines built before chunk hashes existed have only the
whole-file sha256: their chunks are still read in parallel but hashed in file order.
Where `edgellm serve` already read and verified the file into memory during start-up
(edgellm.engine.prefetch), the bytes are taken from there instead.
No pickle anywhere: the header is JSON, the data raw bytes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from edgellm.engine.manifest import (
    CHUNK_SIZE,
    WEIGHTS_NAME,
    Manifest,
    chunk_spans,
    hash_error,
    hash_threads,
    is_count,
    open_listed_file,
    read_into,
    verify_files,
)
from edgellm.engine.prefetch import take_prefetched
from edgellm.errors import EngineFormatError

# The dtypes our builders write; anything else in an engine is damage, not a format to support.
DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "I32": torch.int32,
          "I64": torch.int64, "U8": torch.uint8, "I8": torch.int8}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
VIEW_ALIGN = 16
UPLOAD_PIECE, UPLOAD_SLOTS = 16 << 20, 4  # pinned staging for weights already in memory (_place)


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets in the data section
    end: int


@dataclass(frozen=True)
class Layout:
    head: bytes  # the file's first bytes: header length and JSON header, exactly as parsed
    tensors: list[TensorEntry]  # in data order
    size: int  # of the whole file

    @property
    def data_start(self) -> int:
        return len(self.head)


def load_weights(
    engine_dir: Path,
    manifest: Manifest,
    device: torch.device,
    verify: bool = True,
    progress: Callable[[str], None] | None = None,
    read_chunk: int = CHUNK_SIZE,
) -> dict[str, torch.Tensor]:
    """The engine's tensors on `device`, each checked against the manifest's hashes when `verify`.

    read_chunk: the read size for manifests without chunk hashes (with them, reads follow the
    manifest's chunks); tests make it small to exercise many chunks.
    """
    say = progress or (lambda _msg: None)
    engine_dir = Path(engine_dir)
    path = engine_dir / WEIGHTS_NAME
    entry = manifest.files.get(WEIGHTS_NAME)
    if verify:
        if entry is None:
            raise EngineFormatError(f"the engine's manifest does not list {WEIGHTS_NAME}; rebuild the engine")
        fd = open_listed_file(engine_dir, WEIGHTS_NAME, entry)
    else:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise EngineFormatError(f"{path} cannot be opened ({e.strerror}); rebuild or re-push the engine") from None
    try:
        size = os.fstat(fd).st_size
        prefetched = take_prefetched(engine_dir, entry, fd)
        if prefetched is not None:
            layout = read_layout(_memory_reader(prefetched), size, path)
            say(f"copying {size / 1e6:.1f} MB of weights, read and verified during start-up, to {device}")
            return tensor_views(_place(torch.frombuffer(prefetched, dtype=torch.uint8)[layout.data_start:], device), layout)
        try:
            layout = read_layout(functools.partial(read_into, fd), size, path)
        except EngineFormatError:
            if verify:  # a file changed since it was built is reported as such, not as a bad header
                verify_files(engine_dir, manifest, [WEIGHTS_NAME])
            raise
        chunked = verify and "chunk_sha256" in entry
        spans = chunk_spans(size, entry["chunk_size"] if chunked else read_chunk)
        verifier = None
        if verify:
            verifier = _Verifier(entry["chunk_sha256"] if chunked else None, entry["sha256"], spans)
        threads = min(hash_threads(), len(spans))
        say(f"{'reading and verifying' if verify else 'reading'} {size / 1e6:.1f} MB in {len(spans)} chunks "
            f"on {threads} threads")
        read = _read_cuda if device.type == "cuda" else _read_cpu
        data = read(fd, layout, spans, verifier, threads, device)
    except OSError as e:
        raise EngineFormatError(f"{path} could not be read ({e.strerror or e}); check the storage, then re-push the engine") from None
    finally:
        os.close(fd)
    return tensor_views(data, layout)


def read_layout(read_at: Callable[[memoryview, int], int], size: int, path: Path) -> Layout:
    """Parse and check the header: every tensor a known dtype, its bytes matching its shape,
    the tensors filling the data section in order with no gap or overlap. read_at(view,
    offset) fills view from the file's bytes at offset and returns how many it filled."""

    def bad(why: str) -> EngineFormatError:
        return EngineFormatError(f"{path} is not a valid safetensors file: {why}; the engine is damaged, rebuild or re-push it")

    if size < 8:
        raise bad(f"it is {size} bytes, too short for the 8-byte header length")
    prefix = bytearray(8)
    read_at(memoryview(prefix), 0)
    n = int.from_bytes(prefix, "little")
    if not 2 <= n <= MAX_HEADER_BYTES or 8 + n > size:
        raise bad(f"its header length {n} does not fit in its {size} bytes")
    head = bytearray(8 + n)
    if read_at(memoryview(head), 0) != len(head):
        raise bad("it ends inside its header")
    try:
        header = json.loads(head[8:].decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise bad("its __metadata__ is not an object of strings")
    tensors = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name!r} needs exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise bad(f"tensor {name!r} has dtype {dtype!r}, expected one of {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(is_count(d) for d in shape):
            raise bad(f"tensor {name!r} has shape {shape!r}, expected a list of sizes")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_count(o) for o in offsets):
            raise bad(f"tensor {name!r} has data_offsets {offsets!r}, expected [begin, end]")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise bad(f"tensor {name!r} is {dtype} {shape} ({nbytes} bytes) but its data_offsets {offsets} "
                      f"span {offsets[1] - offsets[0]}")
        tensors.append(TensorEntry(name, DTYPES[dtype], tuple(shape), offsets[0], offsets[1]))
    tensors.sort(key=lambda t: (t.begin, t.end))
    data_size, at = size - len(head), 0
    for t in tensors:
        if t.begin != at:
            raise bad(f"tensor {t.name!r} starts at data byte {t.begin}, expected {at} "
                      "(tensors follow each other with no gap or overlap)")
        at = t.end
    if at != data_size:
        raise bad(f"its tensors end at data byte {at} but its data section is {data_size} bytes")
    return Layout(bytes(head), tensors, size)


def _memory_reader(file_bytes: memoryview) -> Callable[[memoryview, int], int]:
    def read_at(view: memoryview, offset: int) -> int:
        n = max(0, min(len(view), len(file_bytes) - offset))
        view[:n] = file_bytes[offset:offset + n]
        return n

    return read_at


def _place(source: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of source (the data section of a file already read and verified, in pageable
    host memory) on `device`. To the GPU it goes through UPLOAD_SLOTS pinned buffers of
    UPLOAD_PIECE bytes: torch fills one (on several threads) while the pieces before it are
    on their way. Pinning costs ~0.35 s per GB (bench/probe_load.py), so they are small."""
    data = torch.empty(source.numel(), dtype=torch.uint8, device=device)
    if device.type != "cuda":
        return data.copy_(source)
    stream = torch.cuda.Stream(device)
    try:
        slots = [(torch.empty(min(UPLOAD_PIECE, source.numel()), dtype=torch.uint8, pin_memory=True), torch.cuda.Event())
                 for _ in range(UPLOAD_SLOTS)]
        with torch.cuda.stream(stream):
            for k, a in enumerate(range(0, source.numel(), UPLOAD_PIECE)):
                b = min(a + UPLOAD_PIECE, source.numel())
                staging, sent = slots[k % UPLOAD_SLOTS]
                sent.synchronize()  # this buffer's previous piece has reached the device
                staging[:b - a].copy_(source[a:b])
                data[a:b].copy_(staging[:b - a], non_blocking=True)
                sent.record(stream)
        stream.synchronize()
    except BaseException:
        del data
        torch.cuda.empty_cache()
        raise
    finally:
        slots = None
        _release_pinned_staging()
    return data


def tensor_views(data: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """Each tensor a view into the one data buffer (no copy), except where its offset is not a
    multiple of 16 bytes: the format allows any offset, a view needs one aligned to its element
    size, and kernels run their fast paths (16-byte vector loads; Triton specialises on it) only
    on 16-byte-aligned pointers, as separate allocations were. save_file's layouts of our
    engines are aligned throughout, so this copies nothing in practice."""
    out = {}
    for t in layout.tensors:
        raw = data[t.begin:t.end]
        if t.begin % VIEW_ALIGN:
            raw = raw.clone()
        out[t.name] = raw.view(t.dtype).view(t.shape)
    return out


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def _split(layout: Layout, span: tuple[int, int]) -> tuple[bytes, int, int]:
    """File range [s, e) as (its header bytes, taken from the header as parsed, so the hash
    covers the header that was used) and the data-section range [a, b) it covers."""
    s, e = span
    ds = layout.data_start
    return layout.head[s:min(e, ds)], max(s, ds) - ds, max(e, ds) - ds


class _Aborted(Exception):
    """Another thread failed; this one stops."""


class _Verifier:
    """Checks chunks as threads finish reading them.

    With chunk hashes, each chunk is hashed on its own thread, in any order. Without (engines
    built before them), chunks feed one whole-file hash in file order: a thread waits for its
    chunk's turn, so reading and uploading stay parallel and only hashing is sequential.
    """

    def __init__(self, chunk_sha256: list[str] | None, sha256: str, spans: list[tuple[int, int]]):
        self.chunk_sha256, self.sha256, self.spans = chunk_sha256, sha256, spans
        self._whole = hashlib.sha256()
        self._next = 0  # the chunk whose turn it is to feed _whole
        self._turn = threading.Condition()
        self._aborted = False

    def check(self, i: int, *parts) -> None:
        if self.chunk_sha256 is not None:
            h = hashlib.sha256()
            for p in parts:
                h.update(p)
            if h.hexdigest() != self.chunk_sha256[i]:
                raise hash_error(WEIGHTS_NAME, h.hexdigest(), self.chunk_sha256[i], self.spans[i])
            return
        with self._turn:
            self._turn.wait_for(lambda: self._next == i or self._aborted)
            if self._aborted:
                raise _Aborted()
            for p in parts:
                self._whole.update(p)
            self._next += 1
            self._turn.notify_all()
        if i == len(self.spans) - 1 and self._whole.hexdigest() != self.sha256:
            raise hash_error(WEIGHTS_NAME, self._whole.hexdigest(), self.sha256)

    def abort(self) -> None:
        with self._turn:
            self._aborted = True
            self._turn.notify_all()


class _Workers:
    """`threads` threads running worker(take) where take() gives chunk indices in file order
    (so a thread waiting for its turn to hash never waits on a later chunk), until none is
    left or a thread failed. join() raises the first failure."""

    def __init__(self, threads: int, count: int, verifier: _Verifier | None, worker: Callable[[Callable[[], int | None]], None]):
        self._indices = iter(range(count))
        self._lock = threading.Lock()
        self._errors: list[BaseException] = []
        self._verifier = verifier
        self.failed = threading.Event()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="edgellm-weights")
        for _ in range(threads):
            self._pool.submit(self._run, worker)

    def take(self) -> int | None:
        if self.failed.is_set():
            return None
        with self._lock:
            return next(self._indices, None)

    def fail(self, error: BaseException) -> None:
        with self._lock:
            if not self._errors:
                self._errors.append(error)
        self.failed.set()
        if self._verifier is not None:
            self._verifier.abort()

    def _run(self, worker) -> None:
        try:
            worker(self.take)
        except _Aborted:
            pass
        except BaseException as e:  # handed to the caller by join()
            self.fail(e)

    def join(self) -> None:
        self._pool.shutdown(wait=True)
        if self._errors:
            raise self._errors[0]


def _short_read(layout: Layout, offset: int) -> EngineFormatError:
    return EngineFormatError(f"engine file {WEIGHTS_NAME} ended at byte {offset} while being read, it was {layout.size} "
                             "bytes when opened: it was modified or truncated; re-push or rebuild the engine")


def _read_cpu(fd: int, layout: Layout, spans, verifier: _Verifier | None, threads: int, device: torch.device) -> torch.Tensor:
    """Each thread reads its chunks straight into the one data buffer, then hashes them there."""
    data = torch.empty(layout.size - layout.data_start, dtype=torch.uint8)
    host = memoryview(data.numpy())

    def worker(take):
        while (i := take()) is not None:
            head, a, b = _split(layout, spans[i])
            got = read_into(fd, host[a:b], layout.data_start + a)
            if got != b - a:
                raise _short_read(layout, layout.data_start + a + got)
            if verifier is not None:
                verifier.check(i, head, host[a:b])

    workers = _Workers(threads, len(spans), verifier, worker)
    workers.join()
    return data


def _read_cuda(fd: int, layout: Layout, spans, verifier: _Verifier | None, threads: int, device: torch.device) -> torch.Tensor:
    """Each thread owns a pinned staging buffer and a CUDA stream: read a chunk into the
    buffer, start its copy into the one device buffer, hash it while the copy runs (both only
    read the buffer), and wait for the copy before reading the next chunk into it.

    Order, and why: the workers start first and read their first chunk while this thread
    allocates the device buffer; only their first copy waits for it. Pinned memory and the
    device buffer both need the CUDA context, so whichever asks first creates it (if
    Engine.load's device checks did not) and the others wait for it: reading further ahead
    than one chunk per thread would need host memory beyond the staging buffers (on a Jetson
    host memory is GPU memory). `edgellm serve` does spend it where it can (edgellm.engine.prefetch):
    it reads and verifies the file while torch is imported, and this path is then not taken.
    """
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    data_bytes = layout.size - layout.data_start
    staging_bytes = max(b - a for _, a, b in (_split(layout, s) for s in spans))
    data: list[torch.Tensor] = []  # the device buffer, once allocated
    allocated = threading.Event()

    def worker(take):
        with torch.cuda.device(device):  # a new thread starts on GPU 0
            staging = torch.empty(staging_bytes, dtype=torch.uint8, pin_memory=True)
            host = memoryview(staging.numpy())
            stream = torch.cuda.Stream(device)
            try:
                while (i := take()) is not None:
                    head, a, b = _split(layout, spans[i])
                    stream.synchronize()  # the previous chunk's copy may still read `staging`
                    got = read_into(fd, host[:b - a], layout.data_start + a)
                    if got != b - a:
                        raise _short_read(layout, layout.data_start + a + got)
                    allocated.wait()
                    if not data:
                        return  # the allocation failed; this thread's failure was recorded
                    if b > a:
                        with torch.cuda.stream(stream):
                            data[0][a:b].copy_(staging[:b - a], non_blocking=True)
                    if verifier is not None:
                        verifier.check(i, head, host[:b - a])
            finally:
                stream.synchronize()

    workers = _Workers(threads, len(spans), verifier, worker)
    try:
        data.append(torch.empty(data_bytes, dtype=torch.uint8, device=device))
    except BaseException as e:
        workers.fail(e)
    finally:
        allocated.set()
    try:
        workers.join()
    except BaseException:
        data.clear()  # nothing unverified stays on the device
        torch.cuda.empty_cache()
        raise
    finally:
        _release_pinned_staging()
    return data[0]


def _release_pinned_staging() -> None:
    """torch keeps freed pinned memory cached for the life of the process; the staging
    buffers (up to 8 x 64 MiB) are not needed again, and on a Jetson host memory is GPU memory."""
    empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)  # torch >= 2.13
    empty = empty or getattr(torch._C, "_host_emptyCache", None)  # older torch
    if empty is not None:
        empty()
