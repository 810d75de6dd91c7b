"""decode_attention_rope (engine/kernels/decode_attention.py): a decode step's rotary embedding,
KV-cache write, flash-decoding splits and their merge in one kernel, checked for

(a) the output against a float64 reference (q roped by model.apply_rope, softmax over the
    row's cache up to and including the new token): relative Frobenius error < 2e-3 (fp16
    q, fp16 probabilities into P @ V and the fp16 output give up to ~6e-4 in the
    interpreter; a wrong head, position or chunk gives errors of order 0.1 to 1);
(b) the caches: bit for bit what fused.rope_and_write_kv writes, nothing else touched
    (compared as int16 bit patterns; the cache past each row's position, the new token's
    entry included, is NaN before the call, so reading anything unwritten poisons the output);
(c) the merge counters, all zero again afterwards;
(d) a second call with the same inputs gives the same bits (the merge adds the chunks in a
    fixed order whichever program does it);

plus CUDA-graph replay with new positions, and the cross-program merge under load with
NaN-poisoned partials. The last test runs the same checks in Triton's interpreter on the CPU
when TRITON_INTERPRET=1 (and Triton imports); it is skipped otherwise.
"""

import math
import os

import pytest
import torch

from edgellm.engine import kernels

REL_TOL = 2e-3

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or not kernels.available(), reason="needs CUDA and Triton")


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and _has_triton()


needs_interpreter = pytest.mark.skipif(
    not _interpreting(), reason="runs in Triton's interpreter: set TRITON_INTERPRET=1 with Triton importable")


def _rope_tables(hq: int, hkv: int, d: int, s_max: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    from edgellm.engine.config import ModelConfig
    from edgellm.engine.model import rope_cos_sin

    config = ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=256, hidden_size=hq * d, intermediate_size=64, num_layers=1,
        num_heads=hq, num_kv_heads=hkv, head_dim=d, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        max_position_embeddings=s_max, tie_word_embeddings=False, attention_bias=False, hidden_act="silu",
        bos_token_id=1, eos_token_ids=(2,),
    )
    cos, sin = rope_cos_sin(config, s_max)
    return cos.to(device), sin.to(device)


def _inputs(hq, hkv, d, s_max, slot_list, pos_list, device, rows=4, seed=0):
    """qkv [B, (Hq + 2 Hkv) * D], positions [B], slots [B] and random caches whose entries
    at and past each row's position are NaN."""
    gen = torch.Generator().manual_seed(seed)
    b = len(slot_list)
    qkv = (torch.randn(b, (hq + 2 * hkv) * d, generator=gen) * 2).half().to(device)
    k_cache = torch.randn(rows, hkv, s_max, d, generator=gen).half().to(device)
    v_cache = torch.randn(rows, hkv, s_max, d, generator=gen).half().to(device)
    slots = torch.tensor(slot_list, device=device)
    positions = torch.tensor(pos_list, device=device)
    for i in range(b):
        k_cache[slot_list[i], :, pos_list[i]:] = float("nan")
        v_cache[slot_list[i], :, pos_list[i]:] = float("nan")
    return qkv, positions, slots, k_cache, v_cache


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


def _reference(qkv, positions, slots, cos, sin, k_cache, v_cache, hq, hkv, scale) -> torch.Tensor:
    """float64 attention of the roped q over caches that already hold the new token."""
    from edgellm.engine.model import apply_rope

    b, d = qkv.shape[0], k_cache.shape[-1]
    q = apply_rope(qkv[:, :hq * d].double().view(b, 1, hq, d), cos[positions][:, None].double(),
                   sin[positions][:, None].double())[:, 0]
    out = torch.empty(b, hq, d, dtype=torch.float64, device=qkv.device)
    for i in range(b):
        n = int(positions[i]) + 1
        k = k_cache[slots[i], :, :n].double().repeat_interleave(hq // hkv, 0)  # [Hq, n, D]
        v = v_cache[slots[i], :, :n].double().repeat_interleave(hq // hkv, 0)
        p = torch.softmax((q[i][:, None, :] @ k.transpose(1, 2)) * scale, dim=-1)
        out[i] = (p @ v)[:, 0]
    return out


def _check(hq, hkv, d, s_max, slot_list, pos_list, splits, device, seed=0, min_chunk=None) -> float:
    """Runs decode_attention_rope twice on copies of the same caches and checks (a)-(d);
    returns the relative error."""
    from edgellm.engine.kernels import fused
    from edgellm.engine.kernels.decode_attention import decode_attention_rope
    from edgellm.engine.model import apply_rope

    cos, sin = _rope_tables(hq, hkv, d, s_max, device)
    qkv, positions, slots, k_cache, v_cache = _inputs(hq, hkv, d, s_max, slot_list, pos_list, device, seed=seed)
    b, scale = len(slot_list), 1 / math.sqrt(d)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    fused.rope_and_write_kv(qkv, positions[:, None], slots, cos, sin, k_expected, v_expected, hq, hkv)
    # The k rope itself, against the model's reference (rope_and_write_kv's own test covers it too).
    k_new = torch.stack([k_expected[slots[i], :, positions[i]] for i in range(b)])
    k_ref = apply_rope(qkv[:, hq * d:(hq + hkv) * d].float().view(b, 1, hkv, d), cos[positions][:, None],
                       sin[positions][:, None])[:, 0]
    assert _rel_err(k_new, k_ref.double()) < 1e-3
    ref = _reference(qkv, positions, slots, cos, sin, k_expected, v_expected, hq, hkv, scale)

    counters = torch.zeros(b * hkv + 5, dtype=torch.int32, device=device)  # larger than needed, as a caller may
    outs = []
    for trial in range(2):
        k, v = k_cache.clone(), v_cache.clone()
        out = torch.full((b, hq, d), float("nan"), dtype=torch.float16, device=device)
        pos_arg = positions if trial == 0 else positions[:, None]  # [B] and [B, 1] alike
        ret = decode_attention_rope(qkv, pos_arg, slots, cos, sin, k, v, hq, hkv, scale, counters, splits=splits, out=out,
                                    min_chunk=min_chunk)
        assert ret is out
        err = _rel_err(out, ref)
        print(f"decode_attention_rope Hq={hq} Hkv={hkv} D={d} S_max={s_max} slots={slot_list} positions={pos_list} "
              f"splits={splits} min_chunk={min_chunk} call {trial}: rel err {err:.2e}")
        assert torch.isfinite(out).all(), "unwritten output, or a NaN entry of the cache was read"  # (a)
        assert err < REL_TOL
        assert _same_bits(k, k_expected) and _same_bits(v, v_expected), "caches differ from rope_and_write_kv's"  # (b)
        assert torch.count_nonzero(counters).item() == 0, f"counters left at {counters.tolist()}"  # (c)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]), "a second call gave other bits"  # (d)
    return err


CASES = [
    # hq, hkv, d, s_max, slots, positions, splits (None: pick_splits')
    (32, 8, 128, 4096, [1, 3, 0], [0, 777, 4095], None),  # Llama 8B shapes, positions 0 .. S_max - 1
    (32, 8, 64, 2048, [2, 0], [130, 2047], 32),  # Llama 1B shapes: 3 and 32 chunks of 64
    (32, 8, 128, 256, [1, 0], [5, 255], 1),  # one split: no partials, no counters
    (4, 4, 64, 300, [2, 1, 0], [0, 64, 299], 5),  # MHA; a row in the first chunk; a position on a chunk boundary
    (8, 2, 128, 1024, [1, 2], [1000, 40], 8),  # GQA 4; chunks of 128 and one chunk of 64
    (8, 2, 64, 512, [3], [200], None),  # B = 1
    (28, 4, 128, 3000, [0, 1], [2999, 65], None),  # GQA 7 (Qwen-like): padded head rows, S_max not a power of two
    (32, 1, 128, 8192, [0], [8000], 128),  # MQA, 126 chunks of 64: the merge runs over several blocks of chunks
    (32, 8, 128, 4096, [0], [4095], 3),  # splits not a power of two: chunks of 1408, 1408 and 1280
]


@pytest.mark.gpu
@needs_gpu
def test_decode_attention_rope_min_chunk():
    """Chunks of at least 256: 16 chunks for 4096 positions, 4 for 1000, 1 for 100."""
    _check(32, 8, 128, 4096, [0, 1, 2], [4095, 999, 99], 16, "cuda", seed=9, min_chunk=256)


@pytest.mark.parametrize("hq,hkv,d,s_max,slot_list,pos_list,splits", CASES)
@pytest.mark.gpu
@needs_gpu
def test_decode_attention_rope_matches_reference(hq, hkv, d, s_max, slot_list, pos_list, splits):
    _check(hq, hkv, d, s_max, slot_list, pos_list, splits, "cuda", seed=hq + d + s_max)


@pytest.mark.gpu
@needs_gpu
def test_decode_attention_rope_merge_sees_every_partial():
    """2048 programs (64 splits per row and kv head) finishing in any order: the partials
    are NaN before every call, so a merge that read one before its program had stored it
    gives NaN; a lost or doubled count gives a missing output or a counter left non-zero."""
    from edgellm.engine.kernels.decode_attention import decode_attention_rope

    hq, hkv, d, s_max, splits = 32, 8, 128, 4096, 64
    slot_list, pos_list = [0, 1, 2, 3], [4095, 2000, 64, 3333]
    b = len(slot_list)
    cos, sin = _rope_tables(hq, hkv, d, s_max, "cuda")
    qkv, positions, slots, k_cache, v_cache = _inputs(hq, hkv, d, s_max, slot_list, pos_list, "cuda", seed=3)
    scale = d ** -0.5
    counters = torch.zeros(b * hkv, dtype=torch.int32, device="cuda")
    partials = torch.empty(b * hq * splits * (d + 2), dtype=torch.float32, device="cuda")
    out = torch.empty(b, hq, d, dtype=torch.float16, device="cuda")
    first = None
    for i in range(50):
        partials.fill_(float("nan"))
        out.fill_(float("nan"))
        # Rewriting the new token's k and v each time writes the same bits: the caches need no reset.
        decode_attention_rope(qkv, positions, slots, cos, sin, k_cache, v_cache, hq, hkv, scale, counters,
                              partials=partials, splits=splits, out=out)
        assert torch.isfinite(out).all(), f"call {i}: NaN or unwritten output"
        assert torch.count_nonzero(counters).item() == 0, f"call {i}: counters left at {counters.tolist()}"
        if first is None:
            ref = _reference(qkv, positions, slots, cos, sin, k_cache, v_cache, hq, hkv, scale)
            err = _rel_err(out, ref)
            print(f"merge under load: rel err {err:.2e}")
            assert err < REL_TOL
            first = out.clone()
        else:
            assert torch.equal(out, first), f"call {i} differs from the first"


@pytest.mark.gpu
@needs_gpu
def test_decode_attention_rope_replays_in_a_cuda_graph():
    """Captured once (scratch from the graph's pool, early start on as the engine captures),
    replayed with new positions and inputs: the same bits as eager calls, counters zero."""
    from edgellm.engine.kernels import pdl
    from edgellm.engine.kernels.decode_attention import decode_attention_rope

    hq, hkv, d, s_max = 32, 8, 128, 2048
    slot_list = [2, 0, 3]
    b = len(slot_list)
    cos, sin = _rope_tables(hq, hkv, d, s_max, "cuda")
    gen = torch.Generator().manual_seed(11)
    k_base = torch.randn(4, hkv, s_max, d, generator=gen).half().cuda()
    v_base = torch.randn(4, hkv, s_max, d, generator=gen).half().cuda()
    slots = torch.tensor(slot_list, device="cuda")
    positions = torch.tensor([[10], [1500], [0]], device="cuda")  # [B, 1], as the engine's decode step has them
    qkv = torch.randn(b, (hq + 2 * hkv) * d, device="cuda").half()
    k_graph, v_graph = k_base.clone(), v_base.clone()
    counters = torch.zeros(b * hkv, dtype=torch.int32, device="cuda")
    scale = d ** -0.5

    def step(k, v):
        return decode_attention_rope(qkv, positions, slots, cos, sin, k, v, hq, hkv, scale, counters)

    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with pdl.early_starts():
        with torch.cuda.stream(stream):
            step(k_graph, v_graph)  # warm-up: compile
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            out_graph = step(k_graph, v_graph)

    for trial, pos in enumerate([[[10], [1500], [0]], [[700], [2047], [127]], [[1410], [128], [1]]]):
        positions.copy_(torch.tensor(pos))
        qkv.copy_(torch.randn_like(qkv))
        k_graph.copy_(k_base)
        v_graph.copy_(v_base)
        out_graph.fill_(float("nan"))
        graph.replay()
        k_eager, v_eager = k_base.clone(), v_base.clone()
        eager = step(k_eager, v_eager)
        torch.cuda.synchronize()
        ref = _reference(qkv, positions[:, 0], slots, cos, sin, k_eager, v_eager, hq, hkv, scale)
        err = _rel_err(out_graph, ref)
        diff = (out_graph.float() - eager.float()).abs().max().item()
        print(f"graph replay {trial} positions {pos}: rel err {err:.2e}, max |replay - eager| = {diff:.2e}")
        assert torch.isfinite(out_graph).all() and err < REL_TOL
        assert torch.equal(out_graph, eager), "replay and eager call differ"
        assert _same_bits(k_graph, k_eager) and _same_bits(v_graph, v_eager)
        assert torch.count_nonzero(counters).item() == 0


INTERPRETER_CASES = [
    (8, 2, 64, 512, [2, 0], [130, 511], 8),  # 3 and 8 chunks of 64, GQA 4
    (4, 4, 64, 300, [2, 1, 0], [0, 64, 299], 5),  # MHA, position 0, a chunk boundary
    (32, 1, 64, 1024, [1], [1000], 16),  # MQA: the merge runs over 4 blocks of chunks
    (8, 2, 128, 256, [3, 1], [255, 17], 1),  # one split: no partials, no counters
    (8, 2, 64, 1024, [0, 1], [1023, 300], 3),  # 3 splits: chunks of 384 (6 tiles each) and of 128
]


@needs_interpreter
def test_decode_attention_rope_min_chunk_in_the_interpreter():
    """8 splits, chunks of at least 256: 4 chunks for 1024 positions, 2 for 301."""
    _check(8, 2, 64, 1024, [0, 1], [1023, 300], 8, "cpu", seed=5, min_chunk=256)


@pytest.mark.parametrize("hq,hkv,d,s_max,slot_list,pos_list,splits", INTERPRETER_CASES)
@needs_interpreter
def test_decode_attention_rope_in_the_interpreter(hq, hkv, d, s_max, slot_list, pos_list, splits):
    """The same checks on the CPU (the interpreter runs programs one after another, so this
    covers the indexing, masks and merge arithmetic, not the concurrency)."""
    _check(hq, hkv, d, s_max, slot_list, pos_list, splits, "cpu", seed=hq + d)


@pytest.mark.skipif(not _has_triton(), reason="needs Triton (the checks run before any launch)")
def test_decode_attention_rope_rejects_bad_arguments():
    from edgellm.engine.kernels.decode_attention import decode_attention_rope

    hq, hkv, d, s_max = 8, 2, 64, 256
    cos, sin = _rope_tables(hq, hkv, d, s_max, "cpu")
    qkv, positions, slots, k_cache, v_cache = _inputs(hq, hkv, d, s_max, [0, 1], [3, 4], "cpu")
    counters = torch.zeros(2 * hkv, dtype=torch.int32)
    with pytest.raises(ValueError, match="counters"):
        decode_attention_rope(qkv, positions, slots, cos, sin, k_cache, v_cache, hq, hkv, 0.1, counters[:3])
    with pytest.raises(ValueError, match="qkv"):
        decode_attention_rope(qkv[:, :-d], positions, slots, cos, sin, k_cache, v_cache, hq, hkv, 0.1, counters)
    with pytest.raises(ValueError, match="positions"):
        decode_attention_rope(qkv, positions[:1], slots, cos, sin, k_cache, v_cache, hq, hkv, 0.1, counters)
    with pytest.raises(ValueError, match="partials"):
        decode_attention_rope(qkv, positions, slots, cos, sin, k_cache, v_cache, hq, hkv, 0.1, counters,
                              partials=torch.empty(10), splits=4)
    with pytest.raises(ValueError, match="splits"):
        decode_attention_rope(qkv, positions, slots, cos, sin, k_cache, v_cache, hq, hkv, 0.1, counters, splits=0)


def test_the_splits_keep_the_same_kv_tile_bytes_per_sm(monkeypatch):
    """pick_splits: at most 256 / head_dim programs per SM (2 at head dim 128, 4 at 64), never more
    chunks than the cache has tiles; EDGELLM_ATTN_PROGRAMS_PER_SM overrides the programs per SM."""
    from edgellm.engine.kernels.decode_attention import pick_splits

    monkeypatch.delenv("EDGELLM_ATTN_PROGRAMS_PER_SM", raising=False)
    # 8 kv heads on 132 SMs: 8B (head dim 128) and 1B (64) shapes, cache of 4096
    assert [pick_splits(b, 8, 4096, 132, 64, 128) for b in (1, 2, 4, 8)] == [32, 16, 8, 4]
    assert [pick_splits(b, 8, 4096, 132, 64, 64) for b in (1, 2, 4, 8)] == [64, 32, 16, 8]
    assert pick_splits(1, 8, 256, 132, 64, 64) == 4  # a 256-position cache has 4 tiles of 64
    assert pick_splits(64, 8, 4096, 132, 64, 128) == 1
    monkeypatch.setenv("EDGELLM_ATTN_PROGRAMS_PER_SM", "1")
    assert [pick_splits(b, 8, 4096, 132, 64, 128) for b in (1, 4)] == [16, 4]
