"""Engines with random weights at real model shapes, for benchmarks.

The weights are random INT4 in the engine's real packed layout (the same bytes and kernels
as a calibrated AWQ engine), so speed is measured honestly while the text is meaningless.
Running AWQ on an 8B model needs the real checkpoint and minutes of GPU time; speed does
not depend on the values.
"""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path

import torch

from edgellm import __version__
from edgellm.engine.builder import MIN_RUNTIME_VERSION, write_engine_kernels
from edgellm.engine.config import ModelConfig
from edgellm.engine.manifest import Manifest, describe_files, write_manifest
from edgellm.engine.quant import WEIGHT_LAYOUT
from edgellm.engine.weights import WEIGHTS_NAME

# Published shapes (config.json of meta-llama/Llama-3.2-1B and Llama-3.1-8B).
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SHAPES = {
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                         num_kv_heads=8, head_dim=64, tie_word_embeddings=True,
                         rope_scaling=dict(LLAMA3_ROPE, factor=32.0)),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                         num_kv_heads=8, head_dim=128, tie_word_embeddings=False,
                         rope_scaling=dict(LLAMA3_ROPE, factor=8.0)),
}


def shape_config(shape: str) -> ModelConfig:
    s = SHAPES[shape]
    return ModelConfig(
        architecture="LlamaForCausalLM", rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
        attention_bias=False, hidden_act="silu", bos_token_id=1, eos_token_ids=(2,), **s,
    )


def random_int4_weights(config: ModelConfig, group_size: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    c = config
    h = c.hidden_size

    def fp16(*shape, std=0.02):
        return (torch.randn(*shape, generator=g, device=device) * std).half()

    def int4(prefix: str, out_f: int, in_f: int) -> dict[str, torch.Tensor]:
        groups = in_f // group_size
        return {
            f"{prefix}.qweight": torch.randint(-2**31, 2**31 - 1, (out_f, in_f // 8), generator=g, device=device, dtype=torch.int64).to(torch.int32),
            f"{prefix}.scales": (torch.rand(out_f, groups, generator=g, device=device) * 0.004 + 0.001).half(),
            f"{prefix}.zeros": torch.full((out_f, groups), 8.0, device=device).half(),
        }

    t = {"tok_embeddings.weight": fp16(c.vocab_size, h), "norm.weight": torch.ones(h, device=device).half()}
    if not c.tie_word_embeddings:
        t["output.weight"] = fp16(c.vocab_size, h)
    for i in range(c.num_layers):
        p = f"layers.{i}."
        t[p + "attention_norm.weight"] = torch.ones(h, device=device).half()
        t[p + "ffn_norm.weight"] = torch.ones(h, device=device).half()
        t.update(int4(p + "attention.wqkv", c.q_size + 2 * c.kv_size, h))
        t.update(int4(p + "attention.wo", h, c.q_size))
        t.update(int4(p + "feed_forward.w13", 2 * c.intermediate_size, h))
        t.update(int4(p + "feed_forward.w2", h, c.intermediate_size))
    return t


def write_random_engine(out_dir: Path, shape: str, tokenizer_dir: Path, max_batch: int, max_seq_len: int,
                        target_sms: list[str], group_size: int = 128, device: str = "cpu") -> Manifest:
    from safetensors.torch import save_file

    from edgellm.engine.tokenizer import Tokenizer

    config = shape_config(shape)
    out_dir.mkdir(parents=True)
    tensors = {k: v.cpu().contiguous() for k, v in random_int4_weights(config, group_size, device).items()}
    save_file(tensors, str(out_dir / WEIGHTS_NAME), metadata={"format": "edgellm"})
    del tensors
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    for name in tokenizer.files:
        shutil.copy2(tokenizer_dir / name, out_dir / name)
    kernel_files = write_engine_kernels(out_dir, target_sms, progress=lambda _msg: None)
    manifest = Manifest(
        engine_id=f"{shape}-random-int4-g{group_size}",
        model={"architecture": config.architecture, "config": config.to_dict(), "source": "random weights (benchmark)"},
        quantization={"scheme": "int4-awq", "group_size": group_size, "weight_layout": WEIGHT_LAYOUT, "bits": 4,
                      "zero_point": True, "lm_head": "fp16", "embeddings": "fp16"},
        kv_dtype="fp16", max_batch=max_batch, max_seq_len=max_seq_len, target_sms=target_sms,
        builder={"name": "edgellm", "version": __version__}, min_runtime_version=MIN_RUNTIME_VERSION,
        files=describe_files(out_dir, [WEIGHTS_NAME, *tokenizer.files, *kernel_files]),
        tokenizer={"files": list(tokenizer.files), "bos_id": tokenizer.bos_id, "eos_ids": [2], "chat_template": False},
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    write_manifest(out_dir, manifest)
    return manifest
