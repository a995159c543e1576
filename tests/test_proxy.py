"""The proxy against fake OpenAI backends on loopback: the P/D hand-off, streaming, errors."""

import asyncio
import json
import time

import httpx
import pytest
from conftest import serve as _serve
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from cachegen_vllm.serving.proxy import create_app
from cachegen_vllm.testing.ports import free_ports


def fake_backend(name: str, seen: list):
    app = FastAPI()

    async def handle(request: Request, path: str):
        body = await request.json()
        seen.append((name, path, body))
        params = body.get("kv_transfer_params") or {}
        if body.get("model") == "slow" or (body.get("model") == "broken" and name.startswith("decode")):
            await asyncio.sleep(0.5 if body["model"] == "slow" else 5)
        if body.get("model") == "broken":
            return JSONResponse({"error": {"message": f"{name} says no"}}, status_code=422)
        if params.get("do_remote_decode"):  # a prefill instance hands back where the KV waits
            seen.append((name, "answered", None))
            return {
                "choices": [{"text": "x"}],
                "kv_transfer_params": {
                    "do_remote_prefill": True,
                    "transfer_id": params["transfer_id"],
                    "producer": f"tcp://{name}",
                    "producer_tp": 3,  # a tensor-parallel prefill: the decode needs to know
                    "kv_tokens_per_s": float(len(seen)),  # its estimate changes with every answer
                },
            }
        if body.get("stream"):

            async def events():
                for word in ("hello", " world"):
                    yield f"data: {json.dumps({'choices': [{'text': word}], 'from': name})}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        return {"choices": [{"text": "hello world"}], "from": name}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, "/v1/chat/completions")

    app.get("/v1/models")(lambda: {"data": [{"id": "m"}], "from": name})
    app.get("/health")(lambda: {"ok": True})
    return app


@pytest.fixture(scope="module")
def cluster():
    seen: list = []
    servers = []
    urls = {}
    for name in ("prefill-a", "prefill-b", "decode-a", "decode-b"):
        urls[name], server = _serve(fake_backend(name, seen))
        servers.append(server)
    proxy_url, server = _serve(create_app([urls["prefill-a"], urls["prefill-b"]], [urls["decode-a"], urls["decode-b"]]))
    servers.append(server)
    yield proxy_url, seen, urls
    for server in servers:
        server.should_exit = True


def requests_to(seen, prefix):
    return [(name, body) for name, path, body in seen if name.startswith(prefix) and path != "answered"]


def test_first_request_hands_over_then_later_ones_overlap_the_legs():
    seen = []
    backends = [_serve(fake_backend(name, seen)) for name in ("prefill", "decode")]
    proxy, server = _serve(create_app([backends[0][0]], [backends[1][0]]))
    try:
        r = httpx.post(f"{proxy}/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 20}, timeout=10)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "hello world"
        # The first request to a prefill instance: prefill, its answer, then decode with that answer.
        assert [name for name, _, _ in seen] == ["prefill", "prefill", "decode"]
        p_body, d_body = seen[0][2], seen[2][2]
        assert (
            p_body["max_tokens"] == 1
            and p_body["stream"] is False
            and p_body["kv_transfer_params"]["do_remote_decode"] is True
        )
        tid = p_body["kv_transfer_params"]["transfer_id"]
        assert d_body["max_tokens"] == 20 and d_body["prompt"] == "hi"
        assert d_body["kv_transfer_params"] == {
            "do_remote_prefill": True,
            "transfer_id": tid,
            "producer": "tcp://prefill",
            "producer_tp": 3,
            "kv_tokens_per_s": 2.0,
        }
        # Later ones: the decode leg starts while the (slow) prefill is still computing, with the
        # estimate of the previous answer; a new estimate is no reason to send it again.
        seen.clear()
        r = httpx.post(f"{proxy}/v1/completions", json={"model": "slow", "prompt": "hi"}, timeout=10)
        assert r.status_code == 200
        assert sorted(name for name, _, _ in seen[:2]) == ["decode", "prefill"] and seen[2][:2] == (
            "prefill",
            "answered",
        )
        ((_, p_body),) = requests_to(seen, "prefill")
        ((_, d_body),) = requests_to(seen, "decode")
        tid = p_body["kv_transfer_params"]["transfer_id"]
        assert d_body["kv_transfer_params"] == {
            "do_remote_prefill": True,
            "transfer_id": tid,
            "producer": "tcp://prefill",
            "producer_tp": 3,
            "kv_tokens_per_s": 2.0,
        }
        # A failed prefill cancels the decode leg at once (it would take 5 s) and its error comes back.
        started = time.monotonic()
        r = httpx.post(f"{proxy}/v1/completions", json={"model": "broken", "prompt": "hi"}, timeout=10)
        assert r.status_code == 422 and "prefill says no" in r.json()["error"]["message"]
        assert time.monotonic() - started < 2
    finally:
        for _, s in [*backends, (proxy, server)]:
            s.should_exit = True


def test_chat_streaming_is_relayed(cluster):
    proxy, seen, _ = cluster
    seen.clear()
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "max_completion_tokens": 9,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{proxy}/v1/chat/completions", json=body, timeout=10) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1]) == "hello world"
    ((_, prefill_body),) = requests_to(seen, "prefill")
    ((_, decode_body),) = requests_to(seen, "decode")
    assert prefill_body["max_completion_tokens"] == 1 and "stream_options" not in prefill_body
    assert decode_body["stream"] is True and decode_body["max_completion_tokens"] == 9


def test_round_robin_over_instances(cluster):
    proxy, seen, _ = cluster
    seen.clear()
    for _ in range(4):
        httpx.post(f"{proxy}/v1/completions", json={"model": "m", "prompt": "hi"}, timeout=10)
    prefills = [name for name, _ in requests_to(seen, "prefill")]
    decodes = [name for name, _ in requests_to(seen, "decode")]
    assert prefills in (["prefill-a", "prefill-b"] * 2, ["prefill-b", "prefill-a"] * 2)
    assert decodes in (["decode-a", "decode-b"] * 2, ["decode-b", "decode-a"] * 2)


def test_backend_errors_pass_through_with_their_status(cluster):
    proxy, _, _ = cluster
    r = httpx.post(f"{proxy}/v1/completions", json={"model": "broken", "prompt": "hi"}, timeout=10)
    assert r.status_code == 422 and "says no" in r.json()["error"]["message"]
    r = httpx.post(f"{proxy}/v1/completions", content=b"{not json", timeout=10)
    assert r.status_code == 400


def test_models_and_health(cluster):
    proxy, _, _ = cluster
    assert httpx.get(f"{proxy}/v1/models", timeout=10).json()["data"] == [{"id": "m"}]
    health = httpx.get(f"{proxy}/health", timeout=10)
    assert health.status_code == 200 and all(health.json()["backends"].values())


def test_unreachable_backend_is_a_502():
    url, server = _serve(create_app([f"http://127.0.0.1:{free_ports()}"], [f"http://127.0.0.1:{free_ports()}"]))
    try:
        r = httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": "hi"}, timeout=10)
        assert r.status_code == 502 and "prefill instance" in r.json()["error"]["message"]
        assert httpx.get(f"{url}/health", timeout=10).status_code == 503
    finally:
        server.should_exit = True
