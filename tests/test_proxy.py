"""The proxy against fake OpenAI backends on loopback: the P/D hand-off, streaming, errors."""

import asyncio
import json
import time

import httpx
import pytest
from conftest import wait_until
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from cachegen_vllm.serving.proxy import create_app
from cachegen_vllm.testing.asgi import serve
from cachegen_vllm.testing.ports import free_ports


def fake_backend(name: str, seen: list, headers: list | None = None):
    """An OpenAI server's stand-in: records every request it gets in ``seen`` (and the Authorization
    it came with in ``headers``); the request's model says how it answers."""
    app = FastAPI()
    headers = [] if headers is None else headers

    async def handle(request: Request, path: str):
        body = await request.json()
        seen.append((name, path, body))
        headers.append((name, request.headers.get("authorization")))
        params = body.get("kv_transfer_params") or {}
        if body.get("model") == "hang":  # until its client leaves
            for _ in range(100):
                if await request.is_disconnected():
                    seen.append((name, "cancelled", None))
                    return {}
                await asyncio.sleep(0.05)
        if body.get("model") == "slow" or (body.get("model") == "broken" and name.startswith("decode")):
            await asyncio.sleep(0.5 if body["model"] == "slow" else 5)
        if body.get("model") == "broken":
            return JSONResponse({"error": {"message": f"{name} says no"}}, status_code=422)
        if body.get("model") == "garbled" and name.startswith("prefill"):
            return PlainTextResponse("not JSON")
        if body.get("model") == "plain" and name.startswith("prefill"):  # a prefill without our connector
            return {"choices": [{"text": "x"}]}
        if params.get("do_remote_decode"):  # a prefill instance hands back where the KV waits
            seen.append((name, "answered", None))
            return {
                "choices": [{"text": "x"}],
                "kv_transfer_params": {
                    "do_remote_prefill": True,
                    "transfer_id": params["transfer_id"],
                    "transfer_secret": params["transfer_secret"],
                    "producer": f"tcp://{name}:5601",
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
        urls[name], server = serve(fake_backend(name, seen))
        servers.append(server)
    proxy_url, server = serve(create_app([urls["prefill-a"], urls["prefill-b"]], [urls["decode-a"], urls["decode-b"]]))
    servers.append(server)
    yield proxy_url, seen, urls
    for server in servers:
        server.should_exit = True


def requests_to(seen, prefix):
    return [(name, body) for name, path, body in seen if name.startswith(prefix) and path != "answered"]


def test_first_request_hands_over_then_later_ones_overlap_the_legs():
    seen = []
    backends = [serve(fake_backend(name, seen)) for name in ("prefill", "decode")]
    proxy, server = serve(create_app([backends[0][0]], [backends[1][0]]))
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
        tid, secret = p_body["kv_transfer_params"]["transfer_id"], p_body["kv_transfer_params"]["transfer_secret"]
        assert d_body["max_tokens"] == 20 and d_body["prompt"] == "hi"
        assert d_body["kv_transfer_params"] == {
            "do_remote_prefill": True,
            "transfer_id": tid,
            "transfer_secret": secret,
            "producer": "tcp://prefill:5601",
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
        tid, secret = p_body["kv_transfer_params"]["transfer_id"], p_body["kv_transfer_params"]["transfer_secret"]
        assert d_body["kv_transfer_params"] == {
            "do_remote_prefill": True,
            "transfer_id": tid,
            "transfer_secret": secret,
            "producer": "tcp://prefill:5601",
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
    url, server = serve(create_app([f"http://127.0.0.1:{free_ports()}"], [f"http://127.0.0.1:{free_ports()}"]))
    try:
        r = httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": "hi"}, timeout=10)
        assert r.status_code == 502 and "prefill instance" in r.json()["error"]["message"]
        assert httpx.get(f"{url}/health", timeout=10).status_code == 503
    finally:
        server.should_exit = True


# ---- what clients send is data: nothing of it reaches a backend but the request itself ---------


@pytest.fixture
def pair():
    """A proxy in front of one prefill and one decode, each recording what it got."""
    seen: list = []
    headers: list = []
    backends = [serve(fake_backend(name, seen, headers)) for name in ("prefill", "decode")]
    proxy, server = serve(create_app([backends[0][0]], [backends[1][0]]))
    yield proxy, seen, headers
    for _, s in [*backends, (proxy, server)]:
        s.should_exit = True


def test_a_clients_own_kv_transfer_params_never_reach_a_backend(pair):
    """Whatever params a client sends, a prefill gets the proxy's and a decode the prefill's answer
    or none: made-up ones would point the decode at any producer, or at another request's KV."""
    proxy, seen, _ = pair
    forged = {"do_remote_prefill": True, "transfer_id": "cg-other", "transfer_secret": "ab" * 16}
    forged["producer"] = "tcp://10.9.9.9:5601"
    for model in ("m", "plain"):  # a prefill that answers with params, and one that answers without
        seen.clear()
        body = {"model": model, "prompt": "hi", "kv_transfer_params": forged}
        assert httpx.post(f"{proxy}/v1/completions", json=body, timeout=10).status_code == 200
        ((_, prefill_body),) = requests_to(seen, "prefill")
        transfer_id = prefill_body["kv_transfer_params"]["transfer_id"]
        assert transfer_id != "cg-other"
        decode_bodies = [body for _, body in requests_to(seen, "decode")]  # an overlapped leg, maybe re-sent
        for decode_body in decode_bodies:
            params = decode_body.get("kv_transfer_params")
            assert params is None or (params["producer"], params["transfer_id"]) == ("tcp://prefill:5601", transfer_id)
        assert ("kv_transfer_params" in decode_bodies[-1]) == (model == "m")


def test_a_prefill_answer_that_is_not_json_is_a_502_and_ends_the_decode_leg(pair):
    proxy, seen, _ = pair
    assert httpx.post(f"{proxy}/v1/completions", json={"model": "m", "prompt": "hi"}, timeout=10).status_code == 200
    seen.clear()  # the next request overlaps its legs: the decode's has started when the prefill answers
    r = httpx.post(f"{proxy}/v1/completions", json={"model": "garbled", "prompt": "hi"}, timeout=10)
    assert r.status_code == 502 and "not JSON" in r.json()["error"]["message"]


def test_a_client_that_leaves_cancels_the_legs(pair):
    proxy, seen, _ = pair
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{proxy}/v1/completions", json={"model": "hang", "prompt": "hi"}, timeout=0.5)
    assert wait_until(lambda: ("prefill", "cancelled", None) in seen, timeout=3)


def test_the_clients_authorization_reaches_both_legs(pair):
    """Backends started with vLLM's --api-key answer only requests that carry it."""
    proxy, _, headers = pair
    auth = {"Authorization": "Bearer sk-test"}
    r = httpx.post(f"{proxy}/v1/completions", json={"model": "m", "prompt": "hi"}, headers=auth, timeout=10)
    assert r.status_code == 200
    assert headers == [("prefill", "Bearer sk-test"), ("decode", "Bearer sk-test")]
