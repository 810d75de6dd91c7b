"""INT4 engines on CUDA: the W4A16 + decode-attention path agrees with the CPU reference,
and CUDA-graph decode produces exactly the tokens of eager decode."""

import pytest
import torch

from edgellm.engine.generate import generate
from edgellm.engine.runner import Engine
from edgellm.engine.sampling import Sampler, SamplingParams, sample_tokens

pytestmark = pytest.mark.gpu

PROMPTS = [[1, 40, 41, 42, 43, 44, 45, 46, 47], [1, 300, 301], [1, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]]


def test_int4_engine_on_cuda_matches_the_cpu_reference(demo_engine):
    cpu = Engine.load(demo_engine, device="cpu")
    gpu = Engine.load(demo_engine, device="cuda")
    for prompt in PROMPTS:
        ref = cpu.score(prompt)
        ours = gpu.score(prompt).float().cpu()
        err = ((ours - ref).norm() / ref.norm()).item()
        print(f"INT4 CUDA vs CPU, prompt of {len(prompt)}: relative logits error {err:.2e}")
        assert err < 1e-2  # fp16 activations and KV on the GPU vs float32 on the CPU


def test_graph_replayed_decode_equals_eager_decode(demo_engine):
    eager = Engine.load(demo_engine, device="cuda")
    graphed = Engine.load(demo_engine, device="cuda")
    graphed.warm_up()
    assert sorted(graphed._graphs) == list(range(1, graphed.max_batch + 1))
    # Both prefill through the same (graph) path, so that only decode differs between them.
    eager.warm_up()
    eager._graphs.clear()
    params = SamplingParams(max_new_tokens=48)
    sampled = SamplingParams(max_new_tokens=48, temperature=0.8, top_p=0.95, seed=5)
    for engine in (eager, graphed):
        engine.eos_ids = set()
    # Decode repeats from run to run (the only atomics, the folded norms' sums of squares, add in
    # fp64, where their order does not reach the fp32 value the next norm reads), so the tokens
    # must be equal, near ties included: the random demo engine has many (with fp32 sums, one GPU
    # suite run on 2026-12-04 failed here).
    # Greedy batches take the graph's own argmax; a batch with a sampled row samples from the logits.
    for batch, batch_params in (([PROMPTS[0]], [params]), (PROMPTS[:2], [params] * 2), (PROMPTS[:2], [params, sampled])):
        want = [r.token_ids for r in generate(eager, batch, batch_params)]
        got = [r.token_ids for r in generate(graphed, batch, batch_params)]
        print(f"batch {len(batch)}: eager {want[-1][:8]}..., graphs {got[-1][:8]}...")
        assert got == want


def test_graph_logits_stay_fp16_and_every_sampler_draws_what_it_draws_from_fp32(demo_engine):
    """The decode graph hands back fp16 logits (no conversion kernel in the step); greedy, seeded
    top-k / top-p and repetition-penalty sampling pick from them the token they pick from the
    same values in fp32."""
    engine = Engine.load(demo_engine, device="cuda")
    engine.warm_up()
    prompts = PROMPTS[:2]
    for slot, prompt in enumerate(prompts):
        engine.prefill(slot, prompt[:-1])
    logits = engine.decode([0, 1], [p[-1] for p in prompts], [len(p) - 1 for p in prompts]).clone()
    assert logits.dtype == torch.float16
    vocab = engine.config.vocab_size
    for params in (SamplingParams(), SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=11),
                   SamplingParams(repetition_penalty=1.5), SamplingParams(temperature=1.3, seed=3)):
        picked = {}
        for dtype in (torch.float16, torch.float32):
            samplers = [Sampler(params, vocab, engine.device, p) for p in prompts]
            picked[dtype] = sample_tokens(logits.to(dtype), samplers).tolist()
        print(f"{params}: {picked[torch.float16]}")
        assert picked[torch.float16] == picked[torch.float32]


def test_a_greedy_step_takes_the_graphs_argmax_and_its_tokens_feed_only_the_next_step(demo_engine):
    engine = Engine.load(demo_engine, device="cuda")
    engine.warm_up()
    prompts = PROMPTS[:2]
    for slot, prompt in enumerate(prompts):
        engine.prefill(slot, prompt[:-1])
    greedy = [Sampler(SamplingParams(), engine.config.vocab_size, engine.device, p) for p in prompts]
    rows, positions = [0, 1], [len(p) - 1 for p in prompts]
    first = engine.decode_sample(rows, rows, [p[-1] for p in prompts], positions, greedy)
    want = engine._graph_logits[2].float().argmax(dim=-1).tolist()
    assert first.result() == want
    second = engine.decode_sample(rows, rows, first.tokens, [p + 1 for p in positions], greedy)
    want = engine._graph_logits[2].float().argmax(dim=-1).tolist()
    assert second.result() == want
    with pytest.raises(RuntimeError, match="overwritten by a later decode step"):
        engine.decode_sample(rows, rows, first.tokens, [p + 2 for p in positions], greedy)


def test_greedy_tokens_reach_the_host_from_the_graph_while_the_next_step_runs(demo_engine):
    """The serving loop's order: step N + 1 is launched from step N's tokens before step N's are
    read. The decode graphs write greedy tokens into two pinned host rows in turn (no copy on the
    stream): each step's result read after the next step started is still its own argmax."""
    engine = Engine.load(demo_engine, device="cuda")
    engine.warm_up()
    assert engine._greedy_host is not None
    prompts = PROMPTS[:2]
    rows, start = [0, 1], [len(p) - 1 for p in prompts]
    greedy = [Sampler(SamplingParams(), engine.config.vocab_size, engine.device, p) for p in prompts]

    def prefill():
        for slot, prompt in enumerate(prompts):
            engine.prefill(slot, prompt[:-1])

    prefill()
    expected, tokens = [], [p[-1] for p in prompts]
    for i in range(6):  # one step at a time: each step's argmax, from its logits
        step = engine.decode_sample(rows, rows, tokens, [p + i for p in start], greedy)
        expected.append(engine._graph_logits[2].float().argmax(dim=-1).tolist())
        tokens = step.tokens
    prefill()  # the same steps again (they rewrite the same cache entries), overlapped
    got, pending = [], engine.decode_sample(rows, rows, [p[-1] for p in prompts], start, greedy)
    for i in range(1, 6):
        following = engine.decode_sample(rows, rows, pending.tokens, [p + i for p in start], greedy)
        got.append(pending.result())
        pending = following
    got.append(pending.result())
    print(f"greedy tokens through host memory: {got[:3]}...")
    assert got == expected


def test_decode_reads_only_live_kv(demo_engine):
    """Garbage beyond a row's live length must not change its logits."""
    engine = Engine.load(demo_engine, device="cuda")
    prompt = PROMPTS[2]
    engine.prefill(0, prompt[:-1])
    first = engine.decode([0], [prompt[-1]], [len(prompt) - 1]).clone()
    for layer in engine.model.layers:
        layer.attention.kv_cache.k[0, :, len(prompt):] = float("nan")
        layer.attention.kv_cache.v[0, :, len(prompt):] = float("nan")
    second = engine.decode([0], [prompt[-1]], [len(prompt) - 1])
    assert torch.isfinite(second).all() and torch.equal(first, second)


def test_graph_prefill_of_a_padded_prompt_matches_eager_prefill(demo_engine):
    """A prompt padded to the next captured length gives the eager prefill's logits (other
    GEMM shapes: not bit for bit) and the same KV entries at its own positions; padding
    written past them does not reach a later decode."""
    eager = Engine.load(demo_engine, device="cuda")
    graphed = Engine.load(demo_engine, device="cuda")
    graphed.warm_up()
    assert sorted(graphed._prefill_graphs) == [64, 128, 256, 512]  # the demo engine's max seq len is 512
    torch.manual_seed(0)
    for n, slot in [(3, 0), (64, 1), (65, 2), (300, 3)]:
        prompt = torch.randint(3, eager.config.vocab_size, (n,)).tolist()
        want = eager.prefill(slot, prompt).float()
        got = graphed.prefill(slot, prompt).float()
        err = ((got - want).norm() / want.norm()).item()
        k_want = eager.model.layers[-1].attention.kv_cache.k[slot, :, :n].float()
        k_got = graphed.model.layers[-1].attention.kv_cache.k[slot, :, :n].float()
        k_err = ((k_got - k_want).norm() / k_want.norm()).item()
        print(f"prefill of {n} tokens, graph (padded) vs eager: logits rel err {err:.2e}, last layer's K {k_err:.2e}")
        assert err < 1e-2 and k_err < 1e-2
        assert int(got.argmax()) == int(want.argmax())
        next_want = eager.decode([slot], [5], [n]).float()
        next_got = graphed.decode([slot], [5], [n]).float()
        assert ((next_got - next_want).norm() / next_want.norm()).item() < 1e-2


def test_decode_with_norms_folded_into_the_projections_matches_the_norm_kernels(demo_engine):
    """The demo engine's decode folds its RMSNorms into the INT4 projections (w4a16_cuda.Fold);
    the same steps with the norm kernels give the same logits up to fp16 rounding, and the
    same KV entries."""
    folded = Engine.load(demo_engine, device="cuda")
    plain = Engine.load(demo_engine, device="cuda")
    assert folded.model.folds_norms, "the demo engine's projections should all be on the tensor-core kernel"
    plain.model.folds_norms = False
    prompts = PROMPTS[:3]
    for engine in (folded, plain):
        for slot, prompt in enumerate(prompts):
            engine.prefill(slot, prompt)
    for step in range(3):
        slots = list(range(len(prompts)))
        tokens = [5 + step] * len(prompts)
        positions = [len(p) + step for p in prompts]
        want = plain.decode(slots, tokens, positions).float()
        got = folded.decode(slots, tokens, positions).float()
        err = ((got - want).norm() / want.norm()).item()
        k_want = plain.model.layers[-1].attention.kv_cache.k[:3].float()
        k_err = ((folded.model.layers[-1].attention.kv_cache.k[:3].float() - k_want).norm() / k_want.norm()).item()
        print(f"decode step {step}, norms folded vs norm kernels: logits rel err {err:.2e}, last layer's K {k_err:.2e}")
        assert err < 1e-2 and k_err < 1e-2


def test_the_engine_says_which_kernel_runs_its_int4_projections(demo_engine):
    """Operators read it in `edgellm info` (and a warning in the log when it is a fallback)."""
    from edgellm.engine.kernels import w4a16_cuda

    engine = Engine.load(demo_engine, device="cuda")
    if not w4a16_cuda.available()[0]:
        pytest.skip(w4a16_cuda.available()[1])
    print(f"INT4 projections: {engine.int4_kernel}")
    assert engine.int4_kernel == "tensor-core (CUDA)"
    assert engine.int4_fallback is None


def test_an_engine_with_shipped_kernels_loads_without_compiling(demo_engine, tmp_path):
    """The demo engine built on this GPU host ships the tensor-core kernels for its SM; a fresh
    process with an empty kernel cache, in which NVRTC compiling is made to fail, loads it, runs
    its INT4 projections on the tensor-core kernel and generates the tokens this process
    generates; also where NVRTC cannot be reached at all."""
    import os
    import subprocess
    import sys

    from edgellm.engine.kernels import w4a16_cuda
    from edgellm.engine.manifest import read_manifest
    from edgellm.engine.runner import device_sm

    if not w4a16_cuda.available()[0]:
        pytest.skip(w4a16_cuda.available()[1])
    major, minor = device_sm(torch.device("cuda")).split(".")
    rel = f"kernels/{w4a16_cuda.cubin_name(10 * int(major) + int(minor))}"
    assert rel in read_manifest(demo_engine).files
    params = SamplingParams(max_new_tokens=8)
    engine = Engine.load(demo_engine, device="cuda")
    engine.eos_ids = set()
    want = generate(engine, [PROMPTS[0]], [params])[0].token_ids
    for nvrtc in (True, False):
        script = (
            "import sys\n"
            "from edgellm.engine import kernels\n"
            "from edgellm.engine.kernels import w4a16_cuda\n"
            "def refuse(*args): raise AssertionError('the kernels were compiled at load')\n"
            "w4a16_cuda._nvrtc_compile = refuse\n"
            # Without NVRTC: a device with no CUDA toolkit, where nvrtc_usable finds no libnvrtc and
            # the engine's shipped kernels are the only tensor-core ones there are.
            + ("" if nvrtc else "kernels.nvrtc_usable = w4a16_cuda.nvrtc_usable = lambda: (False, 'no libnvrtc')\n")
            + "from edgellm.engine.generate import generate\n"
            "from edgellm.engine.runner import Engine\n"
            "from edgellm.engine.sampling import SamplingParams\n"
            "engine = Engine.load(sys.argv[1], device='cuda')\n"
            "engine.eos_ids = set()\n"
            "print(engine.int4_kernel)\n"
            f"print(generate(engine, [{PROMPTS[0]!r}], [SamplingParams(max_new_tokens=8)])[0].token_ids)\n"
        )
        env = dict(os.environ, EDGELLM_KERNEL_CACHE=str(tmp_path / f"empty-cache-nvrtc-{nvrtc}"))
        run = subprocess.run([sys.executable, "-c", script, str(demo_engine)], capture_output=True, text=True, env=env,
                             timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        print(f"fresh process, shipped kernels, {'with' if nvrtc else 'without'} NVRTC: {run.stdout.strip()}")
        *_, kernel, tokens = run.stdout.strip().splitlines()
        assert kernel == "tensor-core (CUDA)" and tokens == str(want)
