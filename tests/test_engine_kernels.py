"""An INT4 engine ships its GPU kernels compiled for each target SM (where the build host has
NVRTC: no GPU needed), hashed in its manifest like every file, and the runtime takes them
instead of compiling them at a device's first start."""

import pytest

from conftest import copy_tokenizer
from edgellm.engine.builder import BuildOptions, build_engine
from edgellm.engine.kernels import cubin_prefix, nvrtc_usable, w4a16_cuda
from edgellm.engine.manifest import verify_files
from hf_models import make_checkpoint

NVRTC, WHY_NOT = nvrtc_usable()
needs_nvrtc = pytest.mark.skipif(not NVRTC, reason=f"needs NVRTC on this host ({WHY_NOT})")


@pytest.fixture(scope="session")
def kernel_cache(tmp_path_factory):
    """One kernel cache for the tests that compile (each SM compiles once, ~20 s)."""
    return tmp_path_factory.mktemp("kernel-cache")


def _build(tmp_path, tokenizer_dir, targets: list[str], messages: list[str]):
    hf = tmp_path / "hf"
    make_checkpoint("llama-gqa", hf)
    copy_tokenizer(tokenizer_dir, hf)
    out = tmp_path / "engine"
    manifest = build_engine(hf, out, BuildOptions(quant="int4-rtn", target_sms=targets, max_seq_len=128),
                            progress=messages.append)
    return out, manifest


@needs_nvrtc
def test_an_int4_engine_ships_its_kernels_for_each_gpu_target(tmp_path, tokenizer_dir, monkeypatch, kernel_cache):
    monkeypatch.setenv("EDGELLM_KERNEL_CACHE", str(kernel_cache))
    messages: list[str] = []
    out, manifest = _build(tmp_path, tokenizer_dir, ["cpu", "8.9"], messages)
    rel = f"{w4a16_cuda.ENGINE_KERNELS_DIR}/{w4a16_cuda.cubin_name(89)}"
    assert [name for name in manifest.files if name.startswith("kernels/")] == [rel]
    assert (out / rel).read_bytes()[:4] == b"\x7fELF"  # a cubin
    verify_files(out, manifest)  # hashed like the weights: the engine's signature covers it
    assert any("compiling the INT4 GPU kernels for SM 8.9" in m for m in messages)


def test_without_nvrtc_the_builder_says_the_devices_will_compile_them(tmp_path, tokenizer_dir, monkeypatch):
    """As on a build host without NVRTC (the test extra installs it here)."""
    import edgellm.engine.kernels as kernels

    monkeypatch.setattr(kernels, "nvrtc_usable", lambda: (False, "NVRTC is not usable: no libnvrtc on this host"))
    messages: list[str] = []
    out, manifest = _build(tmp_path, tokenizer_dir, ["8.9"], messages)
    assert not any(name.startswith("kernels/") for name in manifest.files) and not (out / "kernels").exists()
    assert any("compiled GPU kernels not included" in m and "first start" in m for m in messages), messages


def test_the_runtime_takes_the_kernels_an_engine_ships(tmp_path, monkeypatch):
    """compile_cubin looks in the disk cache, then in the loaded engines' kernels, and compiles
    only where neither has them; what an engine shipped goes into the cache for later starts."""
    monkeypatch.setenv("EDGELLM_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(w4a16_cuda, "_shipped", {})
    engine = tmp_path / "engine"
    (engine / "kernels").mkdir(parents=True)
    name = w4a16_cuda.cubin_name(89)
    (engine / "kernels" / name).write_bytes(b"compiled at build time")
    (engine / "kernels" / "notes.txt").write_bytes(b"not a kernel")
    other_sm = w4a16_cuda.cubin_name(90)  # listed, but for another GPU: not read
    other_version = f"{cubin_prefix(89)}0123456789abcdef.cubin"  # another edgellm's source: not read
    for unread in (other_sm, other_version):
        (engine / "kernels" / unread).write_bytes(b"not for this runtime")
    files = [f"kernels/{name}", f"kernels/{other_sm}", f"kernels/{other_version}", "kernels/notes.txt",
             "tokenizer.model", "model.safetensors"]
    assert w4a16_cuda.use_engine_kernels(engine, files, 89) == [name]
    assert w4a16_cuda.compile_cubin(89) == b"compiled at build time"
    assert (tmp_path / "cache" / name).read_bytes() == b"compiled at build time"
    assert set(w4a16_cuda._shipped) == {name}
    assert w4a16_cuda.use_engine_kernels(engine, files[1:], 89) == []  # an engine without this runtime's cubin


def test_shipped_or_cached_kernels_need_no_nvrtc(tmp_path, monkeypatch):
    """The tensor-core kernels for an SM are at hand, whether or not NVRTC is here, once an engine
    loaded in this process shipped them or a start before this one cached them (w4a16_cuda.available
    then takes them on a device without NVRTC); for another SM they are not."""
    monkeypatch.setenv("EDGELLM_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(w4a16_cuda, "_shipped", {})
    assert not w4a16_cuda.kernels_at_hand(89) and not w4a16_cuda.kernels_at_hand(87)
    engine = tmp_path / "engine"
    (engine / "kernels").mkdir(parents=True)
    name = w4a16_cuda.cubin_name(89)
    (engine / "kernels" / name).write_bytes(b"compiled at build time")
    w4a16_cuda.use_engine_kernels(engine, [f"kernels/{name}"], 89)
    assert w4a16_cuda.kernels_at_hand(89) and not w4a16_cuda.kernels_at_hand(87)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / w4a16_cuda.cubin_name(87)).write_bytes(b"cached by an earlier start")
    assert w4a16_cuda.kernels_at_hand(87)


def test_kernels_from_other_source_have_another_name():
    """A runtime whose kernel source differs (another version) never takes an older cubin."""
    names = {w4a16_cuda.cubin_name(sm) for sm in (80, 87, 89, 90)}
    assert len(names) == 4 and all(n.startswith("w4a16-mma-sm") and n.endswith(".cubin") for n in names)
    source = w4a16_cuda.SOURCE
    try:
        w4a16_cuda.SOURCE = source + "\n// another version\n"
        assert w4a16_cuda.cubin_name(89) not in names
    finally:
        w4a16_cuda.SOURCE = source


@needs_nvrtc
def test_an_sm_this_hosts_nvrtc_cannot_compile_for_is_left_to_the_devices(tmp_path, tokenizer_dir, monkeypatch,
                                                                          kernel_cache):
    monkeypatch.setenv("EDGELLM_KERNEL_CACHE", str(kernel_cache))
    messages: list[str] = []
    out, manifest = _build(tmp_path, tokenizer_dir, ["8.9", "9.9"], messages)
    assert [name for name in manifest.files if name.startswith("kernels/")] == [
        f"kernels/{w4a16_cuda.cubin_name(89)}"]
    assert any("could not compile the INT4 GPU kernels for SM 9.9" in m for m in messages), messages


def _launch_entries() -> list[str]:
    """The W4A16 entries the launcher looks up: the ring kernel's, then the bulk kernel's."""
    return [w4a16_cuda.entry_name(*entry) for entry in w4a16_cuda.ENTRIES] + list(w4a16_cuda.BULK_ENTRIES)


@needs_nvrtc
@pytest.mark.parametrize("sm", [87, 89, 90], ids=["Orin", "L40S", "H100"])
def test_the_kernels_compile_for_each_device_class(sm, monkeypatch, kernel_cache):
    """The CUDA source compiles (no GPU needed) and the cubin holds every entry the launcher
    looks up: a compile error or a missing entry shows here, not first on a device."""
    monkeypatch.setenv("EDGELLM_KERNEL_CACHE", str(kernel_cache))
    cubin = w4a16_cuda.compile_cubin(sm)
    assert cubin[:4] == b"\x7fELF"
    names = _launch_entries()  # (the bulk ones empty below SM 9.0: the launcher takes them only on 9.0+)
    names += ["w4a16_mma_dequant", "w4a16_mma_repack", "w4a16_mma_pack_scales"]
    missing = [name for name in names if name.encode() + b"\0" not in cubin]
    assert not missing, f"sm_{sm}: no {missing}"


# The cubin's per-function resource records: the ELF section ".nv.info" holds attribute records
# (format byte, attribute byte, 16-bit size, then for format 4 `size` bytes of data); for the two
# read here the data is (symbol index, value). pyelftools reads the ELF but not these records.
EIATTR_FRAME_SIZE, EIATTR_REGCOUNT = 0x11, 0x2F


def _function_resources(cubin: bytes) -> dict[str, dict[int, int]]:
    """{function name: {attribute: value}} for EIATTR_FRAME_SIZE and EIATTR_REGCOUNT."""
    import struct

    (shoff,) = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]

    def cstring(offset: int) -> str:
        return cubin[offset:cubin.index(b"\0", offset)].decode()

    names = {cstring(headers[shstrndx][4] + h[0]): h for h in headers}
    symtab, strtab, info = names[".symtab"], names[".strtab"], names[".nv.info"]
    symbols = [cstring(strtab[4] + struct.unpack_from("<I", cubin, symtab[4] + 24 * i)[0])
               for i in range(symtab[5] // 24)]
    found: dict[str, dict[int, int]] = {}
    data, i = cubin[info[4]:info[4] + info[5]], 0
    while i + 4 <= len(data):
        fmt, attr, size = data[i], data[i + 1], struct.unpack_from("<H", data, i + 2)[0]
        if fmt == 4:
            if attr in (EIATTR_FRAME_SIZE, EIATTR_REGCOUNT):
                symbol, value = struct.unpack_from("<II", data, i + 4)
                found.setdefault(symbols[symbol], {})[attr] = value
            i += 4 + size
        else:
            i += 4
    return found


@needs_nvrtc
@pytest.mark.parametrize("sm", [87, 89, 90], ids=["Orin", "L40S", "H100"])
def test_no_kernel_spills_and_the_bulk_kernel_keeps_three_blocks_per_sm(sm, monkeypatch, kernel_cache):
    """No entry keeps a stack frame (registers spilled to local memory, which ptxas does quietly
    when a change needs more registers than the launch bounds allow; each device class compiles
    the same source differently), and on sm_90, where decode runs the bulk kernel, its entries use
    at most 72 registers, so that 3 blocks of BULK_WARPS + 1 warps fit an SM's 64 K registers
    (allocated 8 per thread at a time: 80 x 32 x 27 > 65536), which pick_bulk_config counts on
    for large weights (below SM 9.0 they are empty)."""
    monkeypatch.setenv("EDGELLM_KERNEL_CACHE", str(kernel_cache))
    resources = _function_resources(w4a16_cuda.compile_cubin(sm))
    entries = _launch_entries()
    assert set(entries) <= set(resources), f"no resource records for {sorted(set(entries) - set(resources))}"
    spilled = {name: r[EIATTR_FRAME_SIZE] for name, r in resources.items() if r.get(EIATTR_FRAME_SIZE)}
    assert not spilled, f"sm_{sm}: stack frames (spilled registers), bytes: {spilled}"
    if sm < 90:
        return
    threads = 32 * (w4a16_cuda.BULK_WARPS + 1)
    for name in w4a16_cuda.BULK_ENTRIES:
        registers = resources[name][EIATTR_REGCOUNT]
        assert 0 < registers <= 72 and -(-registers // 8) * 8 * threads * 3 <= 65536, (name, registers)
