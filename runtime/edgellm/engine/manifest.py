"""The engine manifest: the one reader, writer and checker of `manifest.json`.

Torch-free on purpose: the updater (ota/) verifies engines before any model code runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

from edgellm import __version__
from edgellm.errors import DeviceMismatchError, EngineFormatError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CPU_TARGET = "cpu"
QUANT_SCHEMES = ("int4-awq", "int4-rtn", "fp16")
_HASH_CHUNK = 1 << 20


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
    files: dict[str, dict[str, Any]]  # relative path -> {"sha256", "size"}
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
            if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("size"), int):
                raise EngineFormatError(f"{where}: entry for {rel!r} needs sha256 and size")
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


def check_relative_path(rel: str) -> None:
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or rel != str(p) or rel in ("", "."):
        raise EngineFormatError(f"engine file name {rel!r} is not a plain relative path")


def describe_files(engine_dir: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {rel: {"sha256": sha256_file(engine_dir / rel), "size": (engine_dir / rel).stat().st_size} for rel in sorted(names)}


def read_manifest(engine_dir: Path) -> Manifest:
    path = Path(engine_dir) / MANIFEST_NAME
    if not path.is_file():
        raise EngineFormatError(f"{engine_dir} is not an engine: {MANIFEST_NAME} not found. Build one with `edgellm build`.")
    return Manifest.from_json(path.read_text(), where=str(path))


def write_manifest(engine_dir: Path, manifest: Manifest) -> None:
    tmp = Path(engine_dir) / (MANIFEST_NAME + ".tmp")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, Path(engine_dir) / MANIFEST_NAME)


def verify_files(engine_dir: Path, manifest: Manifest) -> None:
    """Every listed file exists with the recorded size and sha256; nothing else is loaded."""
    engine_dir = Path(engine_dir)
    for rel, entry in manifest.files.items():
        path = engine_dir / rel
        if not path.is_file() or path.is_symlink():
            raise EngineFormatError(f"engine file {rel} listed in the manifest is missing from {engine_dir}; re-push or rebuild the engine")
        size = path.stat().st_size
        if size != entry["size"]:
            raise EngineFormatError(
                f"engine file {rel} is {size} bytes, the manifest says {entry['size']}: it was modified or truncated; re-push or rebuild the engine"
            )
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise EngineFormatError(
                f"engine file {rel} has sha256 {digest[:16]}..., the manifest says {entry['sha256'][:16]}...: it was modified; re-push or rebuild the engine"
            )
