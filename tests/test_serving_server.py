"""The daemon's gRPC servers on real unix sockets, driven by the real client.

The loop-stall test hook (EDGELLM_DEBUG_STALL_FILE, here set on the scheduler directly) holds
the scheduler between iterations, so queue and slot states are reached without timing luck.
"""

import json
import os
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgellm.engine.generate import generate
from edgellm.engine.runner import Engine
from edgellm.engine.sampling import SamplingParams
from edgellm.serving.cli import format_info
from edgellm.serving.client import Client, GenerationError
from edgellm.serving.config import ServeConfig
from edgellm.serving.server import Daemon

EDGELLM = [sys.executable, "-m", "edgellm"]
WORDS = ["apple", "river", "kiosk", "music", "train", "seven", "blue", "window", "garden", "lamp", "stone", "cloud"]


@dataclass
class Served:
    daemon: Daemon
    kiosk: str
    admin: str
    stall: Path
    root: Path

    def client(self) -> Client:
        return Client(self.kiosk)

    def admin_client(self) -> Client:
        return Client(self.admin)

    def wait(self, predicate, what: str, timeout: float = 60.0):
        """Poll a condition on the daemon (states, not durations, are what tests check)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return
            time.sleep(0.01)
        raise AssertionError(f"timed out waiting for {what}")


def start_daemon(root: Path, engine_dir: Path | None, **settings) -> Served:
    config = ServeConfig(
        engine=engine_dir, device="cpu", verify=False, listen=f"unix://{root}/kiosk.sock",
        admin_listen=f"unix://{root}/admin.sock", metrics_listen="127.0.0.1:0", grace_period=5.0, **settings,
    )
    daemon = Daemon(config)
    daemon.scheduler.debug_stall_file = str(root / "stall")
    daemon.start()
    if engine_dir is not None:
        daemon.load_engine(engine_dir)
    return Served(daemon, config.listen, config.admin_listen, root / "stall", root)


@pytest.fixture(scope="module")
def served(demo_engine, tmp_path_factory):
    s = start_daemon(tmp_path_factory.mktemp("served"), demo_engine, queue_depth=8, prefill_chunk=16)
    yield s
    s.stall.unlink(missing_ok=True)
    s.daemon.stop(5.0)


@pytest.fixture(autouse=True)
def leaves_daemon_idle(request):
    """Each test leaves no stall and no request behind, so the next starts clean."""
    yield
    if "served" in request.fixturenames:
        s = request.getfixturevalue("served")
        s.stall.unlink(missing_ok=True)
        assert s.daemon.scheduler.wait_idle(60)


@pytest.fixture(scope="module")
def reference(demo_engine):
    return Engine.load(demo_engine, device="cpu", verify=False)


def ids_of_state(served: Served, state: str) -> list[int]:
    with served.admin_client() as admin:
        return [int(r["id"]) for r in admin.list_requests() if r["state"] == state]


def test_sockets_have_their_modes(served):
    kiosk = Path(served.kiosk.removeprefix("unix://"))
    admin = Path(served.admin.removeprefix("unix://"))
    assert stat.S_ISSOCK(kiosk.stat().st_mode) and stat.S_IMODE(kiosk.stat().st_mode) == 0o660
    assert stat.S_ISSOCK(admin.stat().st_mode) and stat.S_IMODE(admin.stat().st_mode) == 0o600


def test_three_times_max_batch_concurrent_streams_match_edgellm_run(served, reference):
    n = 3 * reference.max_batch
    cases = []
    for i in range(n):
        prompt = f"{WORDS[i]} {WORDS[(i * 5 + 3) % len(WORDS)]} and more"
        kwargs = dict(max_tokens=20 + 3 * i, temperature=0.0 if i % 3 == 0 else 0.8, seed=1000 + i,
                      top_k=50 if i % 4 == 1 else 0, top_p=0.9 if i % 4 == 2 else None,
                      repetition_penalty=1.2 if i % 5 == 4 else None)
        cases.append((prompt, kwargs))
    results: list = [None] * n

    def run(i):
        prompt, kwargs = cases[i]
        with served.client() as client:
            deltas = list(client.stream(prompt, **kwargs))
        results[i] = deltas

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for (prompt, kwargs), deltas in zip(cases, results):
        assert deltas, f"stream for {prompt!r} failed"
        params = SamplingParams(
            max_new_tokens=kwargs["max_tokens"], temperature=kwargs["temperature"], seed=kwargs["seed"],
            top_k=kwargs["top_k"], top_p=kwargs["top_p"] or 1.0, repetition_penalty=kwargs["repetition_penalty"] or 1.0,
        )
        ref = generate(reference, [reference.tokenizer.encode(prompt)], [params])[0]
        last = deltas[-1]
        assert [t for d in deltas for t in d.token_ids] == ref.token_ids
        assert "".join(d.text for d in deltas) == ref.text
        assert last.finish_reason == ref.finish_reason and all(d.finish_reason is None for d in deltas[:-1])
        assert last.usage["prompt_tokens"] == len(reference.tokenizer.encode(prompt))
        assert last.usage["completion_tokens"] == len(ref.token_ids)
        assert last.engine_id == reference.engine_id


def test_cancel_mid_stream_frees_the_slot_for_the_next_queued_request(served):
    client = served.client()
    slots = served.daemon.scheduler.snapshot().slots_total
    running = [client.stream(f"{WORDS[i]} {WORDS[-1 - i]}", max_tokens=300) for i in range(slots)]
    for stream in running:
        assert next(stream).finish_reason is None  # every slot is generating
    first_ids = ids_of_state(served, "STATE_GENERATING")
    assert len(first_ids) == slots

    waiting: list = []
    waiter = threading.Thread(target=lambda: waiting.extend(served.client().stream("hello kiosk", max_tokens=300)))
    waiter.start()
    served.wait(lambda: len(ids_of_state(served, "STATE_QUEUED")) == 1, "the extra request to queue")
    queued_id = ids_of_state(served, "STATE_QUEUED")[0]

    served.stall.touch()  # hold the loop so the cancel, and nothing else, frees a slot
    served.wait(lambda: served.daemon.scheduler.stalled, "the loop to stall")
    cancelled = count(served, "CANCELLED")
    running[0].close()  # the client cancels mid-stream
    served.wait(lambda: count(served, "CANCELLED") == cancelled + 1, "the cancel to arrive")
    served.stall.unlink()

    served.wait(lambda: queued_id in ids_of_state(served, "STATE_GENERATING"), "the queued request to start")
    still_running = ids_of_state(served, "STATE_GENERATING")
    assert first_ids[0] not in still_running  # the cancelled one left its slot...
    assert set(first_ids[1:]) <= set(still_running)  # ...while the others are still generating
    for stream in running[1:]:
        stream.close()
    served.wait(lambda: bool(waiting) and waiting[-1].finish_reason is not None, "the queued request to finish")
    waiter.join(60)
    assert waiting[-1].finish_reason in ("stop", "length")
    client.close()


def test_full_queue_is_resource_exhausted_at_once(served):
    snap = served.daemon.scheduler.snapshot()
    capacity = snap.queue_capacity + snap.slots_total  # all slots free + the queue
    served.stall.touch()
    served.wait(lambda: served.daemon.scheduler.stalled, "the loop to stall")
    finished: list = []

    def run(i):
        with served.client() as client:
            finished.append(client.generate(f"{WORDS[i]} queue", max_tokens=4))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(capacity)]
    for t in threads:
        t.start()
    served.wait(lambda: served.daemon.scheduler.snapshot().queue_depth == capacity, "the queue to fill")
    with served.client() as client, pytest.raises(GenerationError) as e:
        client.generate("one too many", max_tokens=4, timeout=30)  # answered while the loop is still stalled
    assert e.value.code == "RESOURCE_EXHAUSTED" and "queue is full" in e.value.details
    served.stall.unlink()
    for t in threads:
        t.join(120)
    assert len(finished) == capacity and all(c.finish_reason in ("stop", "length") for c in finished)


def test_deadline_in_the_queue_and_mid_stream(served):
    expired = count(served, "DEADLINE_EXCEEDED")
    served.stall.touch()
    served.wait(lambda: served.daemon.scheduler.stalled, "the loop to stall")
    with served.client() as client:
        with pytest.raises(GenerationError) as e:
            client.generate("waits in the queue", max_tokens=4, timeout=0.5)
        assert e.value.code == "DEADLINE_EXCEEDED"
        served.stall.unlink()
        served.wait(lambda: served.daemon.scheduler.snapshot().queue_depth == 0, "the expired request to leave the queue")

        stream = client.stream("runs out of time", max_tokens=300, timeout=3.0)
        assert next(stream).finish_reason is None
        served.stall.touch()  # the engine "hangs" mid-stream; the deadline passes
        with pytest.raises(GenerationError) as e:
            for _ in stream:
                pass
        assert e.value.code == "DEADLINE_EXCEEDED"
        served.stall.unlink()
    served.wait(lambda: served.daemon.scheduler.snapshot().slots_busy == 0, "the slot to come free")
    assert count(served, "DEADLINE_EXCEEDED") == expired + 2


@pytest.mark.parametrize("kwargs, expected", [
    (dict(prompt="hello", max_tokens=5000), "max sequence length 512"),
    (dict(prompt="word " * 600, max_tokens=1), "max sequence length is 512"),
    (dict(prompt="hello", temperature=-1.0), "temperature must be in [0, 100]"),
    (dict(prompt="hello", top_p=0.0), "top_p must be in (0, 1]"),
    (dict(prompt="hello", repetition_penalty=11.0), "repetition_penalty must be in (0, 10]"),
    (dict(prompt="hello", stop=[""]), "stop strings must not be empty"),
    (dict(prompt=""), "exactly one of prompt, messages, prompt_token_ids"),
    (dict(prompt="hello", prompt_token_ids=[5, 6]), "exactly one of prompt, messages, prompt_token_ids"),
    (dict(prompt_token_ids=[5, 100000]), "outside the vocabulary (0..511)"),
])
def test_bad_parameters_are_invalid_argument_naming_the_limit(served, kwargs, expected):
    with served.client() as client, pytest.raises(GenerationError) as e:
        client.generate(kwargs.pop("prompt", None), **kwargs)
    assert e.value.code == "INVALID_ARGUMENT"
    assert expected in e.value.details


def test_chat_messages_and_token_ids_are_served(served, reference):
    messages = [{"role": "user", "content": "What is the weather?"}]
    with served.client() as client:
        chat = client.generate(messages=messages, max_tokens=12)
        by_ids = client.generate(prompt_token_ids=reference.tokenizer.encode_chat(messages), max_tokens=12)
        default_length = client.generate("hello")  # no max_tokens: the daemon's default, clamped to the room left
    assert chat.token_ids == by_ids.token_ids and chat.text == by_ids.text
    assert 0 < default_length.usage["completion_tokens"] <= served.daemon.config.default_max_tokens


def test_health_drain_resume_and_reflection(served):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
    from google.protobuf.descriptor_pool import DescriptorPool

    SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    with grpc.insecure_channel(served.kiosk) as channel, served.admin_client() as admin, served.client() as client:
        health = health_pb2_grpc.HealthStub(channel)

        def status(service=""):
            return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status

        assert status() == SERVING and status("edgellm.v1.Generator") == SERVING
        assert admin.drain() == 0
        assert status() == NOT_SERVING and admin.info()["state"] == "SERVING_STATE_DRAINING"
        with pytest.raises(GenerationError) as e:
            client.generate("while draining", max_tokens=2)
        assert e.value.code == "UNAVAILABLE" and "draining" in e.value.details
        admin.resume()
        assert status() == SERVING and client.generate("after resume", max_tokens=2).finish_reason

        db = ProtoReflectionDescriptorDatabase(channel)
        assert {"edgellm.v1.Generator", "grpc.health.v1.Health"} <= set(db.get_services())
        assert "edgellm.v1.Admin" not in db.get_services()  # never on the kiosk socket
        method = DescriptorPool(db).FindServiceByName("edgellm.v1.Generator").methods_by_name["Generate"]
        assert method.server_streaming and method.input_type.full_name == "edgellm.v1.GenerateRequest"
        with pytest.raises(GenerationError) as e:
            Client(served.kiosk).info()
        assert e.value.code == "UNIMPLEMENTED"
    with grpc.insecure_channel(served.admin) as channel:
        assert "edgellm.v1.Admin" in ProtoReflectionDescriptorDatabase(channel).get_services()


def scrape(served) -> dict[tuple[str, tuple], float]:
    url = f"http://127.0.0.1:{served.daemon.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def count(served, code: str) -> float:
    return scrape(served)[("edgellm_requests_total", (("code", code),))]


def test_metrics_counters_match_the_requests_made(served):
    before = scrape(served)
    completions = []
    with served.client() as client:
        for i in range(3):
            completions.append(client.generate(f"{WORDS[i]} metrics", max_tokens=5 + i))
        with pytest.raises(GenerationError):
            client.generate("hello", max_tokens=100000)
    after = scrape(served)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("edgellm_requests_total", code="OK") == 3
    assert delta("edgellm_requests_total", code="INVALID_ARGUMENT") == 1
    assert delta("edgellm_requests_total", code="RESOURCE_EXHAUSTED") == 0
    assert delta("edgellm_generated_tokens_total") == sum(len(c.token_ids) for c in completions)
    assert delta("edgellm_time_to_first_token_seconds_count") == 3
    assert delta("edgellm_prompt_tokens_total") == sum(c.usage["prompt_tokens"] for c in completions)
    assert after[("edgellm_slots_total", ())] == 4 and after[("edgellm_slots_busy", ())] == 0
    assert after[("edgellm_queue_capacity", ())] == 8 and after[("edgellm_queue_depth", ())] == 0
    assert after[("edgellm_state", (("state", "serving"),))] == 1
    engine = [labels for (name, labels) in after if name == "edgellm_engine_info"]
    assert engine and dict(engine[0])["engine_id"] == "demo-llama-int4-awq"
    assert after[("edgellm_process_resident_memory_bytes", ())] > 0


def test_get_info(served):
    with served.admin_client() as admin:
        info = admin.info()
    assert info["state"] == "SERVING_STATE_SERVING"
    assert info["engine"]["engine_id"] == "demo-llama-int4-awq" and info["engine"]["max_batch"] == 4
    assert info["engine"]["max_seq_len"] == 512 and info["engine"]["quantization"] == "int4-awq"
    assert info["device"]["device"] == "cpu" and info["device"]["sm"] == "cpu"
    assert info["slots_total"] == 4 and info["queue_capacity"] == 8 and info["process_rss_bytes"] > 0
    assert info["engine"]["int4_kernel"] == "dequantized fp32 (CPU)"
    assert "int4 kernel:    dequantized fp32 (CPU)" in format_info(info).splitlines()


def test_no_engine_yet_is_unavailable_until_one_is_installed(demo_engine, tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    s = start_daemon(tmp_path, None)
    try:
        with grpc.insecure_channel(s.kiosk) as channel, s.client() as client, s.admin_client() as admin:
            health = health_pb2_grpc.HealthStub(channel)
            check = lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10).status  # noqa: E731
            assert check() == health_pb2.HealthCheckResponse.NOT_SERVING
            assert admin.info()["state"] == "SERVING_STATE_NO_ENGINE" and admin.info()["engine"] is None
            with pytest.raises(GenerationError) as e:
                client.generate("hello", max_tokens=2)
            assert e.value.code == "UNAVAILABLE" and "no engine" in e.value.details
            s.daemon.load_engine(demo_engine)
            assert check() == health_pb2.HealthCheckResponse.SERVING
            assert client.generate("hello", max_tokens=2).finish_reason in ("stop", "length")
    finally:
        s.daemon.stop(5.0)
    assert not Path(s.kiosk.removeprefix("unix://")).exists()


def test_cli_generate_matches_edgellm_run_and_fails_loudly(served, demo_engine):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = ["--max-tokens", "16", "--temperature", "0.7", "--seed", "42"]
    run = subprocess.run([*EDGELLM, "run", str(demo_engine), "--device", "cpu", "--prompt", "kiosk weather", "--json",
                          "--max-new-tokens", "16", "--temperature", "0.7", "--seed", "42"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    gen = subprocess.run([*EDGELLM, "generate", "--target", served.kiosk, "--json", *args, "kiosk weather"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert gen.returncode == 0, gen.stderr
    want, got = json.loads(run.stdout), json.loads(gen.stdout)
    assert got["token_ids"] == want["token_ids"] and got["text"] == want["text"]
    assert got["finish_reason"] == want["finish_reason"] and got["usage"]["completion_tokens"] == len(want["token_ids"])

    streamed = subprocess.run([*EDGELLM, "generate", "--target", served.kiosk, *args, "kiosk weather"],
                              capture_output=True, text=True, env=env, timeout=120)
    assert streamed.returncode == 0 and streamed.stdout == want["text"] + "\n"
    assert "finish reason: " + want["finish_reason"] in streamed.stderr

    bad = subprocess.run([*EDGELLM, "generate", "--target", served.kiosk, "--max-tokens", "9999", "hello"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode != 0 and "INVALID_ARGUMENT" in bad.stderr and "max sequence length 512" in bad.stderr
    gone = subprocess.run([*EDGELLM, "generate", "--target", f"unix://{served.root}/nobody.sock", "--timeout", "5", "hello"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert gone.returncode != 0 and "UNAVAILABLE" in gone.stderr

    info = subprocess.run([*EDGELLM, "info", "--target", served.admin], capture_output=True, text=True, env=env, timeout=120)
    assert info.returncode == 0 and "demo-llama-int4-awq" in info.stdout and "state:          serving" in info.stdout
    info_json = subprocess.run([*EDGELLM, "info", "--json", "--target", served.admin],
                               capture_output=True, text=True, env=env, timeout=120)
    assert json.loads(info_json.stdout)["engine"]["max_seq_len"] == 512


def make_pki(root: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(name, key, issuer_name, issuer_key, ca=False, sans=()):
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    files = {}

    def write(name, key, certificate):
        files[name + "_key"] = root / f"{name}.key"
        files[name + "_key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
        files[name + "_cert"] = root / f"{name}.crt"
        files[name + "_cert"].write_bytes(certificate.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgellm test CA")])
    write("ca", ca_key, cert("edgellm test CA", ca_key, ca_name, ca_key, ca=True))
    server_key = ec.generate_private_key(ec.SECP256R1())
    write("server", server_key, cert("localhost", server_key, ca_name, ca_key,
                                     sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]))
    client_key = ec.generate_private_key(ec.SECP256R1())
    write("client", client_key, cert("fleet manager", client_key, ca_name, ca_key))
    return files


def test_tcp_with_mutual_tls_for_generation_and_admin(demo_engine, tmp_path):
    pytest.importorskip("cryptography")
    pki = make_pki(tmp_path)
    s = start_daemon(tmp_path, demo_engine, tcp_listen="127.0.0.1:0", admin_tcp_listen="127.0.0.1:0",
                     tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_client_ca=pki["ca_cert"])
    try:
        kiosk, admin = (f"127.0.0.1:{s.daemon.tcp_ports[role]}" for role in ("kiosk", "admin"))
        creds = dict(tls_ca=pki["ca_cert"], tls_cert=pki["client_cert"], tls_key=pki["client_key"])
        with Client(kiosk, **creds) as client:
            assert client.generate("over TLS", max_tokens=3).finish_reason in ("stop", "length")
        with Client(admin, **creds) as client:
            assert client.info()["engine"]["engine_id"] == "demo-llama-int4-awq"
        for target in (kiosk, admin):  # a client without a certificate the CA signed gets nothing
            with Client(target, tls_ca=pki["ca_cert"]) as anonymous, pytest.raises(GenerationError) as e:
                anonymous.info(timeout=10)
            assert e.value.code == "UNAVAILABLE"
        with Client(admin) as plaintext, pytest.raises(GenerationError):
            plaintext.info(timeout=10)
    finally:
        s.daemon.stop(5.0)


def test_stop_ends_streams_left_after_the_grace_period_as_cancelled(demo_engine, tmp_path):
    s = start_daemon(tmp_path, demo_engine)
    client = s.client()
    stream = client.stream("never finishes in time", max_tokens=300)
    assert next(stream).finish_reason is None
    s.stall.touch()  # the stream cannot progress: the grace period runs out
    stopper = threading.Thread(target=s.daemon.stop, args=(0.2,))
    stopper.start()
    rest = list(stream)  # the daemon ends it: a normal last chunk, finish reason "cancelled"
    assert rest[-1].finish_reason == "cancelled"
    s.stall.unlink()  # let the loop thread exit
    stopper.join(60)
    assert not stopper.is_alive()
    client.close()
