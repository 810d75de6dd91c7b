"""Model configuration: the subset of a Hugging Face config.json that the engine runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from edgellm.errors import ConfigError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_SCALING = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2)
    hidden_act: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = fields - d.keys()
        if missing:
            raise ConfigError(f"model config is missing {sorted(missing)}; rebuild the engine")
        values = {k: d[k] for k in fields}
        values["eos_token_ids"] = tuple(values["eos_token_ids"])
        return cls(**values)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Read a Hugging Face config.json dict; refuse what the engine cannot run exactly."""
        archs = hf.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unsupported architecture {arch!r}: edgellm builds {', '.join(SUPPORTED_ARCHITECTURES)}. "
                "Pick a checkpoint of one of those families."
            )
        hidden = _require(hf, "hidden_size")
        heads = _require(hf, "num_attention_heads")
        kv_heads = hf.get("num_key_value_heads") or heads
        head_dim = hf.get("head_dim") or hidden // heads
        if heads % kv_heads:
            raise ConfigError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act {act!r} is not supported: edgellm runs SwiGLU (silu) MLPs")

        # Older configs say rope_theta + rope_scaling; transformers 5 writes rope_parameters.
        rope_parameters = hf.get("rope_parameters") or {}
        rope_theta = hf.get("rope_theta", rope_parameters.get("rope_theta", 10000.0))
        rope_scaling = hf.get("rope_scaling") or {k: v for k, v in rope_parameters.items() if k != "rope_theta"} or None
        if rope_scaling is not None:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if kind not in SUPPORTED_ROPE_SCALING:
                raise ConfigError(
                    f"rope_scaling type {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_SCALING)}"
                )
            rope_scaling = dict(rope_scaling, rope_type=kind)
            rope_scaling.pop("type", None)
            rope_scaling.pop("rope_theta", None)
            if kind == "default":
                rope_scaling = None

        if arch == "Qwen2ForCausalLM":
            bias = True
            if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or []):
                raise ConfigError("Qwen2 checkpoints with use_sliding_window=true are not supported")
        else:
            bias = bool(hf.get("attention_bias", False))
        if hf.get("mlp_bias"):
            raise ConfigError("checkpoints with mlp_bias=true are not supported")

        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            architecture=arch,
            vocab_size=_require(hf, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_require(hf, "intermediate_size"),
            num_layers=_require(hf, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bias,
            hidden_act=act,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_hf_dir(cls, hf_dir: Path) -> tuple["ModelConfig", dict[str, Any]]:
        path = Path(hf_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path} not found: expected a Hugging Face checkpoint directory with config.json")
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e})") from None
        return cls.from_hf(hf), hf

    def check_sliding_window(self, hf: dict[str, Any], max_seq_len: int) -> None:
        """Mistral's sliding window only changes attention beyond the window length."""
        window = hf.get("sliding_window")
        if self.architecture == "MistralForCausalLM" and window and max_seq_len > window:
            raise ConfigError(
                f"max sequence length {max_seq_len} exceeds the checkpoint's sliding_window {window}; "
                f"edgellm runs full attention, so build with --max-seq-len {window} or less"
            )


def _require(hf: dict[str, Any], key: str) -> Any:
    if key not in hf:
        raise ConfigError(f"config.json has no {key!r}: expected a Llama-family Hugging Face config")
    return hf[key]
