"""An ASGI app (our proxy, a fake backend) served in this process, for tests and benchmarks."""

from __future__ import annotations

import threading
import time
from typing import Any

from cachegen_vllm.testing.ports import free_ports


def serve(app: Any, timeout_s: float = 10.0) -> tuple[str, Any]:
    """Run ``app`` with uvicorn in a thread on a free loopback port: (its url, the server, whose
    ``should_exit`` stops it). RuntimeError if it has not started within ``timeout_s``."""
    import uvicorn

    port = free_ports()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        raise RuntimeError(f"the app on port {port} did not start within {timeout_s} s")
    return f"http://127.0.0.1:{port}", server
