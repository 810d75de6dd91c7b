"""Prometheus metrics on a localhost HTTP port, and the process / GPU readings GetInfo shares.

Counters and histograms are updated by the scheduler as requests move; gauges (queue depth,
busy slots, engine info, memory, temperature) are read from the live objects at scrape time,
so they can never drift from the truth. psutil and NVML (nvidia-ml-py) are optional: what
cannot be read is left out rather than reported as zero.
"""

from __future__ import annotations

import logging
import os
import threading
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

from edgellm.serving.scheduler import Metrics as SchedulerMetrics

if TYPE_CHECKING:
    from edgellm.serving.scheduler import Scheduler

log = logging.getLogger("edgellm.serving.metrics")

# Tokens come every few ms on a GPU and every tens of ms on an Orin; first tokens can wait in the queue.
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)
_QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics(SchedulerMetrics):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("edgellm_requests", "Generate requests by final gRPC status code", ["code"], registry=r)
        self.ttft = Histogram("edgellm_time_to_first_token_seconds", "From arrival to the first token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("edgellm_inter_token_latency_seconds", "Between two tokens of one stream",
                             buckets=_ITL_BUCKETS, registry=r)
        self.queue_time = Histogram("edgellm_queue_time_seconds", "From arrival to admission into a slot",
                                    buckets=_QUEUE_BUCKETS, registry=r)
        self.generated = Counter("edgellm_generated_tokens", "Tokens generated (end-of-sequence tokens excluded)", registry=r)
        self.prompt_tokens = Counter("edgellm_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        # Every code a client can see, at 0 from the start, so rates work from the first scrape.
        for code in ("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"):
            self.requests.labels(code)
        self.process = ProcessReader()
        self.gpu: GpuReader | None = None

    def watch(self, scheduler: "Scheduler") -> None:
        self.registry.register(_LiveCollector(scheduler, self))

    # scheduler hooks
    def request_finished(self, code: str) -> None:
        self.requests.labels(code).inc()

    def request_admitted(self, queue_time: float, prompt_tokens: int) -> None:
        self.queue_time.observe(queue_time)
        self.prompt_tokens.inc(prompt_tokens)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def tokens_generated(self, n: int) -> None:
        self.generated.inc(n)


class _LiveCollector:
    def __init__(self, scheduler: "Scheduler", metrics: Metrics):
        self.scheduler = scheduler
        self.metrics = metrics

    def collect(self):
        snap = self.scheduler.snapshot()
        yield GaugeMetricFamily("edgellm_queue_depth", "Requests waiting for a slot", value=snap.queue_depth)
        yield GaugeMetricFamily("edgellm_queue_capacity", "Most requests that may wait", value=snap.queue_capacity)
        yield GaugeMetricFamily("edgellm_slots_busy", "Slots of the serving engine running a request", value=snap.slots_busy)
        yield GaugeMetricFamily("edgellm_slots_total", "Slots of the serving engine (its max batch)", value=snap.slots_total)
        state = GaugeMetricFamily("edgellm_state", "1 for the daemon's current state", labels=["state"])
        for name in ("no_engine", "serving", "draining", "swapping", "stopping"):
            state.add_metric([name], 1.0 if snap.state == name else 0.0)
        yield state
        info = InfoMetricFamily("edgellm_engine", "The engine serving new requests",
                                labels=["engine_id", "version", "quantization", "device", "max_batch", "max_seq_len"])
        if snap.current is not None:
            e = snap.current.engine
            info.add_metric([e.engine_id, str(snap.current.version), e.manifest.quantization.get("scheme", ""),
                             str(e.device), str(e.max_batch), str(e.max_seq_len)], {})
        yield info
        yield GaugeMetricFamily("edgellm_engines_retiring", "Old engines finishing streams after a swap",
                                value=len(snap.retiring))
        process = self.metrics.process.read()
        if "rss_bytes" in process:
            yield GaugeMetricFamily("edgellm_process_resident_memory_bytes", "Daemon RSS (psutil)", value=process["rss_bytes"])
            yield GaugeMetricFamily("edgellm_process_cpu_seconds", "Daemon CPU time, user + system (psutil)",
                                    value=process["cpu_seconds"])
            yield GaugeMetricFamily("edgellm_process_threads", "Daemon threads (psutil)", value=process["threads"])
        gpu = self.metrics.gpu.read() if self.metrics.gpu else {}
        for key, name, doc in (
            ("memory_used_bytes", "edgellm_gpu_memory_used_bytes", "GPU memory in use, all processes (NVML)"),
            ("memory_total_bytes", "edgellm_gpu_memory_total_bytes", "GPU memory (NVML)"),
            ("temperature_celsius", "edgellm_gpu_temperature_celsius", "GPU temperature (NVML)"),
            ("utilization_percent", "edgellm_gpu_utilization_percent", "GPU busy time over the last sample period (NVML)"),
        ):
            if key in gpu:
                yield GaugeMetricFamily(name, doc, value=gpu[key])


class ProcessReader:
    """This process's RSS and CPU time through psutil, when it is installed."""

    def __init__(self) -> None:
        try:
            import psutil
        except ImportError:
            log.warning("psutil is not installed: process memory and CPU metrics are off")
            self._process = None
        else:
            self._process = psutil.Process(os.getpid())

    def read(self) -> dict[str, float]:
        if self._process is None:
            return {}
        with self._process.oneshot():
            cpu = self._process.cpu_times()
            return {"rss_bytes": self._process.memory_info().rss, "cpu_seconds": cpu.user + cpu.system,
                    "threads": self._process.num_threads()}


class GpuReader:
    """Name, memory and temperature of the engine's GPU: NVML where importable, else what
    torch can tell (no temperature)."""

    def __init__(self, device: Any):
        self.device = device
        self._nvml = None
        self._handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = _nvml_handle(pynvml, device)
            self._nvml = pynvml
        except Exception as e:  # not installed, no driver, or a device NVML does not know
            log.info("NVML not available (%s): GPU temperature is not reported", e)
        self._lock = threading.Lock()

    def name(self) -> str:
        if self._nvml is not None:
            name = self._nvml.nvmlDeviceGetName(self._handle)
            return name.decode() if isinstance(name, bytes) else name
        import torch

        return torch.cuda.get_device_name(self.device)

    def read(self) -> dict[str, float]:
        with self._lock:
            if self._nvml is not None:
                nv, h = self._nvml, self._handle
                out: dict[str, float] = {}
                try:
                    mem = nv.nvmlDeviceGetMemoryInfo(h)
                    out.update(memory_used_bytes=mem.used, memory_total_bytes=mem.total)
                    out["temperature_celsius"] = nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)
                    out["utilization_percent"] = nv.nvmlDeviceGetUtilizationRates(h).gpu
                except nv.NVMLError as e:  # e.g. Jetson's NVML lacks some queries
                    log.debug("NVML read failed: %s", e)
                return out
            import torch

            free, total = torch.cuda.mem_get_info(self.device)
            return {"memory_used_bytes": total - free, "memory_total_bytes": total}


def _nvml_handle(pynvml, device):
    """The NVML handle of a torch device: by PCI bus id, since CUDA_VISIBLE_DEVICES renumbers."""
    import torch

    props = torch.cuda.get_device_properties(device)
    bus = getattr(props, "pci_bus_id", None)
    if bus is not None:
        domain = getattr(props, "pci_domain_id", 0)
        dev = getattr(props, "pci_device_id", 0)
        return pynvml.nvmlDeviceGetHandleByPciBusId(f"{domain:08x}:{bus:02x}:{dev:02x}.0".encode())
    return pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # scrapes every few seconds would flood the journal
        pass


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class MetricsServer:
    """GET /metrics (any path, in fact) on HOST:PORT; port 0 picks a free one."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        self._httpd = make_server(host, port, make_wsgi_app(registry), _ThreadingServer, handler_class=_QuietHandler)
        self.port = self._httpd.server_port
        self.host = host
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="edgellm-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
