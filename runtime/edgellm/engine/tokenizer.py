"""Text <-> token ids and chat templates, from the tokenizer files of a checkpoint or engine.

Two backends behind one class: HF `tokenizers` for `tokenizer.json`, `sentencepiece` for
`tokenizer.model`. Special tokens, BOS policy, EOS ids and the chat template come from the
JSON files next to them, read the way transformers reads them, so an engine's prompts
tokenize exactly as the model saw them in training.

Only stdlib, sentencepiece, tokenizers and jinja2 are imported, each lazily: the builder
and the daemon load this on boxes where only one tokenizer library may be installed.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

from edgellm.errors import ConfigError, RequestError

TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
)

NO_TEMPLATE_MESSAGE = "this engine has no chat template; send a plain prompt"


class Tokenizer:
    """Load with `Tokenizer.from_dir(path)`; the constructor is not public."""

    def __init__(
        self,
        backend: "_SentencePieceBackend | _HFBackend",
        files: list[str],
        bos_token: str | None,
        eos_token: str | None,
        extra_tokens: dict[str, str | None],
        bos_id: int | None,
        eos_ids: list[int],
        add_bos: bool,
        chat_template: str | None,
    ):
        self._backend = backend
        self.files = files
        self.vocab_size = backend.vocab_size
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.add_bos = add_bos
        self.chat_template = chat_template
        # Ids that decode(skip_special=True) drops: the stream decoder skips the same ones.
        self.special_ids: frozenset[int] = backend.special_ids
        named = {"bos_token": bos_token, "eos_token": eos_token, **extra_tokens}
        self._template_vars = {k: v for k, v in named.items() if v is not None}
        self._compiled_template: Any = None

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Read a Hugging Face checkpoint directory or an engine directory (same file names)."""
        path = Path(path)
        if not path.is_dir():
            raise ConfigError(f"{path} is not a directory: expected a checkpoint or engine directory with tokenizer files")
        files = [name for name in TOKENIZER_FILES if (path / name).is_file()]
        config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")
        added = _added_tokens(config, _read_json(path / "added_tokens.json"), path)

        # tokenizer.json first: it is what transformers loads when both are present, and for
        # checkpoints that ship both it carries the added tokens sentencepiece lacks.
        if "tokenizer.json" in files:
            backend: _SentencePieceBackend | _HFBackend = _HFBackend(path / "tokenizer.json")
        elif "tokenizer.model" in files:
            backend = _SentencePieceBackend(path / "tokenizer.model", added, legacy=bool(config.get("legacy", False)))
        else:
            raise ConfigError(
                f"{path} has neither tokenizer.model nor tokenizer.json: copy the tokenizer files of the "
                "Hugging Face checkpoint into it (or rebuild the engine from a complete checkpoint)"
            )

        def named(key: str) -> tuple[bool, str | None]:
            for source in (config, special_map):
                if key in source:
                    return True, _token_content(source[key], key, path)
            return False, None

        has_bos, bos_token = named("bos_token")
        if not has_bos:
            bos_token = backend.default_bos
        has_eos, eos_token = named("eos_token")
        if not has_eos:
            eos_token = backend.default_eos
        bos_id = _lookup(backend, bos_token, "bos_token", path)
        eos_ids: list[int] = []
        tokenizer_eos = _lookup(backend, eos_token, "eos_token", path)
        if tokenizer_eos is not None:
            eos_ids.append(tokenizer_eos)
        for name in ("generation_config.json", "config.json"):
            for i in _id_list(_read_json(path / name).get("eos_token_id"), name, path):
                if i not in eos_ids:
                    eos_ids.append(i)

        add_bos = bool(config["add_bos_token"]) if "add_bos_token" in config else backend.adds_bos
        add_bos = add_bos and bos_id is not None

        extra = {}
        for key in ("unk_token", "pad_token"):
            found, value = named(key)
            extra[key] = value if found else None

        return cls(
            backend,
            files,
            bos_token=bos_token,
            eos_token=eos_token,
            extra_tokens=extra,
            bos_id=bos_id,
            eos_ids=eos_ids,
            add_bos=add_bos,
            chat_template=_chat_template(config, path),
        )

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Special-token strings in text (e.g. "<s>") become their ids, as in transformers."""
        ids = self._backend.encode(text)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        """Ids outside the vocabulary (a model's padded embedding rows) decode to nothing."""
        ids = [i for i in ids if 0 <= i < self.vocab_size]
        return self._backend.decode(ids, skip_special)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render messages with the checkpoint's template, in a sandbox like transformers'."""
        if self.chat_template is None:
            raise ConfigError(NO_TEMPLATE_MESSAGE)
        if not isinstance(messages, list) or not messages:
            raise RequestError("chat messages must be a non-empty list of {role, content} objects")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise RequestError(f"chat message {m!r} has no role: expected {{'role': ..., 'content': ...}}")
        jinja2 = _import("jinja2", "a chat template")
        template = self._template()
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self._template_vars)
        except _TemplateRaised as e:
            # The template's own raise_exception(): the messages break its rules (roles order...).
            raise RequestError(f"the chat template rejected the messages: {e}") from None
        except jinja2.exceptions.SecurityError as e:
            raise ConfigError(
                f"the chat template tried an operation the sandbox forbids ({e}); fix or replace the engine's chat template"
            ) from None
        except Exception as e:  # a template is untrusted code: any failure is this request's failure
            raise RequestError(
                f"the chat template could not render these messages ({type(e).__name__}: {e}); "
                "send messages with a role and string content"
            ) from None

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Render with a generation prompt and encode; BOS is added only if the template did not emit it."""
        ids = self.encode(self.render_chat(messages, add_generation_prompt=True), add_bos=False)
        if self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def _template(self) -> Any:
        if self._compiled_template is None:
            import jinja2

            try:
                self._compiled_template = _jinja_env().from_string(self.chat_template)
            except jinja2.TemplateSyntaxError as e:
                raise ConfigError(
                    f"the chat template is not valid Jinja (line {e.lineno}: {e.message}); "
                    "fix chat_template in tokenizer_config.json or chat_template.jinja"
                ) from None
        return self._compiled_template


class _TemplateRaised(Exception):
    pass


def _jinja_env() -> Any:
    """The environment transformers gives chat templates: sandboxed, trim/lstrip blocks, same globals."""
    from datetime import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _TemplateError(_TemplateRaised, jinja2.TemplateError):
        pass

    class GenerationTag(jinja2.ext.Extension):
        # `{% generation %}` only marks assistant spans for training masks; rendering keeps the body.
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise _TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
        # jinja's own tojson escapes HTML characters, which would change the prompt text.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class _HFBackend:
    def __init__(self, file: Path):
        HFTokenizer = _import("tokenizers", file).Tokenizer
        try:
            self._tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises plain Exception subclasses for bad files
            raise ConfigError(f"{file} could not be loaded by the tokenizers library ({e}); re-copy it from the checkpoint") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
        # Whether the post-processor prepends a token (Llama 3's TemplateProcessing does,
        # Qwen2's ByteLevel does not) decides BOS when the config is silent.
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        prefix = full[: len(full) - len(plain)] if full[len(full) - len(plain) :] == plain else []
        self.adds_bos = bool(prefix)
        self.default_bos = self._tok.id_to_token(prefix[0]) if prefix else None
        self.default_eos = None

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special)


class _SentencePieceBackend:
    def __init__(self, file: Path, added: dict[int, tuple[str, bool]], legacy: bool):
        spm = _import("sentencepiece", file)
        try:
            self._proto = file.read_bytes()
            self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"{file} is not a readable sentencepiece model ({e}); re-copy it from the checkpoint") from None
        self._legacy = legacy
        self._sp_no_prefix: Any = None
        n = self._pieces = self._sp.get_piece_size()
        # Added tokens beyond the sentencepiece vocabulary (e.g. chat markers a fine-tune introduced).
        self._extra = {i: content for i, (content, _) in added.items() if i >= n}
        special = {i for i in range(n) if self._sp.is_control(i) or self._sp.is_unknown(i)}
        special |= {i for i, (_, is_special) in added.items() if is_special}
        self.special_ids = frozenset(special)
        self.vocab_size = max([n, *(i + 1 for i in self._extra)])
        self.default_bos = self._piece(self._sp.bos_id())
        self.default_eos = self._piece(self._sp.eos_id())
        self.adds_bos = True  # Llama's sentencepiece tokenizers prepend BOS unless the config says otherwise

        # Strings split out of the text before sentencepiece sees it, as transformers' added tokens are:
        # control pieces (sentencepiece itself would spell "<s>" out byte by byte) and added tokens.
        self._text_tokens = {self._sp.id_to_piece(i): i for i in range(n) if self._sp.is_control(i)}
        self._text_tokens.update({content: i for i, (content, _) in added.items()})
        self._text_tokens.pop("", None)
        self._splitter = (
            re.compile("(" + "|".join(re.escape(t) for t in sorted(self._text_tokens, key=len, reverse=True)) + ")")
            if self._text_tokens
            else None
        )

    def _piece(self, i: int) -> str | None:
        return self._sp.id_to_piece(i) if i >= 0 else None

    def token_to_id(self, token: str) -> int | None:
        if token in self._text_tokens:
            return self._text_tokens[token]
        i = self._sp.piece_to_id(token)
        return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i

    def encode(self, text: str) -> list[int]:
        chunks = self._splitter.split(text) if self._splitter else [text]
        ids: list[int] = []
        at_start = True
        for k, chunk in enumerate(chunks):
            if k % 2:  # re.split puts the captured separators at odd positions
                ids.append(self._text_tokens[chunk])
            elif chunk:
                # Non-legacy (transformers' default): only text at the very start of the prompt
                # gets sentencepiece's dummy "▁" prefix, not text following a special token.
                sp = self._sp if (at_start or self._legacy) else self._no_prefix()
                ids.extend(sp.encode(chunk))
            at_start = False
        return ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        out: list[str] = []
        run: list[int] = []

        def flush() -> None:
            # sentencepiece drops the leading space of the first piece it decodes; that is
            # right at the start of the text only, not after a token spelled out here.
            if run:
                out.append((self._no_prefix() if out else self._sp).decode(run))
                run.clear()

        for i in ids:
            if i >= self._pieces and i not in self._extra:
                continue  # a gap between the sentencepiece vocabulary and the added tokens
            if i in self.special_ids or i in self._extra:
                if skip_special and i in self.special_ids:
                    continue  # skipped like sentencepiece skips control pieces: the run goes on
                flush()
                out.append(self._extra[i] if i in self._extra else self._sp.id_to_piece(i))
            else:
                run.append(i)
        flush()
        return "".join(out)

    def _no_prefix(self) -> Any:
        if self._sp_no_prefix is None:
            spm = _import("sentencepiece", "tokenizer.model")
            self._sp_no_prefix = spm.SentencePieceProcessor(model_proto=_without_dummy_prefix(self._proto))
        return self._sp_no_prefix


def _without_dummy_prefix(model: bytes) -> bytes:
    """The serialized model with normalizer_spec.add_dummy_prefix = false.

    The Python sentencepiece API cannot switch the prefix off per call and this module must
    not need protobuf, so the two protobuf fields involved are rewritten here directly
    (ModelProto field 3 = normalizer_spec, NormalizerSpec field 3 = add_dummy_prefix).
    """
    out = bytearray()
    found = False
    for number, wire, raw, payload in _proto_fields(model):
        if number == 3 and wire == 2:
            found = True
            spec = b"".join(r for n, _, r, _ in _proto_fields(payload) if n != 3) + b"\x18\x00"
            out += _varint((3 << 3) | 2) + _varint(len(spec)) + spec
        else:
            out += raw
    if not found:
        out += _varint((3 << 3) | 2) + _varint(2) + b"\x18\x00"
    return bytes(out)


def _proto_fields(data: bytes):
    """Yield (field number, wire type, raw bytes of the field, payload of length-delimited fields)."""
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = _read_varint(data, pos)
        wire = key & 7
        payload = b""
        if wire == 0:
            _, pos = _read_varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            payload = data[pos : pos + length]
            pos += length
        elif wire == 5:
            pos += 4
        else:
            raise ConfigError("tokenizer.model is not a valid sentencepiece model (bad protobuf wire type)")
        if pos > len(data):
            raise ConfigError("tokenizer.model is truncated; re-copy it from the checkpoint")
        yield key >> 3, wire, data[start:pos], payload


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ConfigError("tokenizer.model is truncated; re-copy it from the checkpoint")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        out.append(b | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _import(module: str, needed_by: object) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"{needed_by} needs the Python package {module!r}, which is not installed; install it (pip install {module})"
        ) from None


def _read_json(file: Path) -> dict[str, Any]:
    """{} when the file is absent; ConfigError when it exists but cannot be used."""
    if not file.exists():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{file} could not be read as JSON ({e}); re-copy it from the checkpoint") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file} holds a {type(data).__name__}, expected a JSON object; re-copy it from the checkpoint")
    return data


def _token_content(value: Any, key: str, path: Path) -> str | None:
    """Special tokens are written as "<s>" or as {"content": "<s>", ...} (AddedToken form)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ConfigError(f"{key} in {path} is {value!r}: expected a string or an object with \"content\"")


def _lookup(backend: Any, token: str | None, key: str, path: Path) -> int | None:
    if token is None:
        return None
    i = backend.token_to_id(token)
    if i is None:
        raise ConfigError(
            f"{key} {token!r} named in {path}'s tokenizer config is not in the vocabulary; "
            "the tokenizer files do not belong together, re-copy them from one checkpoint"
        )
    return i


def _id_list(value: Any, name: str, path: Path) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"eos_token_id in {path / name} is {value!r}: expected an integer or a list of integers")
    return values


def _added_tokens(config: dict[str, Any], added_json: dict[str, Any], path: Path) -> dict[int, tuple[str, bool]]:
    """id -> (content, special) from tokenizer_config's added_tokens_decoder and added_tokens.json."""
    added: dict[int, tuple[str, bool]] = {}
    for content, i in added_json.items():
        if isinstance(i, int):
            added[i] = (content, False)
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise ConfigError(f"added_tokens_decoder in {path / 'tokenizer_config.json'} is not an object")
    for key, token in decoder.items():
        try:
            i = int(key)
        except ValueError:
            raise ConfigError(f"added_tokens_decoder key {key!r} in {path / 'tokenizer_config.json'} is not a token id") from None
        content = _token_content(token, f"added_tokens_decoder[{key}]", path)
        special = bool(token.get("special", False)) if isinstance(token, dict) else False
        if content:
            added[i] = (content, special)
    return added


def _chat_template(config: dict[str, Any], path: Path) -> str | None:
    """chat_template.jinja wins over the config entry, as in transformers."""
    file = path / "chat_template.jinja"
    if file.is_file():
        try:
            return file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{file} could not be read ({e}); re-copy it from the checkpoint") from None
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ConfigError(
            f"chat_template in {path / 'tokenizer_config.json'} lists templates {sorted(map(str, named))} but none "
            "named \"default\"; add one named default"
        )
    raise ConfigError(f"chat_template in {path / 'tokenizer_config.json'} is a {type(template).__name__}: expected a string or a list of {{name, template}}")
