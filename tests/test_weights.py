"""load_weights: one pass reads, hashes and places model.safetensors; damage of any kind is refused.

Real engine directories (the demo engine, and small hand-written safetensors files where a test
needs a layout save_file never writes), checked against safetensors' own loader.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edgellm import __version__
from edgellm.engine.manifest import (
    MANIFEST_NAME,
    Manifest,
    describe_files,
    read_manifest,
    verify_files,
    write_manifest,
)
from edgellm.engine.prefetch import start_prefetching_weights
from edgellm.engine.weights import load_weights
from edgellm.errors import EngineFormatError

CPU = torch.device("cpu")
SMALL_CHUNK = 4096  # many chunks even for a few-KB file

# Tensors in the order written, with no alignment: the F16 tensor starts at data byte 3 and the
# I32 one at byte 17, offsets save_file never produces (it sorts by alignment) but the format allows.
UNALIGNED = [
    ("flags", torch.tensor([1, 2, 3], dtype=torch.uint8)),
    ("half", torch.arange(7, dtype=torch.float16) / 4),
    ("ints", torch.tensor([-5, 0, 7, 2**30, -(2**31)], dtype=torch.int32)),
    ("scalar", torch.tensor(2.5, dtype=torch.float32)),
    ("empty", torch.empty(0, 4, dtype=torch.bfloat16)),
    ("longs", torch.arange(3, dtype=torch.int64) * 2**40),
]
NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int32: "I32", torch.int64: "I64",
         torch.uint8: "U8", torch.int8: "I8"}


def raw_safetensors(tensors: list[tuple[str, torch.Tensor]], header: dict | None = None, header_len: int | None = None) -> bytes:
    """A safetensors file laid out exactly as given (header may be overridden to lie)."""
    data, meta, at = b"", {"__metadata__": {"format": "test"}}, 0
    for name, t in tensors:
        raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        meta[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + len(raw)]}
        data += raw
        at += len(raw)
    text = json.dumps(header if header is not None else meta).encode()
    return struct.pack("<Q", len(text) if header_len is None else header_len) + text + data


def make_engine(path: Path, weights: bytes, chunk_size: int = SMALL_CHUNK) -> Path:
    """An engine directory around the given weights bytes: the file, a tokenizer file, a manifest."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.safetensors").write_bytes(weights)
    (path / "tokenizer_config.json").write_text('{"comment": "' + "x" * 5000 + '"}\n')
    manifest = Manifest(
        engine_id="weights-test", model={"architecture": "LlamaForCausalLM", "config": {}, "source": "test"},
        quantization={"scheme": "fp16"}, kv_dtype="fp16", max_batch=1, max_seq_len=16, target_sms=["cpu"],
        builder={"name": "edgellm", "version": __version__}, min_runtime_version=__version__,
        files=describe_files(path, ["model.safetensors", "tokenizer_config.json"], chunk_size=chunk_size),
    )
    write_manifest(path, manifest)
    return path


def rechunk(engine: Path, chunk_size: int) -> None:
    manifest = read_manifest(engine)
    manifest.files = describe_files(engine, list(manifest.files), chunk_size=chunk_size)
    write_manifest(engine, manifest)


def make_legacy(engine: Path) -> None:
    """The manifest as engines built before chunk hashes have it: sha256 and size only."""
    data = json.loads((engine / MANIFEST_NAME).read_text())
    for entry in data["files"].values():
        del entry["chunk_size"], entry["chunk_sha256"]
    (engine / MANIFEST_NAME).write_text(json.dumps(data))


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name].cpu(), t), name


@pytest.fixture
def engine_copy(demo_engine, tmp_path) -> Path:
    dst = tmp_path / "engine"
    shutil.copytree(demo_engine, dst)
    return dst


# ---- round trips ---------------------------------------------------------------------------

def test_demo_engine_matches_safetensors(demo_engine):
    manifest = read_manifest(demo_engine)
    assert "chunk_sha256" in manifest.files["model.safetensors"]
    got = load_weights(demo_engine, manifest, CPU)
    assert_same(got, load_file(str(demo_engine / "model.safetensors")))


def test_many_small_chunks_match_safetensors(engine_copy):
    rechunk(engine_copy, 10_000)  # not a multiple of any element size: chunk edges cut through tensors
    manifest = read_manifest(engine_copy)
    assert len(manifest.files["model.safetensors"]["chunk_sha256"]) > 20
    messages = []
    got = load_weights(engine_copy, manifest, CPU, progress=messages.append)
    assert_same(got, load_file(str(engine_copy / "model.safetensors")))
    assert any("reading and verifying" in m and "chunks" in m for m in messages)


def test_unaligned_offsets_are_copied_not_viewed(tmp_path):
    engine = make_engine(tmp_path / "e", raw_safetensors(UNALIGNED), chunk_size=8)
    got = load_weights(engine, read_manifest(engine), CPU)
    assert_same(got, dict(UNALIGNED))
    assert got["scalar"].shape == ()


def test_header_larger_than_a_chunk(tmp_path):
    tensors = [(f"t{i}", torch.full((i + 1,), i, dtype=torch.float32)) for i in range(40)]  # ~3 KB header
    engine = make_engine(tmp_path / "e", raw_safetensors(tensors), chunk_size=256)
    assert_same(load_weights(engine, read_manifest(engine), CPU), dict(tensors))


# ---- the manifest's chunk hashes ------------------------------------------------------------

def test_describe_files_records_chunk_hashes(tmp_path):
    engine = make_engine(tmp_path / "e", raw_safetensors(UNALIGNED), chunk_size=50)
    entry = read_manifest(engine).files["model.safetensors"]
    data = (engine / "model.safetensors").read_bytes()
    assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["size"] == len(data)
    assert entry["chunk_size"] == 50
    assert entry["chunk_sha256"] == [hashlib.sha256(data[i:i + 50]).hexdigest() for i in range(0, len(data), 50)]


@pytest.mark.parametrize("change, message", [
    (lambda e: e.update(chunk_sha256=e["chunk_sha256"][:-1]), "needs chunk_sha256 as"),
    (lambda e: e.update(chunk_sha256=["zz" * 32] * len(e["chunk_sha256"])), "needs chunk_sha256 as"),
    (lambda e: e.update(chunk_size=0), "chunk_size 0, expected a byte count in 1.."),
    (lambda e: e.update(chunk_size=1 << 40), "chunk_size 1099511627776, expected a byte count in 1.."),
    (lambda e: e.update(chunk_size="64M"), "chunk_size '64M'"),
    (lambda e: e.pop("chunk_sha256"), "needs chunk_sha256 as"),
    (lambda e: e.pop("chunk_size"), "chunk_size None, expected a byte count in 1.."),
])
def test_malformed_chunk_hashes_are_refused(tmp_path, change, message):
    engine = make_engine(tmp_path / "e", raw_safetensors(UNALIGNED * 400))
    data = json.loads((engine / MANIFEST_NAME).read_text())
    change(data["files"]["model.safetensors"])
    (engine / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(EngineFormatError, match=message):
        read_manifest(engine)


def test_verify_files_names_the_changed_range(engine_copy):
    rechunk(engine_copy, SMALL_CHUNK)
    verify_files(engine_copy, read_manifest(engine_copy))
    flip_byte(engine_copy / "model.safetensors", 5 * SMALL_CHUNK + 17)
    with pytest.raises(EngineFormatError, match=rf"model.safetensors has sha256 \w+\.\.\. in bytes "
                                                 rf"{5 * SMALL_CHUNK}\.\.{6 * SMALL_CHUNK - 1}, .* it was modified"):
        verify_files(engine_copy, read_manifest(engine_copy))


# ---- damage is refused and nothing is returned ----------------------------------------------

def test_flipped_byte_in_a_chunk_is_refused(engine_copy):
    rechunk(engine_copy, SMALL_CHUNK)
    k = 7
    flip_byte(engine_copy / "model.safetensors", k * SMALL_CHUNK + 100)
    with pytest.raises(EngineFormatError, match=rf"engine file model.safetensors has sha256 .* in bytes "
                                                 rf"{k * SMALL_CHUNK}\.\.{(k + 1) * SMALL_CHUNK - 1}, .* it was modified"):
        load_weights(engine_copy, read_manifest(engine_copy), CPU)


def test_flipped_byte_in_the_header_is_reported_as_modified(engine_copy):
    weights = engine_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    at = data.index(b'"shape":[') + len(b'"shape":[')
    data[at] = ord("9") if data[at] != ord("9") else ord("8")  # a header that still parses, with a wrong shape
    weights.write_bytes(bytes(data))
    with pytest.raises(EngineFormatError, match=r"model.safetensors has sha256 .* in bytes 0\.\..* it was modified"):
        load_weights(engine_copy, read_manifest(engine_copy), CPU)


def test_truncated_file_is_refused(engine_copy):
    weights = engine_copy / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(EngineFormatError, match=f"model.safetensors is {size - 1000} bytes, the manifest says {size}"):
        load_weights(engine_copy, read_manifest(engine_copy), CPU)
    with pytest.raises(EngineFormatError, match="not a valid safetensors file: its tensors end at data byte"):
        load_weights(engine_copy, read_manifest(engine_copy), CPU, verify=False)


def test_missing_or_symlinked_weights_are_refused(engine_copy, tmp_path):
    weights = engine_copy / "model.safetensors"
    moved = tmp_path / "elsewhere.safetensors"
    weights.rename(moved)
    with pytest.raises(EngineFormatError, match="model.safetensors listed in the manifest is missing"):
        load_weights(engine_copy, read_manifest(engine_copy), CPU)
    weights.symlink_to(moved)
    with pytest.raises(EngineFormatError, match="model.safetensors listed in the manifest is missing"):
        load_weights(engine_copy, read_manifest(engine_copy), CPU)


def header_of(data: bytes) -> dict:
    return json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])


HEADER = header_of(raw_safetensors(UNALIGNED))


def with_entry(name: str, **fields) -> dict:
    header = json.loads(json.dumps(HEADER))
    header[name].update(fields)
    return header


@pytest.mark.parametrize("header, header_len, message", [
    (with_entry("half", data_offsets=[3, 18]), None, r"'half' is F16 \[7\] \(14 bytes\) but its data_offsets \[3, 18\] span 15"),
    (with_entry("ints", data_offsets=[15, 35]), None, r"tensor 'ints' starts at data byte 15, expected 17"),
    (with_entry("half", dtype="F64"), None, r"tensor 'half' has dtype 'F64', expected one of F16, BF16, F32, I32, I64, U8, I8"),
    (with_entry("half", dtype="F32"), None, r"'half' is F32 \[7\] \(28 bytes\) but its data_offsets"),
    (with_entry("half", shape=[7, -1]), None, r"tensor 'half' has shape \[7, -1\]"),
    (with_entry("half", data_offsets=[3]), None, r"data_offsets \[3\], expected \[begin, end\]"),
    (with_entry("half", pickle="cos\nsystem"), None, r"'half' needs exactly dtype, shape and data_offsets"),
    (dict(HEADER, __metadata__=[1]), None, r"__metadata__ is not an object of strings"),
    (["not", "an", "object"], None, r"header is not a JSON object"),
    (None, 10**9, r"header length 1000000000 does not fit"),
    (None, 40, r"header is not JSON"),
])
def test_lying_header_is_refused(tmp_path, header, header_len, message):
    data = raw_safetensors(UNALIGNED, header=header, header_len=header_len)
    engine = make_engine(tmp_path / "e", data)  # the manifest matches: only the format check can catch it
    with pytest.raises(EngineFormatError, match=r"model.safetensors is not a valid safetensors file: .*" + message +
                       r".*the engine is damaged, rebuild or re-push it"):
        load_weights(engine, read_manifest(engine), CPU)


def test_trailing_bytes_and_duplicate_names_are_refused(tmp_path):
    engine = make_engine(tmp_path / "a", raw_safetensors(UNALIGNED) + b"\0" * 8)
    with pytest.raises(EngineFormatError, match="tensors end at data byte 65 but its data section is 73 bytes"):
        load_weights(engine, read_manifest(engine), CPU)
    good = raw_safetensors(UNALIGNED)
    data_section = good[8 + struct.unpack("<Q", good[:8])[0]:]
    text = (json.dumps(HEADER)[:-1] + ', "half": ' + json.dumps(HEADER["half"]) + "}").encode()
    engine = make_engine(tmp_path / "b", struct.pack("<Q", len(text)) + text + data_section)
    with pytest.raises(EngineFormatError, match="duplicate key 'half'"):
        load_weights(engine, read_manifest(engine), CPU)


def test_tiny_file_is_refused(tmp_path):
    engine = make_engine(tmp_path / "e", b"\x02\x00\x00")
    with pytest.raises(EngineFormatError, match="it is 3 bytes, too short"):
        load_weights(engine, read_manifest(engine), CPU)


# ---- engines built before chunk hashes --------------------------------------------------------

def test_legacy_manifest_loads_and_detects_tampering(engine_copy):
    make_legacy(engine_copy)
    manifest = read_manifest(engine_copy)
    assert "chunk_sha256" not in manifest.files["model.safetensors"]
    want = load_file(str(engine_copy / "model.safetensors"))
    assert_same(load_weights(engine_copy, manifest, CPU, read_chunk=SMALL_CHUNK), want)  # many chunks, hashed in order
    assert_same(load_weights(engine_copy, manifest, CPU), want)
    verify_files(engine_copy, manifest)

    flip_byte(engine_copy / "model.safetensors", 9 * SMALL_CHUNK + 1)
    with pytest.raises(EngineFormatError, match=r"model.safetensors has sha256 \w+\.\.\., the manifest says .* it was modified"):
        load_weights(engine_copy, manifest, CPU, read_chunk=SMALL_CHUNK)
    with pytest.raises(EngineFormatError, match=r"model.safetensors has sha256 \w+\.\.\., the manifest says .* it was modified"):
        verify_files(engine_copy, manifest)


def test_unverified_load_reads_a_modified_file(engine_copy):
    """verify=False (a developer's choice) skips the hashes, never the format checks."""
    flip_byte(engine_copy / "model.safetensors", engine_copy.joinpath("model.safetensors").stat().st_size - 3)
    got = load_weights(engine_copy, read_manifest(engine_copy), CPU, verify=False)
    assert_same(got, load_file(str(engine_copy / "model.safetensors")))


# ---- read and verified at process start (edgellm.engine.prefetch) ---------------------------

PREFETCH_USED = "read and verified during start-up"


def load_saying(engine: Path, device: torch.device = CPU) -> tuple[dict[str, torch.Tensor], list[str]]:
    said: list[str] = []
    return load_weights(engine, read_manifest(engine), device, progress=said.append), said


def test_prefetched_weights_are_the_ones_loaded(engine_copy, tmp_path):
    rechunk(engine_copy, 10_000)  # several chunks, edges through tensors
    assert start_prefetching_weights(engine_copy) is not None
    got, said = load_saying(engine_copy)
    assert any(PREFETCH_USED in m for m in said), said
    assert_same(got, load_file(str(engine_copy / "model.safetensors")))
    _, said = load_saying(engine_copy)  # taken once: a second load reads the file itself
    assert not any(PREFETCH_USED in m for m in said), said

    odd = make_engine(tmp_path / "odd", raw_safetensors(UNALIGNED), chunk_size=8)
    start_prefetching_weights(odd)
    got, said = load_saying(odd)
    assert any(PREFETCH_USED in m for m in said), said
    assert_same(got, dict(UNALIGNED))


def test_a_tampered_chunk_is_still_refused_by_name(engine_copy):
    rechunk(engine_copy, SMALL_CHUNK)
    flip_byte(engine_copy / "model.safetensors", 3 * SMALL_CHUNK + 1)
    prefetch = start_prefetching_weights(engine_copy)
    prefetch.join()
    assert prefetch.buffer is None  # nothing unverified is kept
    with pytest.raises(EngineFormatError, match=rf"in bytes {3 * SMALL_CHUNK}\.\.{4 * SMALL_CHUNK - 1}, .* it was modified"):
        load_weights(engine_copy, read_manifest(engine_copy), CPU)


def test_a_file_replaced_after_the_prefetch_is_read_again(engine_copy):
    """The bytes loaded are those of the file as it is when the engine loads, verified."""
    weights = engine_copy / "model.safetensors"
    start_prefetching_weights(engine_copy).join()
    tampered = bytearray(weights.read_bytes())
    tampered[-1] ^= 0x01
    (engine_copy / "new").write_bytes(bytes(tampered))
    os.replace(engine_copy / "new", weights)  # same size, another file
    with pytest.raises(EngineFormatError, match="it was modified"):
        load_weights(engine_copy, read_manifest(engine_copy), CPU)


def test_a_manifest_changed_after_the_prefetch_is_checked_as_it_now_is(engine_copy):
    start_prefetching_weights(engine_copy).join()
    rechunk(engine_copy, 10_000)  # other chunk hashes than the prefetch checked against
    got, said = load_saying(engine_copy)
    assert not any(PREFETCH_USED in m for m in said), said
    assert_same(got, load_file(str(engine_copy / "model.safetensors")))


def test_no_prefetch_without_memory_to_spare_or_chunk_hashes(engine_copy, tmp_path):
    size = (engine_copy / "model.safetensors").stat().st_size
    assert start_prefetching_weights(engine_copy, available_bytes=3 * size) is None
    assert start_prefetching_weights(tmp_path / "no-such-engine") is None
    make_legacy(engine_copy)
    assert start_prefetching_weights(engine_copy) is None


# ---- on the GPU ----------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_load_matches_safetensors(engine_copy, tmp_path):
    cuda = torch.device("cuda")
    got = load_weights(engine_copy, read_manifest(engine_copy), cuda)
    assert all(t.is_cuda for t in got.values())
    assert_same(got, load_file(str(engine_copy / "model.safetensors")))

    rechunk(engine_copy, 10_000)
    assert_same(load_weights(engine_copy, read_manifest(engine_copy), cuda), load_file(str(engine_copy / "model.safetensors")))
    make_legacy(engine_copy)
    assert_same(load_weights(engine_copy, read_manifest(engine_copy), cuda, read_chunk=SMALL_CHUNK),
                load_file(str(engine_copy / "model.safetensors")))

    odd = make_engine(tmp_path / "odd", raw_safetensors(UNALIGNED), chunk_size=8)
    assert_same(load_weights(odd, read_manifest(odd), cuda), dict(UNALIGNED))


@pytest.mark.gpu
def test_cuda_load_of_prefetched_weights_matches_safetensors(engine_copy, tmp_path, monkeypatch):
    import edgellm.engine.weights as weights_module

    cuda = torch.device("cuda")
    monkeypatch.setattr(weights_module, "UPLOAD_PIECE", 10_000)  # many pieces through the 4 pinned buffers
    start_prefetching_weights(engine_copy)
    got, said = load_saying(engine_copy, cuda)
    assert any(PREFETCH_USED in m for m in said), said
    assert all(t.is_cuda for t in got.values())
    assert_same(got, load_file(str(engine_copy / "model.safetensors")))

    odd = make_engine(tmp_path / "odd", raw_safetensors(UNALIGNED), chunk_size=8)
    start_prefetching_weights(odd)
    got, said = load_saying(odd, cuda)
    assert any(PREFETCH_USED in m for m in said), said
    assert_same(got, dict(UNALIGNED))


@pytest.mark.gpu
def test_cuda_tampered_chunk_frees_the_device_buffer(engine_copy):
    cuda = torch.device("cuda")
    rechunk(engine_copy, SMALL_CHUNK)
    load_weights(engine_copy, read_manifest(engine_copy), cuda)  # warm the CUDA context and allocator
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    flip_byte(engine_copy / "model.safetensors", 11 * SMALL_CHUNK + 5)
    with pytest.raises(EngineFormatError, match=rf"in bytes {11 * SMALL_CHUNK}\.\.{12 * SMALL_CHUNK - 1}, .* it was modified"):
        load_weights(engine_copy, read_manifest(engine_copy), cuda)
    assert torch.cuda.memory_allocated() == before


def test_cuda_context_thread_is_quiet_without_a_gpu():
    """`edgellm serve` starts it before anything else: on a host without a GPU or driver it
    must end without raising (torch reports the real problem when the engine loads)."""
    import threading

    from edgellm.engine.cuda_context import start_creating_context

    assert start_creating_context("cpu") is None
    errors = []
    previous = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)
    try:
        thread = start_creating_context("cuda")
        if thread is not None:  # None where cuda-python is not installed
            thread.join(timeout=60)
            assert not thread.is_alive()
    finally:
        threading.excepthook = previous
    assert errors == []
