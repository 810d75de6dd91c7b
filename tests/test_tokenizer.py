"""Tokenizer, chat templates and streaming detokenization, against transformers as the reference.

Two real tokenizers are made here: the bundled sentencepiece demo tokenizer (Llama-like, byte
fallback) and a byte-level BPE trained with the `tokenizers` library into a tokenizer.json.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from edgellm.engine.demo_tokenizer import CORPUS_PATH, train_demo_tokenizer
from edgellm.engine.detokenizer import StreamDecoder
from edgellm.engine.tokenizer import Tokenizer
from edgellm.errors import ConfigError, RequestError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TEXTS = [
    "Hello world",
    "The café in Zürich serves a naïve crème brûlée for 4.50 francs.",
    "Trains 🚆➡️🏔️ and weather ☀️🌧️❄️ today 😀",
    "東京駅 and 北京 are far apart; 京 is in both.",
    "two  spaces\nand a newline\n\nthen\ttabs",
    "Prices: €4.50, £3.20, ¥500 at 21 °C, -12 degrees at 07:45",
    "ends with an emoji 👍",
    "x</s>y and <s> in the middle",
]

CHAT = [
    {"role": "system", "content": "Answer in one sentence."},
    {"role": "user", "content": "When does the train to Zürich leave? 🚆"},
    {"role": "assistant", "content": "At 6:12 from platform 4."},
    {"role": "user", "content": "And the café?"},
]


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sp")
    train_demo_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer.json whose post-processor adds BOS, with a ChatML template."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    d = tmp_path_factory.mktemp("hf")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin|>", "<|end|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS_PATH.read_text(encoding="utf-8").splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|begin|> $A", special_tokens=[("<|begin|>", 0)])
    tok.save(str(d / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin|>",
        "eos_token": "<|im_end|>",
        "clean_up_tokenization_spaces": False,
        "chat_template": CHATML,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 1]}))
    (d / "config.json").write_text(json.dumps({"eos_token_id": 1}))
    return d


@pytest.fixture(scope="module")
def sp_tok(sp_dir) -> Tokenizer:
    return Tokenizer.from_dir(sp_dir)


@pytest.fixture(scope="module")
def hf_tok(hf_dir) -> Tokenizer:
    return Tokenizer.from_dir(hf_dir)


@pytest.fixture(params=["sp", "hf"])
def tok(request) -> Tokenizer:
    return request.getfixturevalue(f"{request.param}_tok")


def _input_ids(out) -> list[int]:
    return list(out) if isinstance(out, list) else list(out["input_ids"])


# --- loading --------------------------------------------------------------------------------


def test_demo_tokenizer_is_reproducible(sp_dir, tmp_path):
    train_demo_tokenizer(tmp_path)
    assert (tmp_path / "tokenizer.model").read_bytes() == (sp_dir / "tokenizer.model").read_bytes()
    assert (tmp_path / "tokenizer_config.json").read_text() == (sp_dir / "tokenizer_config.json").read_text()
    assert 20_000 <= CORPUS_PATH.stat().st_size <= 40_000


def test_sentencepiece_properties(sp_tok):
    assert sp_tok.files == ["tokenizer.model", "tokenizer_config.json"]
    assert sp_tok.vocab_size == 512
    assert (sp_tok.bos_id, sp_tok.eos_ids, sp_tok.add_bos) == (1, [2], True)
    assert "<|assistant|>" in sp_tok.chat_template


def test_tokenizer_json_properties(hf_tok):
    assert hf_tok.files == ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    assert hf_tok.vocab_size == 600
    assert hf_tok.bos_id == 0
    assert hf_tok.eos_ids == [3, 1]  # tokenizer eos first, then generation_config and config.json, deduplicated
    assert hf_tok.add_bos  # the config is silent, the post-processor prepends BOS


@pytest.mark.parametrize("kind", ["sp", "hf"])
def test_files_are_enough_for_an_engine_dir(kind, request, tmp_path):
    src = request.getfixturevalue(f"{kind}_dir")
    original = Tokenizer.from_dir(src)
    for name in original.files:
        shutil.copy(src / name, tmp_path / name)
    copy = Tokenizer.from_dir(tmp_path)
    assert copy.files == original.files
    for text in TEXTS:
        assert copy.encode(text) == original.encode(text)
    assert copy.render_chat(CHAT) == original.render_chat(CHAT)
    # config.json is not a tokenizer file; its eos ids must already be elsewhere to survive
    assert set(copy.eos_ids) <= set(original.eos_ids)


def test_bare_tokenizer_json_takes_bos_from_its_post_processor(hf_dir, tmp_path):
    shutil.copy(hf_dir / "tokenizer.json", tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.add_bos, tok.eos_ids, tok.chat_template) == (0, True, [], None)
    assert tok.encode("Hello")[0] == 0


def test_add_bos_from_config_wins(hf_dir, tmp_path):
    for name in ("tokenizer.json", "generation_config.json"):
        shutil.copy(hf_dir / name, tmp_path / name)
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(config, add_bos_token=False)))
    tok = Tokenizer.from_dir(tmp_path)
    assert not tok.add_bos
    assert tok.encode("Hello")[0] != tok.bos_id
    assert tok.encode("Hello", add_bos=True)[0] == tok.bos_id


def test_chat_template_sources(sp_dir, tmp_path):
    shutil.copy(sp_dir / "tokenizer.model", tmp_path)
    config = json.loads((sp_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "tool_use", "template": "tools"},
        {"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}"},
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_dir(tmp_path).render_chat([{"role": "user", "content": "hi"}]) == "<s>hi"
    (tmp_path / "chat_template.jinja").write_text("[{{ messages | length }}]")  # the file wins, as in transformers
    tok = Tokenizer.from_dir(tmp_path)
    assert "chat_template.jinja" in tok.files
    assert tok.render_chat([{"role": "user", "content": "hi"}]) == "[1]"


# --- agreement with transformers ------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_reference_sp(sp_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(sp_dir))


@pytest.fixture(scope="module")
def hf_reference_json(hf_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(hf_dir))


def _compare_with_transformers(ours: Tokenizer, ref) -> None:
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.encode(text, add_bos=False) == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
        assert ours.decode(ids, skip_special=False) == ref.decode(ids, skip_special_tokens=False), text
    for generation_prompt in (True, False):
        assert ours.render_chat(CHAT, add_generation_prompt=generation_prompt) == ref.apply_chat_template(
            CHAT, add_generation_prompt=generation_prompt, tokenize=False
        )


def test_sentencepiece_matches_transformers(sp_tok, hf_reference_sp):
    _compare_with_transformers(sp_tok, hf_reference_sp)
    # The template emits BOS itself: the same ids as transformers, one BOS.
    ids = sp_tok.encode_chat(CHAT)
    assert ids == _input_ids(hf_reference_sp.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True))
    assert ids[:2] != [sp_tok.bos_id, sp_tok.bos_id] and ids[0] == sp_tok.bos_id
    assert ids.count(sp_tok.eos_ids[0]) == 1  # "</s>" after the assistant turn is the EOS token, not text


def test_tokenizer_json_matches_transformers(hf_tok, hf_reference_json):
    _compare_with_transformers(hf_tok, hf_reference_json)
    # The ChatML template does not emit BOS; encode_chat adds it (transformers would not).
    rendered = hf_reference_json.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert hf_tok.encode_chat(CHAT) == [hf_tok.bos_id] + hf_reference_json.encode(rendered, add_special_tokens=False)


def test_sentencepiece_leading_space_follows_sentencepiece(sp_dir, sp_tok):
    # transformers' converted tokenizer skips the dummy "▁" when the text already starts with a
    # space; the model was trained with sentencepiece itself, which does not, and we follow it.
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    for text in (" leading space", "  two leading", "\tTab"):
        assert sp_tok.encode(text, add_bos=False) == sp.encode(text)
        assert sp_tok.decode(sp_tok.encode(text)) == text


@pytest.mark.parametrize("legacy", [False, True])
def test_sentencepiece_legacy_prefix_after_special_tokens(sp_dir, tmp_path, legacy):
    import sentencepiece as spm

    shutil.copy(sp_dir / "tokenizer.model", tmp_path)
    config = json.loads((sp_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(config, legacy=legacy)))
    tok = Tokenizer.from_dir(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    after = tok.encode("<s>[INST] hi", add_bos=False)[1:]
    with_prefix = sp.encode("[INST] hi")
    assert with_prefix[0] == sp.piece_to_id("▁")
    assert after == (with_prefix if legacy else with_prefix[1:])
    transformers = pytest.importorskip("transformers")
    ref = transformers.LlamaTokenizer.from_pretrained(str(tmp_path))
    assert tok.encode("<s>[INST] hi", add_bos=False) == ref.encode("<s>[INST] hi", add_special_tokens=False)


def test_round_trips(tok):
    for text in TEXTS + ["", " ", "a", "\n", "🙂" * 5, " leading and trailing "]:
        assert tok.decode(tok.encode(text, add_bos=False), skip_special=False) == text
        if "<s>" not in text:
            assert tok.decode(tok.encode(text)) == text


def test_out_of_vocabulary_ids_decode_to_nothing(tok):
    ids = tok.encode("Hello world", add_bos=False)
    assert tok.decode(ids[:1] + [tok.vocab_size + 5, -1] + ids[1:]) == "Hello world"


# --- streaming ------------------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int], stop=()) -> tuple[list[str], str, StreamDecoder]:
    dec = StreamDecoder(tok, stop=stop)
    deltas = [dec.push(i) for i in ids]
    return deltas, dec.flush(), dec


def test_streaming_is_exact(tok):
    for text in TEXTS:
        # BOS, an EOS mid-stream and one at the end: skipped like decode() skips them
        ids = tok.encode(text) + [tok.eos_ids[0]] + tok.encode(text, add_bos=False) + [tok.eos_ids[0]]
        deltas, tail, dec = _stream(tok, ids)
        assert "".join(deltas) + tail == tok.decode(ids), text
        assert dec.text == tok.decode(ids)
        assert not dec.stopped
        for d in deltas + [tail]:
            assert "\ufffd" not in d, (text, deltas)


def test_streaming_holds_split_characters(sp_tok):
    ids = sp_tok.encode("go 😀 now", add_bos=False)
    byte_pieces = [i for i in ids if sp_tok.decode([i]) == "\ufffd"]
    assert len(byte_pieces) == 4  # the emoji is spelled as four byte-fallback tokens
    deltas, tail, _ = _stream(sp_tok, ids)
    assert deltas.count("") >= 3  # held until the fourth byte arrived
    assert "😀" in deltas


def test_streaming_keeps_spaces_mid_stream(sp_tok):
    ids = sp_tok.encode("the train to the airport", add_bos=False)
    deltas, tail, _ = _stream(sp_tok, ids)
    assert "".join(deltas) + tail == "the train to the airport"
    assert any(d.startswith(" ") for d in deltas)


@pytest.mark.parametrize("kind", ["sp", "hf"])
def test_streaming_window_stays_small(kind, request):
    tok = Tokenizer.from_dir(request.getfixturevalue(f"{kind}_dir"))
    ids = tok.encode(CORPUS_PATH.read_text(encoding="utf-8")[:6000], add_bos=False)
    expected = tok.decode(ids)
    windows = []
    real_decode = tok.decode

    def recording_decode(window, skip_special=True):
        windows.append(len(window))
        return real_decode(window, skip_special)

    tok.decode = recording_decode  # the real decode, with each window's length noted
    dec = StreamDecoder(tok)
    out = "".join(dec.push(i) for i in ids) + dec.flush()
    assert len(ids) > 1000
    assert out == expected
    assert max(windows) <= 16


def test_streaming_invalid_bytes_are_bounded_and_exact(sp_tok):
    lone = sp_tok._backend._sp.piece_to_id("<0xE2>")
    ids = sp_tok.encode("a", add_bos=False) + [lone] * 20 + sp_tok.encode("b", add_bos=False)
    deltas, tail, _ = _stream(sp_tok, ids)
    assert "".join(deltas) + tail == sp_tok.decode(ids)


# --- stop strings ---------------------------------------------------------------------------


def test_stop_string_split_across_tokens(tok):
    text = "The next train leaves at 6:12. Please stand back from the edge."
    ids = tok.encode(text, add_bos=False)
    assert all("Please" not in tok.decode([i]) for i in ids)  # no single token holds it
    deltas, tail, dec = _stream(tok, ids + tok.encode(" more", add_bos=False), stop=["Please"])
    assert dec.stopped
    assert "".join(deltas) + tail == "The next train leaves at 6:12. " == dec.text
    assert dec.push(ids[0]) == "" and dec.flush() == ""


def test_stop_string_starting_inside_a_token(tok):
    ids = tok.encode("The next train leaves soon", add_bos=False)
    deltas, tail, dec = _stream(tok, ids, stop=["ain lea"])
    assert dec.stopped and "".join(deltas) + tail == "The next tr"


def test_earliest_stop_string_wins(tok):
    ids = tok.encode("Sunny ☀️ today, rain 🌧️ tomorrow", add_bos=False)
    deltas, tail, dec = _stream(tok, ids, stop=["tomorrow", "🌧️", "☀️"])
    assert dec.stopped and dec.text == "Sunny "
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_that_never_appears(tok):
    for text in TEXTS:
        ids = tok.encode(text)
        deltas, tail, dec = _stream(tok, ids, stop=["ZZZ", "\n\n\n", "never"])
        assert "".join(deltas) + tail == tok.decode(ids)
        assert not dec.stopped


def test_possible_stop_start_is_held_until_flush(tok):
    ids = tok.encode("the train stops at St", add_bos=False)
    deltas, tail, dec = _stream(tok, ids, stop=["Stop here"])
    assert "".join(deltas) == "the train stops at "
    assert tail == "St" and not dec.stopped


# --- errors ---------------------------------------------------------------------------------


def test_directory_without_tokenizer(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="neither tokenizer.model nor tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(ConfigError, match="not a directory"):
        Tokenizer.from_dir(tmp_path / "missing")


def test_unreadable_files(sp_dir, hf_dir, tmp_path):
    bad = tmp_path / "bad_config"
    bad.mkdir()
    shutil.copy(sp_dir / "tokenizer.model", bad)
    (bad / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="tokenizer_config.json could not be read as JSON"):
        Tokenizer.from_dir(bad)

    bad_model = tmp_path / "bad_model"
    bad_model.mkdir()
    (bad_model / "tokenizer.model").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ConfigError, match="not a readable sentencepiece model"):
        Tokenizer.from_dir(bad_model)

    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(ConfigError, match="could not be loaded by the tokenizers library"):
        Tokenizer.from_dir(bad_json)

    wrong_bos = tmp_path / "wrong_bos"
    wrong_bos.mkdir()
    shutil.copy(hf_dir / "tokenizer.json", wrong_bos)
    (wrong_bos / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|nope|>"}))
    with pytest.raises(ConfigError, match="not in the vocabulary"):
        Tokenizer.from_dir(wrong_bos)


def test_chat_without_template(sp_dir, tmp_path):
    shutil.copy(sp_dir / "tokenizer.model", tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.chat_template is None and tok.add_bos and tok.bos_id == 1
    with pytest.raises(ConfigError, match="this engine has no chat template; send a plain prompt"):
        tok.encode_chat(CHAT)


def test_template_errors(sp_tok, sp_dir, tmp_path):
    with pytest.raises(RequestError, match="chat roles must be system, user or assistant"):
        sp_tok.render_chat([{"role": "tool", "content": "42"}])
    with pytest.raises(RequestError, match="non-empty list"):
        sp_tok.render_chat([])
    shutil.copy(sp_dir / "tokenizer.model", tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(ConfigError, match="not valid Jinja"):
        Tokenizer.from_dir(tmp_path).render_chat(CHAT)


def test_template_is_sandboxed(sp_dir, tmp_path):
    shutil.copy(sp_dir / "tokenizer.model", tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ConfigError, match="sandbox forbids"):
        Tokenizer.from_dir(tmp_path).render_chat(CHAT)


def test_messages_the_template_cannot_render(sp_dir, tmp_path):
    shutil.copy(sp_dir / "tokenizer.model", tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] + '!' }}{% endfor %}")
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.render_chat([{"role": "user", "content": "hi"}]) == "hi!"
    with pytest.raises(RequestError, match="could not render these messages"):
        tok.render_chat([{"role": "user", "content": None}])
