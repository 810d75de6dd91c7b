"""Bad engines, bad checkpoints and bad requests each give a clear error; the CLI end to end."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import copy_tokenizer
from edgellm.engine.builder import BuildOptions, build_engine
from edgellm.engine.manifest import Manifest
from edgellm.engine.runner import Engine
from edgellm.errors import ConfigError, DeviceMismatchError, EngineFormatError, RequestError
from hf_models import make_checkpoint


@pytest.fixture
def engine_copy(demo_engine, tmp_path) -> Path:
    dst = tmp_path / "engine"
    shutil.copytree(demo_engine, dst)
    return dst


def edgellm(*args, check=True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgellm", *map(str, args)], capture_output=True, text=True,
                          check=check, timeout=300)


def test_tampered_weight_file_is_refused(engine_copy):
    weights = engine_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(EngineFormatError, match="model.safetensors has sha256 .* it was modified"):
        Engine.load(engine_copy, device="cpu")


def test_truncated_file_is_refused(engine_copy):
    (engine_copy / "tokenizer.model").write_bytes(b"")
    with pytest.raises(EngineFormatError, match="tokenizer.model is 0 bytes"):
        Engine.load(engine_copy, device="cpu")


def test_manifest_naming_a_missing_file(engine_copy):
    (engine_copy / "tokenizer.model").unlink()
    with pytest.raises(EngineFormatError, match="tokenizer.model listed in the manifest is missing"):
        Engine.load(engine_copy, device="cpu")


def test_manifest_path_outside_engine_is_refused(engine_copy):
    path = engine_copy / "manifest.json"
    data = json.loads(path.read_text())
    data["files"]["../outside"] = {"sha256": "0" * 64, "size": 1}
    path.write_text(json.dumps(data))
    with pytest.raises(EngineFormatError, match="not a plain relative path"):
        Engine.load(engine_copy, device="cpu")


def test_not_an_engine(tmp_path):
    with pytest.raises(EngineFormatError, match="manifest.json not found"):
        Engine.load(tmp_path, device="cpu")


def test_malformed_manifest(engine_copy):
    (engine_copy / "manifest.json").write_text("{not json")
    with pytest.raises(EngineFormatError, match="not valid JSON"):
        Engine.load(engine_copy, device="cpu")


def test_wrong_sm_names_both():
    m = Manifest(engine_id="e", model={}, quantization={"scheme": "fp16"}, kv_dtype="fp16", max_batch=1,
                      max_seq_len=16, target_sms=["8.7"], builder={}, min_runtime_version="0.1.0", files={})
    with pytest.raises(DeviceMismatchError, match=r"built for SM 8.7 but this GPU is SM 9.0"):
        m.require_target("9.0")
    m.require_target("8.7")
    m.require_target("cpu")  # the CPU reference path runs any engine


def test_unsupported_architecture(tmp_path, tokenizer_dir):
    hf = tmp_path / "hf"
    make_checkpoint("llama-gqa", hf)
    config = json.loads((hf / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (hf / "config.json").write_text(json.dumps(config))
    copy_tokenizer(tokenizer_dir, hf)
    with pytest.raises(ConfigError, match="unsupported architecture 'GPT2LMHeadModel'.*LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        build_engine(hf, tmp_path / "out", BuildOptions(quant="fp16", target_sms=["cpu"], max_seq_len=128))
    assert not (tmp_path / "out").exists()


def test_malformed_safetensors_checkpoint(tmp_path, tokenizer_dir):
    hf = tmp_path / "hf"
    make_checkpoint("llama-gqa", hf)
    copy_tokenizer(tokenizer_dir, hf)
    (hf / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ConfigError, match="model.safetensors is not a readable safetensors file"):
        build_engine(hf, tmp_path / "out", BuildOptions(quant="fp16", target_sms=["cpu"], max_seq_len=128))


def test_group_size_must_divide_in_features(tmp_path, tokenizer_dir):
    hf = tmp_path / "hf"
    make_checkpoint("llama-gqa", hf)  # hidden 128
    copy_tokenizer(tokenizer_dir, hf)
    with pytest.raises(ConfigError, match="--group-size 96 .* 128 in-features"):
        build_engine(hf, tmp_path / "out", BuildOptions(group_size=96, target_sms=["cpu"], max_seq_len=128))


def test_no_target_without_gpu_is_an_error(tmp_path, tokenizer_dir):
    hf = tmp_path / "hf"
    make_checkpoint("llama-gqa", hf)
    copy_tokenizer(tokenizer_dir, hf)
    with pytest.raises(ConfigError, match="no --target-sm given"):
        build_engine(hf, tmp_path / "out", BuildOptions(quant="fp16", target_sms=[], max_seq_len=128))


def test_request_errors(demo_engine):
    engine = Engine.load(demo_engine, device="cpu")
    with pytest.raises(RequestError, match="prompt is empty"):
        engine.check_request([], 4)
    with pytest.raises(RequestError, match="token id 99999 is outside the vocabulary"):
        engine.check_request([1, 99999], 4)
    with pytest.raises(RequestError, match="max sequence length is 512"):
        engine.check_request([5] * 600, 4)
    with pytest.raises(RequestError, match="ask for at most 12 new tokens"):
        engine.check_request([5] * 500, 100)


def test_cli_run_json_and_stream_agree(demo_engine):
    as_json = json.loads(edgellm("run", demo_engine, "--prompt", "The kiosk", "--max-new-tokens", 24,
                                 "--device", "cpu", "--json").stdout)
    assert set(as_json) == {"token_ids", "text", "finish_reason"}
    assert as_json["finish_reason"] in ("stop", "length")
    streamed = edgellm("run", demo_engine, "--prompt", "The kiosk", "--max-new-tokens", 24, "--device", "cpu").stdout
    assert streamed == as_json["text"] + "\n"
    from edgellm.engine.tokenizer import Tokenizer

    assert Tokenizer.from_dir(demo_engine).decode(as_json["token_ids"]) == as_json["text"]


def test_cli_run_seeded_sampling_is_reproducible(demo_engine):
    args = ("run", demo_engine, "--prompt-ids", "1,40,41,42", "--max-new-tokens", 16, "--temperature", 1.0,
            "--top-k", 50, "--top-p", 0.9, "--seed", 3, "--device", "cpu", "--json")
    first, second = (json.loads(edgellm(*args).stdout) for _ in range(2))
    assert first["token_ids"] == second["token_ids"]


def test_cli_errors_are_one_line(demo_engine):
    out = edgellm("run", demo_engine, "--prompt-ids", "1,2,99999", "--device", "cpu", check=False)
    assert out.returncode == 2
    assert "error: token id 99999 is outside the vocabulary" in out.stderr
    assert "Traceback" not in out.stderr
    out = edgellm("run", demo_engine, "--prompt", "", "--device", "cpu", check=False)
    assert out.returncode == 2 and "error: the prompt is empty" in out.stderr


def test_loading_an_engine_does_not_import_the_compiler_stack(demo_engine):
    """torch._dynamo (and sympy) cost seconds of start-up; nothing in load or warm-up needs them."""
    code = (
        "import sys; from edgellm.engine.runner import Engine; "
        f"e = Engine.load({str(demo_engine)!r}, device='cpu'); e.warm_up(); "
        "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_importing_the_runner_does_not_import_the_gpu_kernels():
    """The kernel modules import Triton (~0.4 s on a GPU host): the runner imports them when an
    engine is loaded, beside the weights' reading (kernels.start_hashing_compiler), not at import."""
    code = ("import sys; import edgellm.engine.runner; "
            "print(sorted(m for m in sys.modules if m.startswith('edgellm.engine.kernels.') or m == 'triton'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
