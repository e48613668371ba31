"""`prefixtune serve` as a process supervisor runs it: SIGTERM or SIGINT while a streamed request is in flight; the
request finishes, the server exits, and no process it started is left running (vLLM's engine core and workers were
left as orphans before). torch and llama.cpp here; vLLM marked `vllm` (its own environment)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

psutil = pytest.importorskip("psutil")
pytest.importorskip("uvicorn")
from gguf_models import write_tiny_gguf  # noqa: E402
from helpers import free_port, id_tokenizer  # noqa: E402

import prefixtune as pt  # noqa: E402

NEW = 1000  # long enough to still be running when the signal lands


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("shutdown")
    path, hf = write_tiny_gguf(root / "tiny-llama.gguf", "llama")
    pt.attach(hf, pt.PrefixConfig(num_virtual_tokens=4), "sent").save_adapter(root / "adapters" / "sent", "sent")
    return root, path


def wait_healthy(url: str, proc: subprocess.Popen, log, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"server did not come up:\n{log.read_text()[-3000:]}")


def stream_request(url: str, body: dict, out: dict, first_chunk: threading.Event) -> None:
    """A streamed completion; out gets its status, chunks and whether it ended with [DONE]."""
    req = urllib.request.Request(url + "/v1/completions", json.dumps({**body, "stream": True}).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            out["status"], out["chunks"] = r.status, []
            for line in r:
                line = line.decode().strip()
                if line == "data: [DONE]":
                    out["done"] = time.monotonic()
                elif line.startswith("data: "):
                    out["chunks"].append(json.loads(line[6:]))
                    first_chunk.set()
    except urllib.error.HTTPError as e:
        out["error"] = f"{e.code}: {e.read().decode()[:300]}"
    except OSError as e:
        out["error"] = repr(e)
    first_chunk.set()


def run_and_stop(cmd: list[str], sig: int, body: dict, tmp_path, env=None):
    """Start the server, start a long streamed request, send `sig`; -> (exit code, request outcome, children seen)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    try:
        wait_healthy(url, proc, log)
        out, first = {}, threading.Event()
        client = threading.Thread(target=stream_request, args=(url, body, out, first))
        client.start()
        assert first.wait(120), log.read_text()[-3000:]
        children = psutil.Process(proc.pid).children(recursive=True)  # everything the server started
        out["signalled"] = time.monotonic()
        proc.send_signal(sig)
        code = proc.wait(300)
        client.join(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.5)  # a child that is exiting on its own gets a moment
    left = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    return code, out, children, left, log.read_text()


def serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefixtune", "serve", *args, "--max-total-tokens", "1024", "--max-batch-size", "4"]


CASES = [("torch", signal.SIGTERM), ("torch", signal.SIGINT), ("llamacpp", signal.SIGTERM)]


@pytest.mark.parametrize("backend,sig", CASES, ids=[f"{b}-{s.name}" for b, s in CASES])
def test_signal_finishes_the_in_flight_request_and_leaves_no_process(gguf, tmp_path, backend, sig):
    root, path = gguf
    cmd = serve_cmd("--backend", backend, "--model", str(path), "--adapters", str(root / "adapters"))
    body = {"model": "sent", "prompt": "the movie was", "max_tokens": NEW, "temperature": 0, "ignore_eos": True}
    code, out, children, left, log = run_and_stop(cmd, sig, body, tmp_path, env={"OMP_NUM_THREADS": "1"})
    # uvicorn re-raises the signal it handled once it has shut down: killed by it, or 130 after SIGINT's KeyboardInterrupt
    assert code in (0, -sig, 128 + sig), (code, log[-2000:])
    assert "Application shutdown complete" in log
    assert out.get("status") == 200 and out.get("done"), (out.get("error"), log[-2000:])
    text = [c for c in out["chunks"] if c["choices"]]
    assert text[-1]["choices"][0]["finish_reason"] == "length"  # it ran to its end, not cut off
    assert out["done"] > out["signalled"]  # the request was still running when the signal landed
    assert not left, f"left running after exit: {[(c.pid, c.name()) for c in left]}"


def test_graceful_timeout_ends_open_requests_with_a_clear_error(gguf, tmp_path):
    """With --graceful-timeout, a request still running when it is about to run out gets an in-band 503 naming the
    shutdown and the stream's [DONE], not a connection cut without a word."""
    root, path = gguf
    cmd = serve_cmd("--model", str(path), "--adapters", str(root / "adapters"), "--graceful-timeout", "0.4")
    body = {"model": "sent", "prompt": "the movie was", "max_tokens": NEW, "n": 4, "temperature": 0, "ignore_eos": True}
    code, out, _, left, log = run_and_stop(cmd, signal.SIGTERM, body, tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert code in (0, -signal.SIGTERM) and not left, (code, log[-2000:])
    assert out.get("status") == 200 and out.get("done"), (out.get("error"), log[-2000:])
    errors = [c["error"] for c in out["chunks"] if "error" in c]
    assert len(errors) == 1 and errors[0]["code"] == 503 and "--graceful-timeout" in errors[0]["message"], out["chunks"][-3:]
    assert not any(c["choices"][0]["finish_reason"] for c in out["chunks"] if c.get("choices"))  # cut short, said so


@pytest.mark.vllm
def test_sigterm_ends_vllms_engine_core_and_workers(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                                      pad_token_id=0, eos_token_id=2, bos_token_id=3)).eval()
    hf.save_pretrained(tmp_path / "model")
    id_tokenizer().save_pretrained(tmp_path / "model")
    pt.attach(hf, pt.PrefixConfig(num_virtual_tokens=16), "a16").save_adapter(tmp_path / "adapters" / "a16", "a16")
    cmd = serve_cmd("--backend", "vllm", "--dtype", "float32", "--model", str(tmp_path / "model"), "--adapters",
                    str(tmp_path / "adapters"))
    body = {"model": "a16", "prompt": "w5 w9 w10", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}
    code, out, children, left, log = run_and_stop(cmd, signal.SIGTERM, body, tmp_path, env=env)
    assert children, "vLLM runs its engine core in a process of its own; none was seen"
    assert code in (0, -signal.SIGTERM), (code, log[-2000:])
    assert out.get("status") == 200 and out.get("done"), (out.get("error"), log[-2000:])
    assert out["done"] > out["signalled"]
    assert not left, f"left running after exit: {[(c.pid, c.name()) for c in left]}"
