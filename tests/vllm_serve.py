"""A real `vllm serve` subprocess for tests (the OpenAI backend's and the vLLM-server backend's), and the
on-policy check both vLLM backends' training tests make.

Started on a free localhost port with vLLM's own API server, in the vLLM venv's Python; stopped
by its pid only (SIGTERM, then SIGKILL after 30 s). On CPU: a 1 GiB KV cache (vLLM would
otherwise reserve a share of host RAM), eager mode (no graph capture), the checkpoint's own
context size.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_server(checkpoint: Path | str, served: str, log_path: Path, args: list[str] = (),
                env: dict[str, str] | None = None, timeout_s: float = 600) -> Iterator[dict]:
    """Yields {"url": ".../v1", "log": log_path, "pid": pid} once /health answers 200."""
    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
         "--served-model-name", served, "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
         "--max-model-len", "2048", "--seed", "0", *args],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})},
        cwd=REPO,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"vLLM server not healthy after {timeout_s:.0f} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield {"url": f"{base}/v1", "log": log_path, "pid": proc.pid}
    finally:
        proc.terminate()  # by its pid; the server shuts down on SIGTERM
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def sampled_logprob_gaps(policy, batch, n: int = 20) -> list[float]:
    """Per sample (the first `n`): the largest gap between a sampled token's log-prob, as the
    generation backend returned it, and the one the trainer's score() gives it now."""
    import torch

    out = []
    for s in batch[:n]:
        with torch.no_grad():
            lp, _ = policy.score([s.segment])[0]
        mask = torch.tensor(s.segment.loss_mask, dtype=torch.bool)
        out.append(float((lp[mask] - torch.tensor(s.segment.logprobs)[mask]).abs().max()))
    return out
