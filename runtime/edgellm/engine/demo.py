"""The demo engine: a tiny randomly initialised Llama, built offline with no download.

Its output text is meaningless (the weights are random); it exists so that the whole
path -- build, verify, load, serve, stream -- runs on a fresh machine in seconds.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

import torch

from edgellm.engine.builder import BuildOptions, build_engine, default_target_sms
from edgellm.engine.manifest import CPU_TARGET, Manifest

DEMO_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float16",
}


def write_random_checkpoint(hf_dir: Path, config: dict, seed: int = 0, std: float = 0.02) -> None:
    """A Hugging Face-layout checkpoint (config.json + model.safetensors) with random weights."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * hd

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * std).half()

    tensors = {"model.embed_tokens.weight": rand(v, h), "model.norm.weight": torch.ones(h).half()}
    if not config.get("tie_word_embeddings"):
        tensors["lm_head.weight"] = rand(v, h)
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        tensors.update({
            p + "input_layernorm.weight": torch.ones(h).half(),
            p + "post_attention_layernorm.weight": torch.ones(h).half(),
            p + "self_attn.q_proj.weight": rand(h, h),
            p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h),
            p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(i, h),
            p + "mlp.up_proj.weight": rand(i, h),
            p + "mlp.down_proj.weight": rand(h, i),
        })
    hf_dir.mkdir(parents=True, exist_ok=True)
    (hf_dir / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})


def build_demo_engine(out_dir: Path, max_batch: int = 4, max_seq_len: int = 512, progress: Callable[[str], None] = print) -> Manifest:
    from edgellm.engine.demo_tokenizer import train_demo_tokenizer

    with tempfile.TemporaryDirectory(prefix="edgellm-demo-") as tmp:
        hf_dir = Path(tmp) / "demo-llama"
        progress("writing a random tiny Llama checkpoint (4 layers, hidden 256, vocab 512)")
        write_random_checkpoint(hf_dir, DEMO_CONFIG)
        progress("training the demo sentencepiece tokenizer on the shipped text")
        train_demo_tokenizer(hf_dir, vocab_size=DEMO_CONFIG["vocab_size"])
        options = BuildOptions(
            quant="int4-awq", group_size=128, max_batch=max_batch, max_seq_len=max_seq_len,
            target_sms=[CPU_TARGET, *default_target_sms()], calib_samples=16, calib_seq_len=128,
            engine_id="demo-llama-int4-awq",
        )
        return build_engine(hf_dir, out_dir, options, progress)
