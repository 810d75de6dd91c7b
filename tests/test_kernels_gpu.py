"""GPU kernels against float32 references: W4A16 linear, dequantization, decode attention,
and CUDA-graph capture/replay of both.

Error thresholds (relative Frobenius error, ||out - ref|| / ||ref||):
* The Triton tensor-core path rounds each dequantized weight to fp16 (as an fp16 model would,
  ~2^-12 relative each, averaging out over K) and the result to fp16 (~2^-12): ~3e-4.
* The CUDA-core gemv path (M = 1) also rounds the weight * x products and their sums of 8
  to fp16 before accumulating in fp32: ~1e-3.
* Decode attention: fp16 probabilities into the P @ V product: ~1e-3.
* The NVRTC tensor-core kernel multiplies exact q - zero by x in fp32 and scales each
  64-wide chunk's sum: only the fp16 result rounds.
A wrong group, nibble or row gives errors of order 1, so 5e-3 separates bugs from rounding
with room to spare. NaN never passes (the comparison with NaN is False), and outputs are
poisoned with NaN before each run so that an unwritten element fails.
"""


import pytest
import torch

from edgellm.engine import kernels, quant

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or not kernels.available(), reason="needs CUDA and Triton"),
]

REL_TOL = 5e-3
_quantized: dict = {}


def _weights(n: int, k: int, g: int, seed: int = 0) -> quant.QuantizedWeight:
    """Random weights quantized on the CPU (quant.quantize), moved to the GPU; cached per shape."""
    key = (n, k, g, seed)
    if key not in _quantized:
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(n, k, generator=gen) * 0.02
        qw = quant.quantize(w, g)
        _quantized[key] = quant.QuantizedWeight(qw.qweight.cuda(), qw.scales.cuda(), qw.zeros.cuda(), g)
    return _quantized[key]


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def _poisoned(*shape) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=torch.float16, device="cuda")


@pytest.mark.parametrize(
    "n,k,g",
    [(6144, 2048, 128), (2048, 8192, 128), (4096, 4096, 64), (2048, 2048, 32), (1000, 4096, 128), (3000, 1536, 64)],
)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 16, 77, 512])
def test_w4a16_matches_dequantized_reference(n, k, g, m):
    from edgellm.engine.kernels.w4a16 import w4a16_linear

    qw = _weights(n, k, g)
    w_ref = qw.dequantize(torch.float32)
    torch.manual_seed(1000 * m + n)
    bias = torch.randn(n, device="cuda").half() if n % 3 == 0 else None
    for trial in range(2):  # fresh inputs each time; the second call also reuses the split-K workspace
        x = torch.randn(m, k, device="cuda").half()
        ref = x.float() @ w_ref.t()
        if bias is not None:
            ref += bias.float()
        out = _poisoned(m, n)
        w4a16_linear(x, qw.qweight, qw.scales, qw.zeros, g, bias, out=out)
        err = _rel_err(out, ref)
        print(f"w4a16 M={m} N={n} K={k} G={g} bias={bias is not None} trial={trial}: rel err {err:.2e}")
        assert torch.isfinite(out).all(), "unwritten or non-finite output"
        assert err < REL_TOL


@pytest.mark.parametrize("kind,m", [("gemv", 1), ("gemv", 2), ("gemv", 3), ("mma", 1), ("mma", 4), ("dense", 77)])
def test_w4a16_every_kernel_kind(kind, m):
    """Each kernel the config table can pick, forced, incl. split-K on a ragged N."""
    from edgellm.engine.kernels.w4a16 import W4A16Config, w4a16_linear

    n, k, g = 1000, 2048, 64
    qw = _weights(n, k, g, seed=1)
    x = torch.randn(m, k, device="cuda").half()
    ref = x.float() @ qw.dequantize(torch.float32).t()
    configs = {
        "gemv": W4A16Config("gemv", block_m=1 if m == 1 else (2 if m == 2 else 4), block_n=64, block_k=128,
                            split_k=4, num_stages=1),
        "mma": W4A16Config("mma", block_m=16, block_n=64, block_k=128, split_k=8),
        "dense": W4A16Config("dense"),
    }
    out = _poisoned(m, n)
    w4a16_linear(x, qw.qweight, qw.scales, qw.zeros, g, config=configs[kind], out=out)
    err = _rel_err(out, ref)
    print(f"w4a16 {kind} M={m}: rel err {err:.2e}")
    assert torch.isfinite(out).all() and err < REL_TOL


def test_split_k_workspace_is_left_clean():
    from edgellm.engine.kernels import w4a16

    qw = _weights(2048, 8192, 128)
    x = torch.randn(1, 8192, device="cuda").half()
    a = w4a16.w4a16_linear(x, qw.qweight, qw.scales, qw.zeros, 128)
    b = w4a16.w4a16_linear(x, qw.qweight, qw.scales, qw.zeros, 128)
    torch.cuda.synchronize()
    acc, tickets = w4a16._workspaces[x.device]
    assert acc.abs().max().item() == 0 and tickets.abs().max().item() == 0
    # fp32 atomics add in any order: equal up to a last-bit difference after fp16 rounding
    torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-4)


def test_dequantize_fp16_is_exact():
    from edgellm.engine.kernels.w4a16 import dequantize_fp16

    for n, k, g in [(6144, 2048, 128), (1000, 4096, 32), (3000, 1536, 64)]:
        qw = _weights(n, k, g)
        w = dequantize_fp16(qw.qweight, qw.scales, qw.zeros, g)
        # (q - zero) * scale is exact in fp32; the kernel rounds it to fp16 once
        assert torch.equal(w, qw.dequantize(torch.float32).half())


def test_cuda_graph_replay_matches_eager():
    from edgellm.engine.kernels.w4a16 import w4a16_linear

    n, k, g = 6144, 2048, 128
    qw = _weights(n, k, g)
    x1 = torch.randn(1, k, device="cuda").half()  # M = 1: gemv, split-K
    x4 = torch.randn(4, k, device="cuda").half()  # M = 4: tensor cores

    def step():
        y1 = w4a16_linear(x1, qw.qweight, qw.scales, qw.zeros, g)
        y4 = w4a16_linear(x4, qw.qweight, qw.scales, qw.zeros, g)
        return y1, y4

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up: compile, workspace
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()

    for trial in range(3):
        x1.copy_(torch.randn_like(x1))
        x4.copy_(torch.randn_like(x4))
        for t in outs:
            t.fill_(float("nan"))
        graph.replay()
        eager = step()
        torch.cuda.synchronize()
        for name, r, e in zip(("w4a16 M=1", "w4a16 M=4"), outs, eager):
            diff = (r.float() - e.float()).abs().max().item()
            print(f"graph replay {trial} {name}: max |replay - eager| = {diff:.2e}")
            assert torch.isfinite(r).all()
            # Split-K sums are fp32 atomics in any order: a last-bit difference after rounding.
            torch.testing.assert_close(r, e, rtol=2e-3, atol=1e-4)


# ---- fused per-layer kernels (engine/kernels/fused.py) against the model's reference code ----


@pytest.mark.parametrize("rows,d", [(1, 2048), (4, 4096), (77, 3000)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm_matches_reference(rows, d, with_residual):
    from edgellm.engine.kernels import fused
    from edgellm.engine.model import RMSNorm

    torch.manual_seed(rows + d)
    x = torch.randn(rows, d, device="cuda").half()
    residual = torch.randn(rows, d, device="cuda").half() if with_residual else None
    norm = RMSNorm(d, 1e-5).cuda()
    norm.weight.data = (torch.rand(d, device="cuda") + 0.5)
    total_ref = x.float() + residual.float() if with_residual else x.float()
    normed_ref, _ = norm(total_ref.half().float())  # the reference on the fp16-rounded sum, in fp32
    normed, total = fused.add_rms_norm(x, residual, norm.weight.half(), 1e-5)
    err_n, err_t = _rel_err(normed, normed_ref), _rel_err(total, total_ref)
    print(f"add_rms_norm rows={rows} d={d} residual={with_residual}: rel err {err_n:.2e} (sum {err_t:.2e})")
    assert err_n < REL_TOL and err_t < REL_TOL


def test_silu_mul_matches_reference():
    from edgellm.engine.kernels import fused

    torch.manual_seed(3)
    gate_up = torch.randn(5, 2 * 14336, device="cuda").half()
    gate, up = gate_up.float().split(14336, dim=-1)
    ref = torch.nn.functional.silu(gate) * up
    err = _rel_err(fused.silu_mul(gate_up), ref)
    print(f"silu_mul: rel err {err:.2e}")
    assert err < REL_TOL


@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 128), (32, 8, 64), (12, 12, 64)])
@pytest.mark.parametrize(
    "slot_list,position_rows",
    [([3, 0], [[1000, 1001, 1002], [0, 1, 2]]),  # two rows of three tokens
     ([2], [list(range(9))]),  # prefill: one row (slot 2), nine tokens
     ([1, 3, 0], [[5], [700], [0]])],  # decode: three rows, one token each
    ids=["2x3", "prefill", "decode"],
)
def test_rope_and_write_kv_matches_reference(hq, hkv, d, slot_list, position_rows):
    """Roped q returned, roped k and plain v at exactly each token's (slot, position); nothing else written."""
    from edgellm.engine.config import ModelConfig
    from edgellm.engine.kernels import fused
    from edgellm.engine.model import apply_rope, rope_cos_sin

    torch.manual_seed(hq * d)
    config = ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=256, hidden_size=hq * d, intermediate_size=64, num_layers=1,
        num_heads=hq, num_kv_heads=hkv, head_dim=d, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        max_position_embeddings=4096, tie_word_embeddings=False, attention_bias=False, hidden_act="silu", bos_token_id=1,
        eos_token_ids=(2,),
    )
    s_max, rows = 1024, 4
    cos, sin = (t.cuda() for t in rope_cos_sin(config, s_max))
    slots = torch.tensor(slot_list, device="cuda")
    positions = torch.tensor(position_rows, device="cuda")
    b, t = positions.shape
    qkv = torch.randn(b * t, (hq + 2 * hkv) * d, device="cuda").half()
    k_cache = _poisoned(rows, hkv, s_max, d)
    v_cache = _poisoned(rows, hkv, s_max, d)
    q = fused.rope_and_write_kv(qkv, positions, slots, cos, sin, k_cache, v_cache, hq, hkv)
    qf, kf, vf = qkv.view(b, t, -1).float().split([hq * d, hkv * d, hkv * d], dim=-1)
    c, s = cos[positions], sin[positions]
    q_ref = apply_rope(qf.view(b, t, hq, d), c, s)
    k_ref = apply_rope(kf.view(b, t, hkv, d), c, s)
    err_q = _rel_err(q.view(b, t, hq, d), q_ref)
    written_k = torch.stack([k_cache[slots[i], :, positions[i]].transpose(0, 1) for i in range(b)])
    written_v = torch.stack([v_cache[slots[i], :, positions[i]].transpose(0, 1) for i in range(b)])
    err_k = _rel_err(written_k, k_ref)
    print(f"rope_and_write_kv Hq={hq} Hkv={hkv} D={d}: rel err q {err_q:.2e}, k {err_k:.2e}")
    assert err_q < REL_TOL and err_k < REL_TOL
    assert torch.equal(written_v, vf.view(b, t, hkv, d).half()), "v is copied into the cache unchanged"
    written = (~torch.isnan(k_cache)).any(-1).sum().item() + (~torch.isnan(v_cache)).any(-1).sum().item()
    assert written == 2 * b * t * hkv, "only the tokens' own cache rows are written"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("rows,vocab", [(1, 128256), (4, 32000), (3, 4097)])
def test_greedy_argmax_matches_torch(rows, vocab, dtype):
    from edgellm.engine.kernels.argmax import argmax_rows

    torch.manual_seed(rows)
    logits = torch.randn(rows, vocab, device="cuda", dtype=dtype)
    logits[0, vocab // 3] = logits[0, vocab - 1] = logits[0].max() + 1  # a tie across blocks: the first wins
    assert torch.equal(argmax_rows(logits), logits.argmax(dim=-1))


def test_greedy_argmax_written_to_host_memory_in_turn():
    """ArgmaxOut with a pinned host buffer: replay k of a graph writes its tokens into host row
    k % 2 and counts the write on the device; the other row keeps the previous replay's tokens."""
    from edgellm.engine.kernels.argmax import ArgmaxOut, argmax_rows

    rows, vocab = 3, 128256
    logits = torch.randn(rows, vocab, device="cuda").half()
    host = torch.full((2, 8), -1, dtype=torch.long).pin_memory()
    writes = torch.zeros(1, dtype=torch.long, device="cuda")
    tokens = torch.empty(rows, dtype=torch.long, device="cuda")
    out = ArgmaxOut(tokens, host, writes)
    argmax_rows(logits, out=out)  # compiles outside the capture (and writes row 0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        argmax_rows(logits, out=out)
    writes.zero_()
    seen = []
    for k in range(4):
        logits.copy_(torch.randn(rows, vocab, device="cuda").half())
        graph.replay()
        torch.cuda.synchronize()
        want = logits.float().argmax(dim=-1).tolist()
        assert host[k % 2, :rows].tolist() == want and tokens.tolist() == want and writes.item() == k + 1
        if seen:
            assert host[(k + 1) % 2, :rows].tolist() == seen[-1]  # the previous replay's row is untouched
        seen.append(want)
    with pytest.raises(ValueError, match="pinned"):
        argmax_rows(logits, out=ArgmaxOut(tokens, torch.zeros(2, 8, dtype=torch.long), writes))


# ---- the tensor-core kernel in the GPU's own layout (engine/kernels/w4a16_cuda.py) ----


def _mma_or_skip():
    from edgellm.engine.kernels import w4a16_cuda

    ok, why = w4a16_cuda.available()
    if not ok:
        pytest.skip(why)
    return w4a16_cuda


@pytest.mark.parametrize("n,k,g,bias", [(6144, 2048, 128, False), (2048, 8192, 128, True), (4096, 4096, 64, False),
                                        (1000, 4096, 128, False), (3000, 1536, 64, True), (28672, 4096, 128, False),
                                        (40, 256, 256, True)])
@pytest.mark.parametrize("m", [1, 2, 3, 8, 13, 16, 17, 100, 300])
def test_mma_kernel_matches_dequantized_reference(n, k, g, bias, m):
    """N not a multiple of the 16-row tile, K split unevenly over warps, both batch blocks
    (1..16 rows), slices of 16 rows (100) and the dequantize + cuBLAS path (300)."""
    w4a16_cuda = _mma_or_skip()
    qw = _weights(n, k, g)
    packed = w4a16_cuda.MmaWeights.from_rowpacked(qw.qweight, qw.scales, qw.zeros, g)
    w_ref = qw.dequantize(torch.float32)
    torch.manual_seed(n + k + m)
    x = torch.randn(m, k, device="cuda").half()
    b = torch.randn(n, device="cuda").half() if bias else None
    ref = x.float() @ w_ref.t() + (b.float() if bias else 0)
    out = _poisoned(m, n)
    w4a16_cuda.w4a16_mma_linear(x, packed, b, out=out)
    err = _rel_err(out, ref)
    print(f"mma M={m} N={n} K={k} G={g} bias={bias}: rel err {err:.2e}")
    assert torch.isfinite(out).all(), "unwritten or non-finite output"
    assert err < REL_TOL


@pytest.mark.parametrize("g", [64, 128])
@pytest.mark.parametrize("m", [1, 3, 8, 13, 16, 17, 100])
def test_mma_gate_up_kernel_returns_silu_of_gate_times_up(g, m):
    """The fused gate|up projection (rows interleaved at load) gives SiLU(gate) * up of the
    plain projection's fp16 output, as fused.silu_mul computes it: decode (in the kernel's
    epilogue) and prefill (dequantize + cuBLAS) alike, with a bias."""
    w4a16_cuda = _mma_or_skip()
    inter, k = 1024, 2048
    qw = _weights(2 * inter, k, g)
    plain = w4a16_cuda.MmaWeights.from_rowpacked(qw.qweight, qw.scales, qw.zeros, g)
    fused = w4a16_cuda.MmaWeights.from_rowpacked(qw.qweight, qw.scales, qw.zeros, g, gate_up=True)
    torch.manual_seed(m)
    x = torch.randn(m, k, device="cuda").half()
    bias = torch.randn(2 * inter, device="cuda").half()
    gate_up = w4a16_cuda.w4a16_mma_linear(x, plain, bias).float()
    ref = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    out = _poisoned(m, inter)
    w4a16_cuda.w4a16_mma_linear(x, fused, w4a16_cuda.interleave_gate_up(bias), out=out)
    err = _rel_err(out, ref)
    print(f"mma gate|up + SiLU M={m} G={g}: rel err {err:.2e}")
    assert torch.isfinite(out).all(), "unwritten or non-finite output"
    assert err < REL_TOL


@pytest.mark.parametrize("gate_up", [False, True])
@pytest.mark.parametrize("m", [1, 3, 8, 13, 16])
def test_mma_kernel_with_a_norm_folded_in_matches_norm_then_projection(gate_up, m):
    """Fold(in_sumsq): the projection of RMSNorm(h) * weight, given h * weight and h's sums of
    squares (from fused.embed_and_start_folded_norms, h looked up in an embedding table),
    matches the norm (fused.add_rms_norm) followed by the plain projection."""
    from edgellm.engine.kernels import fused as glue

    w4a16_cuda = _mma_or_skip()
    n, k, g, eps = 2048, 4096, 128, 1e-5
    qw = _weights(n, k, g)
    plain = w4a16_cuda.MmaWeights.from_rowpacked(qw.qweight, qw.scales, qw.zeros, g)
    packed = w4a16_cuda.MmaWeights.from_rowpacked(qw.qweight, qw.scales, qw.zeros, g, gate_up=gate_up)
    torch.manual_seed(m)
    table = (torch.randn(100, k, device="cuda") * 3).half()  # embeddings: a residual stream, not unit scale
    tokens = torch.randint(0, 100, (m,), device="cuda")
    h = table[tokens]
    weight = (torch.rand(k, device="cuda") + 0.5).half()
    bias = torch.randn(n, device="cuda").half()
    normed, _ = glue.add_rms_norm(h, None, weight, eps)
    ref = w4a16_cuda.w4a16_mma_linear(normed, plain, bias).float()
    if gate_up:
        ref = torch.nn.functional.silu(ref[:, :n // 2]) * ref[:, n // 2:]
    sumsq = torch.empty(3, m, dtype=torch.float64, device="cuda")
    stream, scaled = glue.embed_and_start_folded_norms(tokens, table, weight, sumsq)
    assert torch.equal(stream, h)
    assert torch.equal(scaled, (h.float() * weight.float()).half())
    assert torch.allclose(sumsq[0].float(), h.float().pow(2).sum(-1), rtol=1e-5) and not sumsq[1:].any()
    out = _poisoned(m, n // 2 if gate_up else n)
    w4a16_cuda.w4a16_mma_linear(scaled, packed, w4a16_cuda.interleave_gate_up(bias) if gate_up else bias, out=out,
                                fold=w4a16_cuda.Fold(in_sumsq=sumsq[0], eps=eps))
    err = _rel_err(out, ref)
    print(f"mma with the norm folded in, M={m} gate_up={gate_up}: rel err {err:.2e} against norm + projection")
    assert torch.isfinite(out).all(), "unwritten or non-finite output"
    assert err < REL_TOL


@pytest.mark.parametrize("m", [1, 5, 8, 16])
@pytest.mark.parametrize("n", [4096, 1000])
def test_mma_kernel_adding_into_the_residual_stream_prepares_the_next_norm(m, n):
    """Fold(add_to_out, out_sumsq, next_weight): the residual stream gets the projection added
    (as fused.add_rms_norm adds: fp16 before and after), bit for bit; the next norm's input
    h * weight bit for bit, and h's sums of squares added to what the buffer held."""
    w4a16_cuda = _mma_or_skip()
    k, g = 2048, 64
    qw = _weights(n, k, g)
    packed = w4a16_cuda.MmaWeights.from_rowpacked(qw.qweight, qw.scales, qw.zeros, g)
    torch.manual_seed(m + n)
    x = torch.randn(m, k, device="cuda").half()
    residual = torch.randn(m, n, device="cuda").half()
    weight = (torch.rand(n, device="cuda") + 0.5).half()
    projected = w4a16_cuda.w4a16_mma_linear(x, packed)
    new_residual = (projected.float() + residual.float()).half()
    sumsq = torch.full((m,), 7.0, dtype=torch.float64, device="cuda")
    scaled = _poisoned(m, n)
    out = residual.clone()
    w4a16_cuda.w4a16_mma_linear(x, packed, out=out, fold=w4a16_cuda.Fold(add_to_out=True, out_sumsq=sumsq,
                                                                           next_weight=weight, scaled=scaled))
    sums_err = ((sumsq - 7.0 - new_residual.float().pow(2).sum(-1)).abs().max() / new_residual.float().pow(2).sum(-1).min()).item()
    print(f"mma adding into the residual, M={m} N={n}: sums of squares rel err {sums_err:.1e}")
    assert torch.equal(out, new_residual)
    assert torch.equal(scaled, (new_residual.float() * weight.float()).half())
    assert sums_err < 1e-5


def test_the_sums_of_squares_are_the_same_from_run_to_run():
    """Each tile adds its rows' sums of squares atomically, in whatever order the blocks finish. In
    fp64 the order moves at most the bits far below fp32's, so the fp32 value the next norm uses
    is the same in twenty runs, here with tiles whose sums span 12 orders of magnitude (in fp32 the
    order changed its last bits, and with them the next norm's scale and, at a near tie, the token)."""
    w4a16_cuda = _mma_or_skip()
    m, n, k = 8, 4096, 4096
    qw = _weights(n, k, 128)
    packed = w4a16_cuda.MmaWeights.from_rowpacked(qw.qweight, qw.scales, qw.zeros, 128)
    torch.manual_seed(5)
    x = torch.randn(m, k, device="cuda").half()
    residual = (torch.randn(m, n, device="cuda") * torch.logspace(-3, 3, n, device="cuda")).half()  # a wide spread
    weight = (torch.rand(n, device="cuda") + 0.5).half()
    runs = []
    for _ in range(20):
        sums = torch.zeros(m, dtype=torch.float64, device="cuda")
        w4a16_cuda.w4a16_mma_linear(x, packed, out=residual.clone(), fold=w4a16_cuda.Fold(
            add_to_out=True, out_sumsq=sums, next_weight=weight, scaled=torch.empty(m, n, dtype=torch.float16, device="cuda")))
        runs.append(sums)
    distinct = {tuple(r.float().tolist()) for r in runs}  # what the next projection's epilogue reads
    print(f"sums of squares over 20 runs: {len(distinct)} distinct result(s), e.g. {runs[0][:2].tolist()}")
    assert len(distinct) == 1


def test_mma_layout_is_the_same_on_the_gpu_and_dequantizes_exactly():
    """to_mma_layout on the GPU equals the CPU's; its fp16 dequantization equals the row-packed one bit for bit."""
    from edgellm.engine.kernels.w4a16 import dequantize_fp16

    w4a16_cuda = _mma_or_skip()
    qw = _weights(3000, 1536, 64)
    packed = w4a16_cuda.MmaWeights.from_rowpacked(qw.qweight, qw.scales, qw.zeros, 64)
    assert torch.equal(packed.qweight.cpu(), w4a16_cuda.to_mma_layout(qw.qweight.cpu()))
    assert torch.equal(packed.scale_zero.cpu(), w4a16_cuda.pack_scales(qw.scales.cpu(), qw.zeros.cpu()))
    dense = w4a16_cuda.dequantize_mma(packed)
    assert torch.equal(dense, dequantize_fp16(qw.qweight, qw.scales, qw.zeros, 64))


@pytest.mark.parametrize("n,k", [(16, 64), (24, 192), (1, 128), (2050, 4096)])
def test_repack_kernel_writes_the_mma_layout(n, k):
    """The load-time repack kernel gives to_mma_layout's words, all 32 bits of every word
    (random words: every nibble value at every position), rows past N zero."""
    w4a16_cuda = _mma_or_skip()
    gen = torch.Generator().manual_seed(n * 7 + k)
    qweight = torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int64, generator=gen).to(torch.int32)
    on_gpu = w4a16_cuda.repack_on_gpu(qweight.cuda())
    assert torch.equal(on_gpu.cpu(), w4a16_cuda.to_mma_layout(qweight))


@pytest.mark.parametrize("n,groups", [(16, 1), (24, 3), (1, 2), (2050, 32)])
def test_pack_scales_kernel_writes_pack_scales_words(n, groups):
    """The load-time scale packing kernel gives pack_scales' words: every fp16 scale bit pattern
    kept, the zero terms of both half-tiles for zeros 0..15, rows past N zero."""
    w4a16_cuda = _mma_or_skip()
    gen = torch.Generator().manual_seed(n * 5 + groups)
    scales = torch.randn(n, groups, generator=gen).half()
    zeros = torch.randint(0, 16, (n, groups), generator=gen).half()
    on_gpu = w4a16_cuda.pack_scales_on_gpu(scales.cuda(), zeros.cuda())
    assert torch.equal(on_gpu.cpu(), w4a16_cuda.pack_scales(scales, zeros))


def test_mma_kernel_replays_in_a_cuda_graph():
    w4a16_cuda = _mma_or_skip()
    qw = _weights(4096, 4096, 128)
    packed = w4a16_cuda.MmaWeights.from_rowpacked(qw.qweight, qw.scales, qw.zeros, 128)
    x = torch.randn(4, 4096, device="cuda").half()
    eager = w4a16_cuda.w4a16_mma_linear(x, packed)
    out = torch.empty_like(eager)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w4a16_cuda.w4a16_mma_linear(x, packed, out=out)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)  # no atomics: bit-for-bit


def _mma_configs():
    from edgellm.engine.kernels.w4a16_cuda import MmaConfig

    configs = [MmaConfig(w, stages, early) for w in (1, 2, 4, 8) for stages in (4, 5, 8) for early in (False, True)]
    configs += [MmaConfig(w, stages, early, tiles=2) for w in (1, 4, 8) for stages in (3, 4) for early in (False, True)]
    return configs + [MmaConfig(16, stages, early) for stages in (4, 5) for early in (False, True)] + [
        MmaConfig(16, 3, early, tiles=2) for early in (False, True)]


def _skip_unless_it_fits(w4a16_cuda, config, rows: int, split_group: bool) -> None:
    """A configuration that needs more shared memory per block than this GPU has (an L40S
    allows 99 KB) is refused by w4a16_mma_linear; pick_config never chooses one."""
    need = w4a16_cuda.shared_bytes(config, 1 if rows <= 8 else 2, split_group)
    limit = w4a16_cuda.max_shared_bytes(torch.cuda.current_device())
    if need > limit:
        pytest.skip(f"{config} needs {need} bytes of shared memory per block, this GPU allows {limit}")


@pytest.mark.parametrize("config", _mma_configs(), ids=str)
@pytest.mark.parametrize("n,k,m", [(1000, 4096, 1), (1000, 4096, 8), (2048, 8192, 9), (48, 512, 16), (40, 512, 3)])
def test_mma_kernel_configurations(config, n, k, m):
    """Every K split (chunks per warp from 1 to 128, some warps with fewer chunks than ring
    slots, 16 warps in a 512-thread block), with and without early start, one and two tiles per
    block (1000 and 40 rows: an odd number of tiles, the last block's second tile past N)."""
    w4a16_cuda = _mma_or_skip()
    _skip_unless_it_fits(w4a16_cuda, config, m, False)
    qw = _weights(n, k, 128)
    packed = w4a16_cuda.MmaWeights.from_rowpacked(qw.qweight, qw.scales, qw.zeros, 128)
    torch.manual_seed(m)
    x = torch.randn(m, k, device="cuda").half()
    ref = x.float() @ qw.dequantize(torch.float32).t()
    out = _poisoned(m, n)
    if config.tiles == 2 and m > 8:
        with pytest.raises(ValueError, match="up to 8 rows"):
            w4a16_cuda.w4a16_mma_linear(x, packed, out=out, config=config)
        return
    w4a16_cuda.w4a16_mma_linear(x, packed, out=out, config=config)
    err = _rel_err(out, ref)
    print(f"mma {config} M={m} N={n} K={k}: rel err {err:.2e}")
    assert torch.isfinite(out).all(), "unwritten or non-finite output"
    assert err < REL_TOL


def _epilogue_case(w4a16_cuda, kind: str, m: int, seed: int):
    """Inputs for one W4A16 epilogue (bias, g64, gate_up, norm_in, residual) at m rows, an odd number
    of tiles; returns (run, N, K): run(config) calls the kernel with `config` on fresh outputs
    (poisoned, or the residual stream) and returns (out, sums of squares, the next norm's input)."""
    g = 64 if kind == "g64" else 128
    n, k = (2000, 4096) if kind == "gate_up" else (1000, 4096) if kind != "g64" else (2992, 1536)
    qw = _weights(n, k, g)
    packed = w4a16_cuda.MmaWeights.from_rowpacked(qw.qweight, qw.scales, qw.zeros, g, gate_up=kind == "gate_up")
    torch.manual_seed(m + n + seed)
    x = torch.randn(m, k, device="cuda").half()
    bias = torch.randn(n, device="cuda").half() if kind in ("bias", "gate_up") else None
    if kind == "gate_up":
        bias = w4a16_cuda.interleave_gate_up(bias)
    out_n = n // 2 if kind == "gate_up" else n
    residual = torch.randn(m, n, device="cuda").half()
    weight = (torch.rand(n, device="cuda") + 0.5).half()
    in_sumsq = x.double().pow(2).sum(-1) * 0.7

    def run(config):
        out = residual.clone() if kind == "residual" else _poisoned(m, out_n)
        sums = torch.full((m,), 3.0, dtype=torch.float64, device="cuda")
        scaled = _poisoned(m, n)
        fold = None
        if kind == "norm_in":
            fold = w4a16_cuda.Fold(in_sumsq=in_sumsq, eps=1e-5)
        elif kind == "residual":
            fold = w4a16_cuda.Fold(add_to_out=True, out_sumsq=sums, next_weight=weight, scaled=scaled)
        w4a16_cuda.w4a16_mma_linear(x, packed, bias, out=out, config=config, fold=fold)
        return out, sums, scaled

    return run, n, k


@pytest.mark.parametrize("kind", ["bias", "g64", "gate_up", "norm_in", "residual"])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("warps,stages", [(8, 3), (4, 4), (16, 3)])
def test_two_tile_blocks_write_what_one_tile_blocks_write(kind, m, warps, stages):
    """A block of two tiles (one read of x for both) gives the one-tile kernel's output bit for
    bit: the same sums in the same order per tile. Every epilogue: bias, G = 64 (two scales per
    pair), SiLU(gate) * up, a norm folded in before, the residual add with the next norm's input
    and sums of squares after (added atomically in any order, exactly: fp64). An odd number
    of tiles: the last block's second tile lies past N and must write nothing."""
    w4a16_cuda = _mma_or_skip()
    _skip_unless_it_fits(w4a16_cuda, w4a16_cuda.MmaConfig(warps, stages, tiles=2), m, kind == "g64")
    run, _, _ = _epilogue_case(w4a16_cuda, kind, m, seed=0)
    one = run(w4a16_cuda.MmaConfig(warps, 4))
    two = run(w4a16_cuda.MmaConfig(warps, stages, tiles=2))
    torch.cuda.synchronize()
    print(f"two-tile {kind} M={m} warps {warps} ring {stages}: max |diff| "
          f"{(two[0].float() - one[0].float()).abs().max().item():.1e}")
    assert torch.isfinite(one[0]).all() and torch.equal(two[0], one[0])
    if kind == "residual":
        assert torch.equal(two[2], one[2])
        assert torch.equal(two[1], one[1])


def _bulk_or_skip():
    w4a16_cuda = _mma_or_skip()
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the bulk-streamed W4A16 kernel needs SM 9.0+ (cp.async.bulk)")
    return w4a16_cuda


@pytest.mark.parametrize("early", [False, True], ids=["plain", "early"])
@pytest.mark.parametrize("ks,stages,grid", [(1, 2, 1), (1, 16, 3), (2, 3, 7), (4, 5, 2), (8, 2, 1), (8, 6, 200),
                                            (2, 16, 64)])
@pytest.mark.parametrize("n,k,g,m", [(1000, 4096, 128, 1), (1000, 4096, 128, 8), (40, 1024, 64, 5), (2048, 2048, 256, 3)])
def test_bulk_kernel_configurations(early, ks, stages, grid, n, k, g, m):
    """Every K split, rings of 2..16 stages, grids from one block (every unit through one ring,
    wrapping it many times) to more blocks than units (blocks with nothing to do), N not a
    multiple of a unit's tiles (the last unit's tiles past N store nothing), G = 64 (two groups
    per pair), 128 and 256 (a group spanning stages), with and without early start."""
    w4a16_cuda = _bulk_or_skip()
    config = w4a16_cuda.BulkConfig(ks, stages, grid, early)
    need = w4a16_cuda.bulk_shared_bytes(config, m)
    if need > w4a16_cuda.max_shared_bytes(torch.cuda.current_device()):
        pytest.skip(f"{config} needs {need} bytes of shared memory per block for {m} rows")
    qw = _weights(n, k, g)
    packed = w4a16_cuda.MmaWeights.from_rowpacked(qw.qweight, qw.scales, qw.zeros, g)
    torch.manual_seed(m + ks)
    x = torch.randn(m, k, device="cuda").half()
    ref = x.float() @ qw.dequantize(torch.float32).t()
    out = _poisoned(m, n)
    w4a16_cuda.w4a16_mma_linear(x, packed, out=out, config=config)
    err = _rel_err(out, ref)
    print(f"bulk {config} M={m} N={n} K={k} G={g}: rel err {err:.2e}")
    assert torch.isfinite(out).all(), "unwritten or non-finite output"
    assert err < REL_TOL


@pytest.mark.parametrize("kind", ["bias", "g64", "gate_up", "norm_in", "residual"])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_bulk_kernel_epilogues_agree_with_the_ring_kernel(kind, m):
    """The bulk kernel (what decode runs on SM 9.0+) against the ring kernel, every epilogue: the
    same function up to the order of the fp32 sums (K is split otherwise), so outputs within a
    rounding of fp16, the residual's sums of squares within 1e-4. An odd number of units' tiles."""
    w4a16_cuda = _bulk_or_skip()
    run, n, k = _epilogue_case(w4a16_cuda, kind, m, seed=1)
    sms, dev = kernels.sm_count(torch.device("cuda")), torch.cuda.current_device()
    ring = run(w4a16_cuda.pick_config(n, k, sms, m))
    bulk_config = w4a16_cuda.pick_bulk_config(n, k, sms, m, w4a16_cuda.shared_bytes_per_sm(dev))
    bulk = run(bulk_config)
    err = _rel_err(bulk[0], ring[0].float())
    print(f"bulk {kind} M={m} {bulk_config}: rel difference to the ring kernel {err:.1e}")
    assert torch.isfinite(bulk[0]).all() and err < 1e-3
    if kind == "residual":
        assert _rel_err(bulk[2], ring[2].float()) < 1e-3
        assert ((bulk[1] - ring[1]).abs() / ring[1]).max().item() < 1e-4


def test_early_start_chain_in_a_graph_waits_for_each_input():
    """norm -> W4A16 -> W4A16 -> SiLU * up -> argmax, each reading the previous kernel's
    output, all launched to start early where the GPU has programmatic dependent launch.
    The graph poisons every intermediate with NaN before the chain: a kernel that read its
    input before the previous kernel finished would give NaN or another result than the
    same calls run one at a time with a synchronize between them."""
    from edgellm.engine.kernels import fused, pdl
    from edgellm.engine.kernels.argmax import argmax_rows

    w4a16_cuda = _mma_or_skip()
    print(f"programmatic dependent launch: {pdl.enabled('cuda')}")
    d, inter = 2048, 4096
    first, second = _weights(2 * inter, d, 128), _weights(d, inter, 128)
    w1 = w4a16_cuda.MmaWeights.from_rowpacked(first.qweight, first.scales, first.zeros, 128)
    w2 = w4a16_cuda.MmaWeights.from_rowpacked(second.qweight, second.scales, second.zeros, 128)
    torch.manual_seed(0)
    x, residual = torch.randn(2, d, device="cuda").half(), torch.randn(2, d, device="cuda").half()
    norm_w = torch.rand(d, device="cuda").half() + 0.5
    h1, h2 = torch.empty(2, 2 * inter, device="cuda").half(), torch.empty(2, d, device="cuda").half()

    def chain(sync: bool):
        normed, _ = fused.add_rms_norm(x, residual, norm_w, 1e-5)
        steps = [lambda: w4a16_cuda.w4a16_mma_linear(normed, w1, out=h1),
                 lambda: w4a16_cuda.w4a16_mma_linear(fused.silu_mul(h1), w2, out=h2)]
        for step in steps:
            if sync:
                torch.cuda.synchronize()
            step()
        return argmax_rows(h2.float())

    expected_tokens = chain(sync=True)
    expected = h2.clone()
    graph = torch.cuda.CUDAGraph()
    with pdl.early_starts():  # as the engine captures its decode graphs
        chain(sync=False)  # warm-up: the kernels compile outside the capture
        with torch.cuda.graph(graph):
            h1.fill_(float("nan"))
            h2.fill_(float("nan"))
            tokens = chain(sync=False)
    for _ in range(20):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(h2, expected) and torch.equal(tokens, expected_tokens)


# ---- the final norm + LM head (engine/kernels/lm_head.py) ----


def _lm_head_reference(x, residual, g, w, eps=1e-5):
    """The model's reference path: residual add (fp16), RMSNorm in fp32 rounded to fp16, then the
    product in fp32."""
    h = x if residual is None else (x.float() + residual.float()).half()
    hf = h.float()
    normed = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * g.float()).half()
    return normed.float() @ w.float().t()


@pytest.mark.parametrize("m", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("v,k,with_residual", [(128256, 4096, False), (128256, 2048, True), (1000, 896, False),
                                               (32001, 4096, True)])
def test_lm_head_matches_norm_then_linear(v, k, m, with_residual):
    """A vocabulary not a multiple of the program's rows (1000, 32001), K of 896 (Qwen2-0.5B: not a
    multiple of the 128-wide tile), 1 to 16 rows, with and without the residual add. The kernel
    rounds x * weight to fp16 where the reference rounds the normed x (one fp16 rounding of the
    operand, ~2^-12, averaging out over K), and the result: ~3e-4."""
    from edgellm.engine.kernels.lm_head import lm_head

    torch.manual_seed(v + k + m)
    w = (torch.randn(v, k, device="cuda") * 0.02).half()
    g = (1 + 0.1 * torch.randn(k, device="cuda")).half()
    x = torch.randn(m, k, device="cuda").half()
    residual = torch.randn(m, k, device="cuda").half() if with_residual else None
    out = _poisoned(m, v)
    lm_head(x, residual, g, 1e-5, w, out=out)
    ref = _lm_head_reference(x, residual, g, w)
    err = _rel_err(out, ref)
    print(f"lm_head V={v} K={k} M={m} residual={with_residual}: rel err {err:.2e}")
    assert err < 1e-3


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("v,k", [(128256, 2048), (1000, 896)])
def test_lm_head_argmax_is_the_first_maximum_of_its_logits(v, k, m):
    """argmax_out: the index torch.argmax gives on the logits the kernel returns, with a tie planted
    across programs (two equal vocabulary rows: the lower index wins) and a tie inside a program."""
    from edgellm.engine.kernels.lm_head import lm_head

    torch.manual_seed(v + m)
    w = (torch.randn(v, k, device="cuda") * 0.02).half()
    w[[7, v - 5, 9]] = w[3] * 4  # rows 3 * 4 = 7 = 9 = v - 5: equal logits, larger than the rest
    g = (1 + 0.1 * torch.randn(k, device="cuda")).half()
    x = torch.randn(m, k, device="cuda").half()
    x[0] = w[3].float().sign().half()  # row 0: the planted rows are its largest logits
    tokens = torch.full((m,), -1, dtype=torch.long, device="cuda")
    logits = lm_head(x, None, g, 1e-5, w, argmax_out=tokens)
    assert tokens[0].item() == 7
    assert torch.equal(tokens, logits.float().argmax(-1))


def test_lm_head_in_an_early_start_graph_waits_for_its_input():
    """Launched to start early after a kernel that writes x, inside a graph that poisons x first:
    a program that read x before that kernel finished would give NaN or other logits."""
    from edgellm.engine.kernels import fused, pdl
    from edgellm.engine.kernels.lm_head import lm_head

    torch.manual_seed(0)
    v, k = 50000, 2048
    w = (torch.randn(v, k, device="cuda") * 0.02).half()
    g = (1 + 0.1 * torch.randn(k, device="cuda")).half()
    a, b = torch.randn(2, k, device="cuda").half(), torch.randn(2, k, device="cuda").half()
    x = torch.empty(2, k, device="cuda").half()

    def step():
        fused.silu_mul(torch.cat([a, b], dim=1), out=x)  # a kernel that writes x
        return lm_head(x, None, g, 1e-5, w)

    expected = _lm_head_reference(fused.silu_mul(torch.cat([a, b], dim=1)), None, g, w)
    graph = torch.cuda.CUDAGraph()
    with pdl.early_starts():
        step()
        with torch.cuda.graph(graph):
            x.fill_(float("nan"))
            logits = step()
    for _ in range(10):
        graph.replay()
        torch.cuda.synchronize()
        assert _rel_err(logits, expected) < 1e-3


def test_lm_head_rejects_what_it_does_not_take():
    from edgellm.engine.kernels.lm_head import lm_head

    w = torch.zeros(100, 256, device="cuda").half()
    g = torch.ones(256, device="cuda").half()
    with pytest.raises(ValueError, match="rows"):
        lm_head(torch.zeros(17, 256, device="cuda").half(), None, g, 1e-5, w)
    with pytest.raises(ValueError, match="residual"):
        lm_head(torch.zeros(2, 256, device="cuda").half(), torch.zeros(3, 256, device="cuda").half(), g, 1e-5, w)
    with pytest.raises(ValueError, match="norm_weight"):
        lm_head(torch.zeros(2, 256, device="cuda").half(), None, g.float(), 1e-5, w)
