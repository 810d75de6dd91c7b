"""The builder: Hugging Face checkpoint -> engine directory (manifest + safetensors + tokenizer).

Steps: read config and tokenizer -> load and fuse weights -> (INT4) calibrate with AWQ and
quantize -> write everything into a staging directory (INT4: with the GPU kernels compiled for
each target SM, where this host has NVRTC) -> hash every file into the manifest -> rename the
staging directory into place, so a half-written engine never appears under the requested name.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from edgellm import __version__
from edgellm.engine import quant as q
from edgellm.engine.checkpoint import load_hf_weights
from edgellm.engine.config import ModelConfig
from edgellm.engine.linear import dense_linear
from edgellm.engine.manifest import CPU_TARGET, Manifest, describe_files, normalize_sm, write_manifest
from edgellm.engine.model import Transformer
from edgellm.engine.weights import WEIGHTS_NAME
from edgellm.errors import ConfigError

DEFAULT_CALIBRATION = Path(__file__).parent / "data" / "demo_corpus.txt"
MIN_RUNTIME_VERSION = "0.1.0"
QUANT_CHOICES = ("int4-awq", "int4-rtn", "fp16")
KV_DTYPES = ("fp16",)


@dataclasses.dataclass
class BuildOptions:
    quant: str = "int4-awq"
    group_size: int = 128
    kv_dtype: str = "fp16"
    max_batch: int = 4
    max_seq_len: int = 2048
    target_sms: list[str] = dataclasses.field(default_factory=list)
    calib_path: Path | None = None  # None: the built-in text (DEFAULT_CALIBRATION)
    calib_samples: int = 32
    calib_seq_len: int = 256
    engine_id: str | None = None

    def validate(self, config: ModelConfig) -> None:
        if self.quant not in QUANT_CHOICES:
            raise ConfigError(f"--quant {self.quant!r} is not one of {', '.join(QUANT_CHOICES)}")
        if self.kv_dtype not in KV_DTYPES:
            raise ConfigError(f"--kv-dtype {self.kv_dtype!r} is not supported; engines use {', '.join(KV_DTYPES)}")
        if not 1 <= self.max_batch <= 64:
            raise ConfigError(f"--max-batch must be between 1 and 64, got {self.max_batch}")
        if not 16 <= self.max_seq_len <= config.max_position_embeddings:
            raise ConfigError(
                f"--max-seq-len must be between 16 and the model's max_position_embeddings "
                f"({config.max_position_embeddings}), got {self.max_seq_len}"
            )
        if not self.target_sms:
            raise ConfigError(
                "no --target-sm given and no GPU on this machine to take it from; pass e.g. "
                "--target-sm 8.7 (Jetson Orin), 8.9 (L40S), 9.0 (H100) or cpu"
            )
        self.target_sms = sorted({normalize_sm(s) for s in self.target_sms})
        if self.quant != "fp16":
            for name, k in (("attention.wqkv", config.hidden_size), ("attention.wo", config.q_size),
                            ("feed_forward.w2", config.intermediate_size)):
                q.check_group_size(k, self.group_size, name)


def default_target_sms() -> list[str]:
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return [f"{major}.{minor}"]
    return []


def calibration_ids(tokenizer, path: Path | None, samples: int, seq_len: int) -> torch.Tensor:
    path = Path(path) if path else DEFAULT_CALIBRATION
    if not path.is_file():
        raise ConfigError(f"calibration text {path} not found; pass --calib FILE with plain text")
    ids = tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"), add_bos=False)
    if len(ids) < seq_len:
        raise ConfigError(f"calibration text {path} has {len(ids)} tokens; at least {seq_len} are needed")
    # Windows spread evenly over the text; short texts are reused with overlap rather than padded.
    stride = max(1, (len(ids) - seq_len) // max(1, samples - 1))
    rows = [ids[i * stride:i * stride + seq_len] for i in range(samples) if i * stride + seq_len <= len(ids)]
    return torch.tensor(rows, dtype=torch.long)


def build_engine(hf_dir: Path, out_dir: Path, options: BuildOptions, progress: Callable[[str], None] = print) -> Manifest:
    from edgellm.engine.tokenizer import Tokenizer

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir} already exists and is not empty; choose a new output directory or remove it")
    config, hf = ModelConfig.from_hf_dir(hf_dir)
    config.check_sliding_window(hf, options.max_seq_len)
    options.validate(config)
    tokenizer = Tokenizer.from_dir(hf_dir)
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}")

    weights = load_hf_weights(hf_dir, config, torch.float32, progress)
    model = Transformer(config, lambda name, i, o, bias: dense_linear(i, o, bias), options.max_seq_len)
    model.load_state_dict(weights, strict=True)
    del weights
    tensors: dict[str, torch.Tensor] = {}
    quantization = {"scheme": options.quant, "lm_head": "fp16", "embeddings": "fp16"}
    if options.quant != "fp16":
        from edgellm.engine.awq import quantize_model

        calib = calibration_ids(tokenizer, options.calib_path, options.calib_samples, options.calib_seq_len)
        progress(f"calibrating on {calib.shape[0]} x {calib.shape[1]} tokens from {options.calib_path or 'the built-in text'}")
        method = "awq" if options.quant == "int4-awq" else "rtn"
        with torch.no_grad():
            quantized = quantize_model(model, calib, options.group_size, method=method, progress=progress)
        for name, qw in quantized.items():
            tensors[f"{name}.qweight"] = qw.qweight.contiguous()
            tensors[f"{name}.scales"] = qw.scales.contiguous()
            tensors[f"{name}.zeros"] = qw.zeros.contiguous()
        quantization.update(group_size=options.group_size, weight_layout=q.WEIGHT_LAYOUT, bits=4, zero_point=True)
    quantized_linears = {name.rsplit(".", 1)[0] for name in tensors}
    for name, value in model.state_dict().items():
        if name.removesuffix(".weight") not in quantized_linears:  # norms, embeddings, biases, LM head
            tensors[name] = value.detach().to(torch.float16).contiguous()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        progress(f"writing {WEIGHTS_NAME} ({sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6:.1f} MB)")
        from safetensors.torch import save_file

        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "edgellm"})
        for name in tokenizer.files:
            shutil.copy2(hf_dir / name, staging / name)
        kernel_files = write_engine_kernels(staging, options.target_sms, progress) if options.quant != "fp16" else []
        manifest = Manifest(
            engine_id=options.engine_id or _default_engine_id(hf_dir, options),
            model={"architecture": config.architecture, "config": config.to_dict(), "source": hf_dir.name},
            quantization=quantization,
            kv_dtype=options.kv_dtype,
            max_batch=options.max_batch,
            max_seq_len=options.max_seq_len,
            target_sms=options.target_sms,
            builder={"name": "edgellm", "version": __version__},
            min_runtime_version=MIN_RUNTIME_VERSION,
            files=describe_files(staging, [WEIGHTS_NAME, *tokenizer.files, *kernel_files]),
            tokenizer={
                "files": list(tokenizer.files),
                "bos_id": tokenizer.bos_id,
                "eos_ids": sorted(set(tokenizer.eos_ids) | set(config.eos_token_ids)),
                "chat_template": tokenizer.chat_template is not None,
            },
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        write_manifest(staging, manifest)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    progress(f"engine {manifest.engine_id} written to {out_dir} (targets: {', '.join(manifest.target_sms)})")
    return manifest


def write_engine_kernels(engine_dir: Path, target_sms: list[str], progress: Callable[[str], None] = print) -> list[str]:
    """The INT4 tensor-core kernels compiled for each CUDA target SM (8.0 and newer) into
    engine_dir/kernels, with NVRTC on this host (no GPU needed): a device then loads them instead
    of compiling them at its first start. Their paths relative to engine_dir, for the manifest
    (which hashes them like every file: the engine's signature covers them), and a device without
    NVRTC runs them too. Without NVRTC here the engine is still complete: each device with NVRTC
    compiles the kernels once and caches them; one without runs Triton's slower kernel."""
    from edgellm.engine.kernels import nvrtc_usable, w4a16_cuda

    sms = [sm for sm in target_sms if sm != CPU_TARGET]
    if not sms:
        return []
    usable, why = nvrtc_usable()
    if not usable:
        progress(f"compiled GPU kernels not included ({why}); each device compiles them at its first start, then "
                 "caches them, where it has NVRTC (one without runs the slower Triton kernel)")
        return []
    files = []
    for sm in sms:
        major, minor = (int(part) for part in sm.split("."))
        if major < 8:
            progress(f"no tensor-core INT4 kernels for SM {sm} (they need SM 8.0 or newer)")
            continue
        progress(f"compiling the INT4 GPU kernels for SM {sm} with NVRTC (shipped in the engine)")
        number = 10 * major + minor
        try:
            cubin = w4a16_cuda.compile_cubin(number)
        except RuntimeError as e:  # e.g. this host's NVRTC predates the SM: a device's own may not
            progress(f"could not compile the INT4 GPU kernels for SM {sm} here ({str(e).splitlines()[0]}); "
                     "devices of that SM compile them at their first start")
            continue
        rel = f"{w4a16_cuda.ENGINE_KERNELS_DIR}/{w4a16_cuda.cubin_name(number)}"
        (engine_dir / rel).parent.mkdir(exist_ok=True)
        (engine_dir / rel).write_bytes(cubin)
        files.append(rel)
    return files


def _default_engine_id(hf_dir: Path, options: BuildOptions) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", hf_dir.resolve().name).strip("-") or "model"
    suffix = options.quant if options.quant == "fp16" else f"{options.quant}-g{options.group_size}"
    return f"{base}-{suffix}"

