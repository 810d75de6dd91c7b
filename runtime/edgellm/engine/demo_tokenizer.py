"""A tiny sentencepiece tokenizer trained on a bundled corpus, for tests and demos.

Real checkpoints are gigabytes; tests and the `edgellm` demo commands need a tokenizer that
can be made offline in a second and behaves like Llama's: BPE, byte fallback (so any text,
emoji and CJK included, encodes), identity normalization, unk/bos/eos = 0/1/2.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

CORPUS_PATH = Path(__file__).parent / "data" / "demo_corpus.txt"

# Zephyr-like turns. The template emits BOS itself, so encode_chat must not add a second one.
DEMO_CHAT_TEMPLATE = r"""{{- bos_token -}}
{%- for message in messages -%}
  {%- if message['role'] not in ('system', 'user', 'assistant') -%}
    {{- raise_exception("chat roles must be system, user or assistant, got " ~ message['role']) -}}
  {%- endif -%}
  {{- '<|' ~ message['role'] ~ '|>\n' ~ (message['content'] | trim) -}}
  {%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- endif -%}
  {{- '\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}
"""


def train_demo_tokenizer(out_dir: Path, vocab_size: int = 512) -> None:
    """Write tokenizer.model and tokenizer_config.json into out_dir (created if missing)."""
    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [line for line in CORPUS_PATH.read_text(encoding="utf-8").splitlines() if line.strip()]
    model = io.BytesIO()
    # One thread, no sampling or shuffling: the same corpus always gives the same model,
    # so test expectations and engine hashes built from it are stable.
    if hasattr(spm, "set_random_generator_seed"):
        spm.set_random_generator_seed(1234)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=0.9995,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "chat_template": DEMO_CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
