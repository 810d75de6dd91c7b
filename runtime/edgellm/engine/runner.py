"""Engine: load a verified engine directory and run prefill / decode steps on its slots.

This is the one interface the serving layer talks to (load, warm up, prefill, decode,
free). A slot is one row of the static KV cache; the caller decides which sequence owns
which slot and where each sequence stands (its position).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from edgellm.engine.config import ModelConfig
from edgellm.engine.kernels import available as kernels_available, start_hashing_compiler
from edgellm.engine.linear import Int4Linear, dense_linear
from edgellm.engine.manifest import CPU_TARGET, Manifest, read_manifest, verify_files
from edgellm.engine.model import Transformer
from edgellm.engine.sampling import Sampler, only_argmax, sample_tokens
from edgellm.engine.weights import WEIGHTS_NAME, load_weights
from edgellm.errors import EngineFormatError, RequestError


# On CUDA a prompt (from position 0) of up to this many tokens is padded to the next of these
# lengths and prefilled by a CUDA graph captured at warm-up: launched eagerly, a prefill's
# ~15 kernels per layer cost more CPU time than the GPU needs for them, so the time to the
# first token would depend on the host's CPU. Padding is harmless: attention is causal, and
# the padded positions' KV entries are overwritten before any later token reads them.
PREFILL_GRAPH_TOKENS = (64, 128, 256, 512, 1024, 2048)


def device_sm(device: torch.device) -> str:
    if device.type != "cuda":
        return CPU_TARGET
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EngineFormatError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise EngineFormatError(f"device {name!r} is not one of cpu, cuda, auto")
    return torch.device(name)


@dataclasses.dataclass
class PendingTokens:
    """The tokens one decode step sampled (Engine.decode_sample), on their way to the host.
    `tokens` stays on the GPU: a next step can take them as its input before the host has
    read them, so the host's work between steps overlaps the GPU's (see decode_sample)."""

    tokens: torch.Tensor  # int64 [B], on the engine's device; as an input, good for the next step only
    rows: list  # the caller's handles of the B rows (compared with ==: ids, or objects equal only to themselves)
    _host: torch.Tensor  # where `tokens` reach the host (pinned on CUDA: a copy, or the graph's own write)
    _copied: torch.cuda.Event | None  # recorded after that copy or write

    def result(self) -> list[int]:
        """The tokens as ints: waits for the step (and only for it)."""
        if self._copied is not None:
            self._copied.synchronize()
        return self._host.tolist()

    def continues(self, rows: list, positions: list[int], max_seq_len: int) -> bool:
        """Whether the next step can take these tokens as its input before they are read: the
        same rows in the same order, each with a position left."""
        return rows == self.rows and all(p < max_seq_len for p in positions)


class Engine:
    def __init__(self, engine_dir: Path, manifest: Manifest, model: Transformer, tokenizer, device: torch.device):
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.config: ModelConfig = model.config
        self.max_batch = manifest.max_batch
        self.max_seq_len = manifest.max_seq_len
        self.load_timings: dict[str, float] = {}  # seconds per load stage, for operators and benchmarks
        self.eos_ids = set(manifest.tokenizer.get("eos_ids") or self.config.eos_token_ids)
        self.warm = False
        # CUDA-graph decode: one graph per batch size, all replaying from these static buffers.
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._graph_logits: dict[int, torch.Tensor] = {}
        # Each graph also writes its logits' argmax over its own token input: a greedy batch's next
        # step then starts with no copy of its tokens (decode_sample). A view of what the last
        # replay wrote there, new at each step, good until the next decode call:
        self._fresh_tokens: torch.Tensor | None = None
        self._static_inputs: torch.Tensor | None = None  # int64 [3, max_batch]: tokens, positions, slots
        # Pinned mirrors [2, 3, max_batch], used in turn (so a step allocates nothing on the host, and
        # a step may be prepared while the previous one's inputs are still being copied).
        self._host_inputs: torch.Tensor | None = None
        self._host_tokens: torch.Tensor | None = None  # pinned [2, max_batch]: sampled tokens, in turn
        self._turn = 0
        # Where the decode graphs also write their argmax, straight into host memory (kernels.argmax.
        # ArgmaxOut): pinned [2, max_batch], row r written by the replays r, r + 2, ..; the count of
        # replays since the graphs were captured says which (None: no graphs, or no GPU kernels).
        self._greedy_host: torch.Tensor | None = None
        self._greedy_writes: torch.Tensor | None = None  # int64 [1] on the GPU: the graphs' own count
        self._replays = 0
        # The decode graphs also advance their position input by one (ArgmaxOut.positions): the
        # (batch, slots, positions) the last replay left in _static_inputs, which a next step with
        # exactly these inputs and the fresh tokens needs no copy for (the serving loop's steady
        # state). EDGELLM_REUSE_DEVICE_INPUTS=0 copies them at every step, for measuring.
        self._left_inputs: tuple | None = None
        self._reuse_inputs = os.environ.get("EDGELLM_REUSE_DEVICE_INPUTS", "1") != "0"
        # CUDA-graph prefill: one graph per padded prompt length (PREFILL_GRAPH_TOKENS).
        self._prefill_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._prefill_logits: dict[int, torch.Tensor] = {}
        self._prefill_inputs: torch.Tensor | None = None  # int64: slot, last index, tokens
        self._capture_stream: torch.cuda.Stream | None = None

    @property
    def load_seconds(self) -> float:
        return sum(self.load_timings.values())

    @property
    def engine_id(self) -> str:
        return self.manifest.engine_id

    def _int4_layers(self) -> list[Int4Linear]:
        return [m for m in self.model.modules() if isinstance(m, Int4Linear)]

    @functools.cached_property
    def int4_kernel(self) -> str:
        """What runs the INT4 projections on this device, for operators: the tensor-core kernel
        (CUDA, shipped by the engine or compiled here with NVRTC), Triton's, or weights dequantized
        at load; "" for an fp16 engine."""
        names = {"mma": "tensor-core (CUDA)", "triton": "Triton",
                 "dense": "dequantized fp32 (CPU)" if self.device.type == "cpu" else "dequantized fp16"}
        counts = collections.Counter(layer.path for layer in self._int4_layers())
        if len(counts) == 1:
            return names[next(iter(counts))]
        return ", ".join(f"{names[path]} for {n}" for path, n in sorted(counts.items()))

    @functools.cached_property
    def int4_fallback(self) -> str | None:
        """On a CUDA GPU, why some INT4 projections do not run the tensor-core kernel and what to
        do about it (their decode is slower; dequantized ones also hold fp16's 4x memory); None
        where they all do, or off the GPU."""
        layers = self._int4_layers()
        slow = [layer for layer in layers if layer.path != "mma"]
        if self.device.type != "cuda" or not slow:
            return None
        from edgellm.engine.kernels import w4a16_cuda

        ok, why = w4a16_cuda.available()
        if not ok:
            reason = f"the tensor-core kernel cannot run here ({why})"
        elif any(layer.in_features % 128 for layer in slow):
            k = next(layer.in_features for layer in slow if layer.in_features % 128)
            reason = (f"in-features of {k}, not a multiple of 128 as the tensor-core kernel needs (a property of the "
                      "model's shape)")
        else:
            reason = (f"group size {slow[0].group_size}: the tensor-core kernel takes power-of-two groups of at least 64 "
                      "that divide the in-features; rebuild the engine with --group-size 128")
        paths = sorted({layer.path for layer in slow})
        how = " and ".join("Triton's kernel" if path == "triton" else "fp16 weights dequantized at load" for path in paths)
        return f"{len(slow)} of {len(layers)} INT4 projections run {how}, not the tensor-core kernel: {reason}"

    @classmethod
    def load(
        cls, engine_dir: Path, device: str = "auto", verify: bool = True, progress: Callable[[str], None] | None = None
    ) -> "Engine":
        from edgellm.engine.tokenizer import Tokenizer

        say = progress or (lambda _msg: None)
        timings: dict[str, float] = {}
        clock = [time.perf_counter()]

        def lap(stage: str) -> None:
            now = time.perf_counter()
            timings[stage] = now - clock[0]
            clock[0] = now

        engine_dir = Path(engine_dir)
        manifest = read_manifest(engine_dir)
        manifest.require_runtime()
        dev = resolve_device(device)
        manifest.require_target(device_sm(dev))  # on CUDA this also initialises the context
        if dev.type == "cuda":
            start_hashing_compiler()
        lap("device_init")
        if verify:  # the small files; the weights are verified chunk by chunk as they are read, in load_weights
            others = [rel for rel in manifest.files if rel != WEIGHTS_NAME]
            say(f"verifying {len(others)} other engine files")
            verify_files(engine_dir, manifest, others)
        lap("verify_other_files")
        if dev.type == "cuda" and manifest.quantization["scheme"] != "fp16":
            from edgellm.engine.kernels import w4a16_cuda

            major, minor = torch.cuda.get_device_capability(dev)
            w4a16_cuda.use_engine_kernels(engine_dir, manifest.files, 10 * major + minor)  # compiled at build time
        config = ModelConfig.from_dict(manifest.model["config"])
        quant = manifest.quantization
        scheme = quant["scheme"]
        compute_dtype = torch.float16 if dev.type == "cuda" else torch.float32

        def linear_factory(name: str, in_features: int, out_features: int, bias: bool):
            if scheme == "fp16":
                return dense_linear(in_features, out_features, bias)
            return Int4Linear(in_features, out_features, quant["group_size"], bias, gate_up=name.endswith(".w13"))

        with torch.device("meta"):
            model = Transformer(config, linear_factory, manifest.max_seq_len)
        say(f"loading weights to {dev}")
        state = load_weights(engine_dir, manifest, dev, verify=verify, progress=say)
        lap("read_verify_weights")
        expected = set(model.state_dict().keys())
        if set(state) != expected:
            extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
            raise EngineFormatError(
                f"{WEIGHTS_NAME} does not match the manifest's model: missing {missing[:3]}, unexpected {extra[:3]}; rebuild the engine"
            )
        model.load_state_dict(state, assign=True)
        for param_name, param in list(model.named_parameters()):
            module_name, _, attr = param_name.rpartition(".")
            setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(param.to(compute_dtype), requires_grad=False))
        for module in model.modules():
            if isinstance(module, Int4Linear):
                module.prepare(compute_dtype)
        lap("place_weights")
        kv_dtype = torch.float16 if dev.type == "cuda" else torch.float32
        model.setup_caches(manifest.max_batch, kv_dtype, dev)
        model.eval()
        if dev.type == "cuda" and kernels_available():
            model.use_gpu_kernels()
        tokenizer = Tokenizer.from_dir(engine_dir)
        engine = cls(engine_dir, manifest, model, tokenizer, dev)
        lap("cache_and_tokenizer")
        engine.load_timings = timings
        return engine

    # ---- requests -------------------------------------------------------------------
    def check_request(self, prompt_ids: list[int], max_new_tokens: int) -> None:
        """Refuse what cannot run, before any slot is taken."""
        if not prompt_ids:
            raise RequestError("the prompt is empty: send at least one token of text")
        vocab = self.config.vocab_size
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
        if len(prompt_ids) >= self.max_seq_len:
            raise RequestError(
                f"the prompt is {len(prompt_ids)} tokens; this engine's max sequence length is {self.max_seq_len}, "
                "which must also leave room for at least one new token"
            )
        if len(prompt_ids) + max_new_tokens > self.max_seq_len:
            raise RequestError(
                f"prompt ({len(prompt_ids)} tokens) + max new tokens ({max_new_tokens}) = "
                f"{len(prompt_ids) + max_new_tokens} exceeds this engine's max sequence length {self.max_seq_len}; "
                f"ask for at most {self.max_seq_len - len(prompt_ids)} new tokens"
            )

    # ---- steps ----------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: list[int], start_pos: int = 0) -> torch.Tensor:
        """Run token_ids into `slot` at positions start_pos.. ; returns the last token's logits [V]
        (the compute dtype: fp16 on CUDA, fp32 on the CPU)."""
        n = len(token_ids)
        length = next((t for t in self._prefill_graphs if t >= n), None) if start_pos == 0 else None
        if length is not None:
            # One copy in: slot, last index, tokens (the tail past n keeps earlier valid ids: padding).
            self._prefill_inputs[:n + 2].copy_(torch.tensor([slot, n - 1, *token_ids], dtype=torch.long), non_blocking=True)
            self._prefill_graphs[length].replay()
            return self._prefill_logits[length].clone()  # the next replay reuses the graph's buffer
        dev = self.device
        tokens = torch.tensor([token_ids], dtype=torch.long, device=dev)
        positions = torch.arange(start_pos, start_pos + n, device=dev)[None]
        slots = torch.tensor([slot], device=dev)
        return self.model(tokens, positions, slots, span=start_pos + n)[0, -1]

    @torch.inference_mode()
    def decode(self, slots: list[int], token_ids: Sequence[int] | torch.Tensor, positions: list[int]) -> torch.Tensor:
        """One new token per slot, token_ids[i] sitting at positions[i]; returns logits [B, V]
        (the compute dtype, as prefill's).
        token_ids may be an int64 tensor on the device (a previous step's sampled tokens).

        With graphs captured (CUDA, after warm_up) the result is the graph's static output
        buffer: read it before the next decode call. Inputs go through one of two pinned
        buffers in turn: a step's results must be read (or the stream synchronized) before
        the step after the next one is started. A step that continues the last one (same
        batch and slots, each position one further, the fresh tokens) copies no input: the
        graph left them in place.
        """
        b = len(slots)
        on_device = isinstance(token_ids, torch.Tensor)
        self._turn ^= 1  # this step's pinned buffers (decode_sample's too)
        fresh, self._fresh_tokens = self._fresh_tokens, None
        if (on_device and token_ids is not fresh and self._static_inputs is not None
                and token_ids.data_ptr() == self._static_inputs.data_ptr()):  # an earlier step's view
            raise RuntimeError("these tokens were overwritten by a later decode step: a step's tokens can be "
                               "the input of the step right after it only; pass them as ints otherwise")
        graph = self._graphs.get(b)
        if graph is not None:
            inputs = (b, tuple(slots), tuple(positions))
            left, self._left_inputs = self._left_inputs, None
            if on_device and token_ids is fresh and inputs == left and self._reuse_inputs:
                pass  # the last replay left these tokens, slots and positions in place
            else:
                host_all = self._host_inputs[self._turn]
                host = host_all.numpy()
                host[1, :b] = positions
                host[2, :b] = slots
                if on_device:
                    self._static_inputs[1:, :b].copy_(host_all[1:, :b], non_blocking=True)
                    if token_ids is not fresh or len(fresh) != b:  # else the last replay left them in place
                        self._static_inputs[0, :b].copy_(token_ids)
                else:
                    host[0, :b] = token_ids
                    self._static_inputs[:, :b].copy_(host_all[:, :b], non_blocking=True)
            graph.replay()
            self._replays += 1
            if self._greedy_host is not None:  # the graph advanced its positions
                self._left_inputs = (b, inputs[1], tuple(p + 1 for p in positions))
            self._fresh_tokens = self._static_inputs[0, :b]
            return self._graph_logits[b]
        dev = self.device
        if on_device:
            tokens = token_ids.view(b, 1)
        else:
            tokens = torch.tensor(token_ids, dtype=torch.long, device=dev)[:, None]
        pos = torch.tensor(positions, dtype=torch.long, device=dev)[:, None]
        slot_t = torch.tensor(slots, device=dev)
        return self.model(tokens, pos, slot_t, span=max(positions) + 1)[:, -1]

    def decode_sample(self, rows: list, slots: list[int], token_ids: Sequence[int] | torch.Tensor,
                      positions: list[int], samplers: list[Sampler]) -> PendingTokens:
        """decode() and sampling, without waiting for the GPU: the tokens come back as
        PendingTokens (rows: the caller's handles of the batch rows, kept with them).

        The serving loop keeps the host one step behind the GPU: it starts step N + 1 with
        step N's `tokens` (PendingTokens.continues) and only then reads step N's tokens, so the
        host's work between steps (reading tokens, detokenizing, streaming, the next launch)
        runs while the GPU computes. A row that turns out to have finished at step N gets one
        more token computed at step N + 1, which the caller drops. A greedy batch's tokens are
        the graph's own argmax, which it wrote into its token input: no sampling kernel runs
        between the steps and no copy starts the next one."""
        logits = self.decode(slots, token_ids, positions)
        greedy = self._fresh_tokens is not None and only_argmax(samplers)
        if greedy:
            tokens = self._fresh_tokens  # the graph's own argmax, already where the next step reads it
        else:
            tokens = sample_tokens(logits, samplers)
        if self.device.type != "cuda":
            return PendingTokens(tokens, rows, tokens, None)
        if greedy and self._greedy_host is not None:
            host = self._greedy_host[(self._replays - 1) % 2, :len(slots)]  # the graph wrote them there too
        else:
            if self._host_tokens is None:
                self._host_tokens = torch.zeros(2, self.max_batch, dtype=torch.long).pin_memory()
            host = self._host_tokens[self._turn, :len(slots)]  # the turn decode() took: read before it comes round again
            host.copy_(tokens, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return PendingTokens(tokens, rows, host, done)

    @torch.inference_mode()
    def score(self, token_ids: list[int], slot: int = 0) -> torch.Tensor:
        """Logits for every position of one sequence [T, V], in the compute dtype (for evaluation,
        not serving)."""
        dev = self.device
        n = len(token_ids)
        tokens = torch.tensor([token_ids], dtype=torch.long, device=dev)
        positions = torch.arange(n, device=dev)[None]
        return self.model(tokens, positions, torch.tensor([slot], device=dev), last_only=False, span=n)[0]

    def warm_up(self) -> None:
        """Run each step shape once (and on CUDA capture the prefill graphs and the decode
        graphs for every batch size 1..max_batch), so the first request costs what later ones do."""
        self.prefill(0, [0] * min(8, self.max_seq_len - 1))
        if self.device.type == "cuda":
            self._capture_graphs()  # runs each shape once, then captures it
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()  # what the eager runs before the captures left cached (prefill's fp16 weights)
        else:
            for b in range(1, self.max_batch + 1):
                self.decode(list(range(b)), [0] * b, [0] * b)
        self.warm = True

    @torch.inference_mode()
    def _capture_graphs(self) -> None:
        pool = torch.cuda.graph_pool_handle()  # one memory pool: graphs replay one at a time
        self._capture_stream = torch.cuda.Stream(self.device)  # captures need a stream other than the default
        self._capture_prefill_graphs(pool)
        self._capture_decode_graphs(pool)

    def _capture(self, step: Callable[[], torch.Tensor], pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Run step once (kernels compile and load, buffers are allocated, outside the capture),
        then capture it, both on the capture stream.

        Not through torch.cuda.graph: before every capture it synchronizes the device and
        empties the allocator's caches, so that each eager run after it allocated afresh (14
        captures of a 1B engine spent ~0.45 s of its start there: bench/profile_startup.py);
        warm_up empties them once at the end. And the capture is thread-local: during a hot
        swap the live engine keeps serving on other threads, whose CUDA calls a capture in
        torch's default (global) mode forbids."""
        dev, side = self.device, self._capture_stream
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            step()
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                out = step()
            except BaseException:
                try:
                    graph.capture_end()
                except RuntimeError:
                    pass  # the capture was invalidated: the step's own error is the one to report
                raise
            graph.capture_end()
        torch.cuda.current_stream(dev).wait_stream(side)
        return graph, out

    def _capture_prefill_graphs(self, pool) -> None:
        lengths = [t for t in PREFILL_GRAPH_TOKENS if t <= self.max_seq_len]
        if not lengths:
            return
        dev = self.device
        self._prefill_inputs = torch.zeros(2 + lengths[-1], dtype=torch.long, device=dev)  # slot 0, valid ids
        slot, last = self._prefill_inputs[0:1], self._prefill_inputs[1:2]
        for t in reversed(lengths):  # largest first, so smaller graphs reuse its pool memory
            tokens = self._prefill_inputs[2:2 + t].view(1, t)

            def step():
                # Everything a graph reads must outlive it: positions are made inside the graph
                # (in its pool), the rest are views of self._prefill_inputs.
                positions = torch.arange(t, device=dev)[None]
                # cuDNN's attention is left out: its captured nodes can read host memory that is
                # freed before the graph replays (pytorch/pytorch#169849).
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
                    return self.model(tokens, positions, slot, span=t, last_index=last)[0, -1]

            self._prefill_graphs[t], self._prefill_logits[t] = self._capture(step, pool)
        self._prefill_graphs = dict(sorted(self._prefill_graphs.items()))  # prefill() takes the first that fits

    def _capture_decode_graphs(self, pool) -> None:
        from edgellm.engine.kernels import pdl
        from edgellm.engine.kernels.argmax import ArgmaxOut

        dev = self.device
        n = self.max_batch
        self._static_inputs = torch.zeros(3, n, dtype=torch.long, device=dev)
        self._static_inputs[2] = torch.arange(n, device=dev)  # valid slots while capturing
        self._host_inputs = torch.zeros(2, 3, n, dtype=torch.long).pin_memory()
        if kernels_available():  # the argmax kernel writes host memory itself (needs Triton)
            self._greedy_host = torch.zeros(2, n, dtype=torch.long).pin_memory()
            self._greedy_writes = torch.zeros(1, dtype=torch.long, device=dev)
        for b in range(n, 0, -1):  # largest first, so smaller graphs reuse its pool memory
            tokens = self._static_inputs[0, :b].view(b, 1)
            positions = self._static_inputs[1, :b].view(b, 1)
            slots = self._static_inputs[2, :b]
            greedy_out = tokens.view(b) if self._greedy_host is None else ArgmaxOut(
                tokens.view(b), self._greedy_host, self._greedy_writes, positions.view(b))

            def step():
                with pdl.early_starts():  # each kernel of the model may start while the previous one ends
                    # No span: the decode attention kernel reads each row's length from its position.
                    # The logits' argmax goes over the graph's token input: a greedy next step's
                    # input (decode_sample).
                    return self.model(tokens, positions, slots, greedy_out=greedy_out)[:, -1]

            self._graphs[b], self._graph_logits[b] = self._capture(step, pool)
        if self._greedy_writes is not None:
            self._greedy_writes.zero_()  # the capture runs counted too: from here on, one count per replay
        self._replays = 0
        self._left_inputs = None  # the capture runs advanced the positions too

    def free(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # a decode step may still be in flight (decode_sample)
        self._graphs.clear()
        self._graph_logits.clear()
        self._fresh_tokens = None
        self._prefill_graphs.clear()
        self._prefill_logits.clear()
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
