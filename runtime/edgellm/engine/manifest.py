"""The engine manifest: the one reader, writer and checker of `manifest.json`.

Torch-free on purpose: the updater (ota/) verifies engines before any model code runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from edgellm import __version__
from edgellm.errors import DeviceMismatchError, EngineFormatError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "model.safetensors"  # the one weights file of an engine
CPU_TARGET = "cpu"
QUANT_SCHEMES = ("int4-awq", "int4-rtn", "fp16")
_HASH_CHUNK = 1 << 20
# Each file is also hashed in chunks of this many bytes (`chunk_sha256`), so that checking it
# spreads over cores and the loader can verify the very bytes it uploads, chunk by chunk.
# 64 MiB: ~70 chunks for an 8B engine, enough to keep 8 threads busy, few enough that the
# manifest stays small (65 bytes per chunk) and a thread's buffer stays modest.
CHUNK_SIZE = 64 << 20
MAX_CHUNK_SIZE = 1 << 30  # each loader thread stages one chunk in pinned memory: bounded
MAX_HASH_THREADS = 8


def sha256_file(path: Path) -> str:
    """The one file-hashing helper (manifest, bundles, uploads all use it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def parse_version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split("+")[0].split(".")[:3])
    except ValueError:
        raise EngineFormatError(f"version {text!r} is not of the form MAJOR.MINOR.PATCH") from None


def normalize_sm(text: str) -> str:
    """'8.7', '87', 'sm_87' and 'cpu' -> '8.7' / 'cpu'."""
    t = text.strip().lower()
    if t == CPU_TARGET:
        return t
    t = t.removeprefix("sm_").removeprefix("sm")
    if "." not in t and t.isdigit() and len(t) >= 2:
        t = f"{t[:-1]}.{t[-1]}"
    major, _, minor = t.partition(".")
    if not (major.isdigit() and minor.isdigit()):
        raise EngineFormatError(f"target SM {text!r} is not valid: expected e.g. 8.7, 8.9, 9.0 or cpu")
    return f"{int(major)}.{int(minor)}"


@dataclasses.dataclass
class Manifest:
    engine_id: str
    model: dict[str, Any]  # {"architecture", "config": ModelConfig.to_dict(), "source"}
    quantization: dict[str, Any]  # {"scheme", "group_size", "weight_layout", "lm_head", ...}
    kv_dtype: str
    max_batch: int
    max_seq_len: int
    target_sms: list[str]
    builder: dict[str, Any]
    min_runtime_version: str
    files: dict[str, dict[str, Any]]  # relative path -> {"sha256", "size", "chunk_size", "chunk_sha256"}
    tokenizer: dict[str, Any] = dataclasses.field(default_factory=dict)
    created: str = ""
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST_NAME) -> "Manifest":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise EngineFormatError(f"{where} is not valid JSON ({e}); the engine is damaged, rebuild or re-push it") from None
        if not isinstance(data, dict):
            raise EngineFormatError(f"{where} must hold a JSON object")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise EngineFormatError(
                f"{where} has engine format version {version!r}; this runtime ({__version__}) reads version "
                f"{FORMAT_VERSION}. Rebuild the engine with a matching builder."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = required - data.keys()
        if missing:
            raise EngineFormatError(f"{where} is missing {sorted(missing)}; the engine is damaged, rebuild it")
        manifest = cls(**{k: v for k, v in data.items() if k in names})
        manifest._check_shape(where)
        return manifest

    def _check_shape(self, where: str) -> None:
        if not isinstance(self.files, dict) or not self.files:
            raise EngineFormatError(f"{where} lists no files")
        for rel, entry in self.files.items():
            check_relative_path(rel)
            if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or not is_count(entry.get("size")):
                raise EngineFormatError(f"{where}: entry for {rel!r} needs sha256 and size")
            _check_chunks(where, rel, entry)
        if self.quantization.get("scheme") not in QUANT_SCHEMES:
            raise EngineFormatError(f"{where}: unknown quantization scheme {self.quantization.get('scheme')!r}")
        self.target_sms = [normalize_sm(s) for s in self.target_sms]

    def memory_bytes(self, device: str = "cuda") -> int:
        """What loading this engine takes: its files (weights) plus its static KV cache
        (fp16 on a GPU, float32 on the CPU reference path). Runtime overheads not included."""
        cfg = self.model["config"]
        kv_element = 4 if device == CPU_TARGET else 2
        kv = 2 * cfg["num_layers"] * self.max_batch * self.max_seq_len * cfg["num_kv_heads"] * cfg["head_dim"] * kv_element
        return sum(int(entry["size"]) for entry in self.files.values()) + kv

    def require_runtime(self, runtime_version: str = __version__) -> None:
        if parse_version(runtime_version) < parse_version(self.min_runtime_version):
            raise EngineFormatError(
                f"engine {self.engine_id} needs edgellm >= {self.min_runtime_version}, this is {runtime_version}; "
                "upgrade edgellm on this device"
            )

    def require_target(self, device_sm: str, cpu_runs_any: bool = True) -> None:
        """device_sm: '8.7' for a GPU, 'cpu' for the CPU path.

        `edgellm run --device cpu` is the reference path and runs any engine (cpu_runs_any);
        a device that installs updates is stricter: a CPU-only host takes only engines built
        for `cpu`, so what it serves is what the fleet manager meant for it.
        """
        device_sm = normalize_sm(device_sm)
        if device_sm == CPU_TARGET:
            if cpu_runs_any or CPU_TARGET in self.target_sms:
                return
            raise DeviceMismatchError(
                f"engine {self.engine_id} was built for SM {', '.join(self.target_sms)} but this device has no GPU; "
                "build it with --target-sm cpu for CPU-only devices"
            )
        if device_sm not in self.target_sms:
            raise DeviceMismatchError(
                f"engine {self.engine_id} was built for SM {', '.join(self.target_sms)} but this GPU is SM "
                f"{device_sm}; rebuild it with --target-sm {device_sm} (or a profile for this device class)"
            )


def is_count(value: Any) -> bool:
    """A non-negative int (not a bool): sizes, offsets, dimensions in engine metadata."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _check_chunks(where: str, rel: str, entry: dict[str, Any]) -> None:
    """Chunk hashes are optional (engines built before them have none) but, when present, complete."""
    chunk_size, chunks = entry.get("chunk_size"), entry.get("chunk_sha256")
    if chunk_size is None and chunks is None:
        return
    if not is_count(chunk_size) or not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise EngineFormatError(f"{where}: entry for {rel!r} has chunk_size {chunk_size!r}, expected a byte count in "
                                f"1..{MAX_CHUNK_SIZE}; the manifest is damaged, rebuild the engine")
    expected = -(-entry["size"] // chunk_size)
    if not isinstance(chunks, list) or len(chunks) != expected or not all(_is_sha256(c) for c in chunks):
        found = f"{len(chunks)} entries" if isinstance(chunks, list) else repr(type(chunks).__name__)
        raise EngineFormatError(
            f"{where}: entry for {rel!r} needs chunk_sha256 as {expected} sha256 hex digests ({entry['size']} bytes in "
            f"chunks of {chunk_size}), found {found}; the manifest is damaged, rebuild the engine"
        )


def check_relative_path(rel: str) -> None:
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or rel != str(p) or rel in ("", "."):
        raise EngineFormatError(f"engine file name {rel!r} is not a plain relative path")


def describe_files(engine_dir: Path, names: list[str], chunk_size: int = CHUNK_SIZE) -> dict[str, dict[str, Any]]:
    """The manifest's `files`: size, whole-file sha256 (bundles and older runtimes use it) and
    the sha256 of each chunk_size piece (parallel verification; the last piece is shorter)."""
    files = {}
    with ThreadPoolExecutor(hash_threads()) as pool:
        for rel in sorted(names):
            path = Path(engine_dir) / rel
            size = path.stat().st_size
            with open(path, "rb") as f:
                whole = pool.submit(sha256_file, path)  # sequential by nature: runs beside the chunks
                chunks = [pool.submit(hash_range, f.fileno(), *span) for span in chunk_spans(size, chunk_size)]
                files[rel] = {"sha256": whole.result(), "size": size, "chunk_size": chunk_size,
                              "chunk_sha256": [c.result() for c in chunks]}
    return files


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def hash_threads() -> int:
    """Threads for hashing: the cores this process may run on, at most MAX_HASH_THREADS
    (beyond that page-cache reads, not hashing, set the pace)."""
    return max(1, min(MAX_HASH_THREADS, usable_cores()))


def chunk_spans(size: int, chunk_size: int) -> list[tuple[int, int]]:
    """[start, end) byte ranges of consecutive chunks covering `size` bytes."""
    return [(start, min(start + chunk_size, size)) for start in range(0, size, chunk_size)]


def read_into(fd: int, buf: memoryview, offset: int) -> int:
    """Fill buf from fd at offset (positional, so threads share one fd); returns the bytes
    read, fewer than len(buf) only at end of file."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def hash_range(fd: int, start: int, end: int) -> str:
    """sha256 of bytes [start, end) of fd, or of fewer bytes if the file ends sooner (a short
    file then fails its size check or the hash). Reads in small pieces so that many threads
    hashing at once need little memory; hashlib drops the GIL while it hashes each piece."""
    h = hashlib.sha256()
    buf = memoryview(bytearray(min(_HASH_CHUNK, max(end - start, 0))))
    offset = start
    while offset < end:
        n = read_into(fd, buf[: min(len(buf), end - offset)], offset)
        if n == 0:
            break
        h.update(buf[:n])
        offset += n
    return h.hexdigest()


def read_manifest(engine_dir: Path) -> Manifest:
    path = Path(engine_dir) / MANIFEST_NAME
    if not path.is_file():
        raise EngineFormatError(f"{engine_dir} is not an engine: {MANIFEST_NAME} not found. Build one with `edgellm build`.")
    return Manifest.from_json(path.read_text(), where=str(path))


def write_manifest(engine_dir: Path, manifest: Manifest) -> None:
    tmp = Path(engine_dir) / (MANIFEST_NAME + ".tmp")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, Path(engine_dir) / MANIFEST_NAME)


def missing_file_error(engine_dir: Path, rel: str) -> EngineFormatError:
    return EngineFormatError(f"engine file {rel} listed in the manifest is missing from {engine_dir}; re-push or rebuild the engine")


def size_error(rel: str, size: int, expected: int) -> EngineFormatError:
    return EngineFormatError(
        f"engine file {rel} is {size} bytes, the manifest says {expected}: it was modified or truncated; re-push or rebuild the engine"
    )


def hash_error(rel: str, digest: str, expected: str, span: tuple[int, int] | None = None) -> EngineFormatError:
    where = "" if span is None else f" in bytes {span[0]}..{span[1] - 1}"
    return EngineFormatError(
        f"engine file {rel} has sha256 {digest[:16]}...{where}, the manifest says {expected[:16]}...: it was modified; "
        "re-push or rebuild the engine"
    )


def open_listed_file(engine_dir: Path, rel: str, entry: dict[str, Any]) -> int:
    """A read-only fd for a listed file, refusing a missing file, a symlink or a size other
    than the manifest's. The size is that of the opened file, the one that will be read."""
    path = Path(engine_dir) / rel
    if not path.is_file() or path.is_symlink():
        raise missing_file_error(Path(engine_dir), rel)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise EngineFormatError(f"engine file {rel} cannot be opened ({e.strerror}); re-push or rebuild the engine") from None
    size = os.fstat(fd).st_size
    if size != entry["size"]:
        os.close(fd)
        raise size_error(rel, size, entry["size"])
    return fd


def verify_files(engine_dir: Path, manifest: Manifest, names: Iterable[str] | None = None) -> None:
    """Every listed file (or those of `names`) exists with the recorded size and sha256; nothing else is loaded.

    Files with chunk hashes are checked chunk by chunk on several threads; older manifests
    have only the whole-file sha256, checked in one sequential pass per file.
    """
    rels = list(manifest.files) if names is None else list(names)
    fds: list[int] = []
    jobs = []  # (future, rel, expected sha256, span or None for the whole file), in file order
    with ThreadPoolExecutor(hash_threads()) as pool:
        try:
            for rel in rels:  # the cheap checks first, for every file
                fds.append(open_listed_file(engine_dir, rel, manifest.files[rel]))
            for rel, fd in zip(rels, fds):
                entry = manifest.files[rel]
                if "chunk_sha256" in entry:
                    for span, expected in zip(chunk_spans(entry["size"], entry["chunk_size"]), entry["chunk_sha256"]):
                        jobs.append((pool.submit(hash_range, fd, *span), rel, expected, span))
                else:
                    jobs.append((pool.submit(hash_range, fd, 0, entry["size"]), rel, entry["sha256"], None))
            for future, rel, expected, span in jobs:
                digest = future.result()
                if digest != expected:
                    raise hash_error(rel, digest, expected, span)
        finally:
            for future, *_ in jobs:
                future.cancel()  # after a mismatch, do not hash the rest
            pool.shutdown(wait=True)  # no thread may still read an fd closed below
            for fd in fds:
                os.close(fd)
