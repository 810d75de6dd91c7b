"""Reading Hugging Face checkpoints: safetensors shards and the weight-name table.

The name table is the one place that knows Hugging Face names; everything after it speaks
the engine's names (fused q|k|v and gate|up, see model.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from edgellm.engine.config import ModelConfig
from edgellm.errors import ConfigError

INDEX_NAME = "model.safetensors.index.json"

# engine name -> Hugging Face names concatenated along the output dimension
_GLOBAL = {
    "tok_embeddings.weight": ["model.embed_tokens.weight"],
    "norm.weight": ["model.norm.weight"],
}
_PER_LAYER = {
    "attention_norm.weight": ["input_layernorm.weight"],
    "attention.wqkv.weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
    "attention.wqkv.bias": ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"],
    "attention.wo.weight": ["self_attn.o_proj.weight"],
    "ffn_norm.weight": ["post_attention_layernorm.weight"],
    "feed_forward.w13.weight": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
    "feed_forward.w2.weight": ["mlp.down_proj.weight"],
}


def weight_name_table(config: ModelConfig) -> dict[str, list[str]]:
    table = dict(_GLOBAL)
    if not config.tie_word_embeddings:
        table["output.weight"] = ["lm_head.weight"]
    for i in range(config.num_layers):
        for engine_name, hf_names in _PER_LAYER.items():
            if engine_name.endswith(".bias") and not config.attention_bias:
                continue
            table[f"layers.{i}.{engine_name}"] = [f"model.layers.{i}.{n}" for n in hf_names]
    return table


def safetensors_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ConfigError(f"{index} is not a valid safetensors index ({e})") from None
        files = sorted({hf_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ConfigError(f"{index} names shards that are not in {hf_dir}: {', '.join(missing)}; download them")
        return files
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError(
            f"no *.safetensors in {hf_dir}: edgellm reads safetensors checkpoints only "
            "(never pickled .bin files); convert the checkpoint to safetensors first"
        )
    return files


def load_hf_weights(
    hf_dir: Path, config: ModelConfig, dtype: torch.dtype = torch.float32, progress: Callable[[str], None] = print
) -> dict[str, torch.Tensor]:
    """All weights under engine names, fused, in `dtype`."""
    from safetensors import SafetensorError, safe_open

    hf_dir = Path(hf_dir)
    tensors: dict[str, torch.Tensor] = {}
    files = safetensors_files(hf_dir)
    for n, path in enumerate(files, 1):
        progress(f"loading shard {n}/{len(files)}: {path.name}")
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    tensors[name] = f.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ConfigError(f"{path} is not a readable safetensors file ({e}); re-download it") from None

    engine: dict[str, torch.Tensor] = {}
    for engine_name, hf_names in weight_name_table(config).items():
        missing = [n for n in hf_names if n not in tensors]
        if missing:
            raise ConfigError(
                f"checkpoint in {hf_dir} lacks {missing[0]}"
                + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                + f"; expected a complete {config.architecture} checkpoint"
            )
        parts = [tensors.pop(n).to(dtype) for n in hf_names]
        engine[engine_name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    _check_shapes(engine, config)
    return engine


def _check_shapes(weights: dict[str, torch.Tensor], c: ModelConfig) -> None:
    expected = {
        "tok_embeddings.weight": (c.vocab_size, c.hidden_size),
        "layers.0.attention.wqkv.weight": (c.q_size + 2 * c.kv_size, c.hidden_size),
        "layers.0.feed_forward.w13.weight": (2 * c.intermediate_size, c.hidden_size),
        "layers.0.feed_forward.w2.weight": (c.hidden_size, c.intermediate_size),
    }
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise ConfigError(f"{name} has shape {tuple(weights[name].shape)}, config.json implies {shape}")
