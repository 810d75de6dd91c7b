"""Tiny randomly initialised Hugging Face checkpoints of every supported architecture."""

from pathlib import Path

import torch

VOCAB = 512  # the demo tokenizer's size

ARCHITECTURES = {
    # GQA, untied embeddings
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2)),
    # Llama 3.1-style rope scaling (short original context so the scaling matters at test lengths), tied embeddings
    "llama3-rope-tied": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=None)),
    # q/k/v bias
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2)),
}


def make_checkpoint(kind: str, out: Path, seed: int = 0, hidden: int = 128, layers: int = 2,
                    intermediate: int = 256, init_std: float = 0.08):
    """Saves a random model (weights rounded to fp16, so an fp16 engine holds them exactly)
    with safetensors; returns the float32 HF model for reference."""
    import transformers

    config_cls, model_cls, extra = ARCHITECTURES[kind]
    config = getattr(transformers, config_cls)(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, initializer_range=init_std, **extra,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # HF initialises norms to 1: make them matter
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            p.copy_(p.half().float())
        if kind == "qwen2":  # HF initialises biases to zero: make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.copy_((torch.randn_like(proj.bias) * 0.5).half().float())
    model.save_pretrained(out, safe_serialization=True)
    return model
