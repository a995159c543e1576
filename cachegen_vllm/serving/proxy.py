"""An OpenAI-compatible front end for disaggregated serving: one endpoint for clients, a prefill
instance and a decode instance behind it.

Each completion is sent to a prefill instance with ``max_tokens=1`` and
``kv_transfer_params={"do_remote_decode": true, "transfer_id": ...}``: it computes the prompt's KV
and its connector streams it out, layer by layer. The decode instance gets the original request
with ``kv_transfer_params`` that say where the KV waits and under which id; it loads the KV and
generates, and its answer, streamed or not, goes back to the client unchanged.

Both legs start at once: the decode instance pulls each layer's frames while the prefill is still
computing later layers, so the transfer hides behind the prefill's compute. That needs the prefill's
KV endpoint before it answers; the proxy learns it from the prefill's first answer (the
``producer`` of its ``kv_transfer_params``), so the first request to each prefill instance runs its
legs one after the other (as all do with ``--no-overlap``). If the prefill leg fails, the decode leg
is cancelled (vLLM aborts it and the connector stops its transfer) and the prefill's error goes
back. A decode leg waits for its KV up to the decode's ``load_timeout_s`` (then recomputes), so a
prefill queue longer than that is a reason for ``--no-overlap``. A decode instance waiting for KV
steps its engine continuously (vLLM polls the connector), which costs a core: on a machine shared
with the prefill, pin each instance to its own cores or the prefill slows down.

Prefill and decode instances are chosen round robin. A backend's error comes back with its own
status and body. The transfer id and its secret are made here, not taken from vLLM's request ids,
which differ per instance; a client's own ``kv_transfer_params`` are dropped (the legs carry only
params made here or by the prefill), its ``Authorization`` goes to both legs, and a client that
disconnects cancels both. The proxy authenticates nobody itself: put it behind what does.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import logging
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cachegen_vllm.params import ParamsError, RemoteDecode, RemotePrefill, new_transfer_id, new_transfer_secret

log = logging.getLogger("cachegen_vllm.serving.proxy")

HOP_BY_HOP = {"content-length", "transfer-encoding", "connection", "content-encoding"}
FORWARDED = ("authorization", "x-request-id")  # the client's headers both legs carry (vLLM's --api-key)
CLIENT_CHECK_S = 0.1  # how often a waiting request looks whether its client is still there


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "proxy_error", "code": status}}, status_code=status)


def _passthrough(response: httpx.Response) -> Response:
    headers = {k: v for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP}
    return Response(response.content, status_code=response.status_code, headers=headers)


def _send_decode(http: httpx.AsyncClient, url: str, body: dict, headers: dict) -> asyncio.Task:
    """The decode leg: a task for its response, streamed (headers in, body not yet read)."""
    return asyncio.create_task(http.send(http.build_request("POST", url, json=body, headers=headers), stream=True))


async def _client_left(request: Request) -> None:
    """Returns once the client has disconnected."""
    while not await request.is_disconnected():
        await asyncio.sleep(CLIENT_CHECK_S)


async def _unless_client_left(leg: asyncio.Task, request: Request):
    """The leg's result, or None if the client disconnected first (the leg is then cancelled:
    closing its connection makes vLLM abort the request)."""
    watcher = asyncio.create_task(_client_left(request))
    try:
        await asyncio.wait({leg, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not leg.done():
        await _cancel(leg)
        return None
    return await leg


async def _cancel(leg: asyncio.Task | None) -> None:
    """Abandon a decode leg: closing its connection makes vLLM abort the request."""
    if leg is None:
        return
    leg.cancel()
    try:
        response = await leg
    except (asyncio.CancelledError, httpx.HTTPError):
        return
    await response.aclose()


def create_app(
    prefill_urls: list[str], decode_urls: list[str], timeout_s: float = 600.0, overlap: bool = True
) -> FastAPI:
    if not prefill_urls or not decode_urls:
        raise ValueError("the proxy needs at least one prefill and one decode URL")
    prefills = itertools.cycle([u.rstrip("/") for u in prefill_urls])
    decodes = itertools.cycle([u.rstrip("/") for u in decode_urls])
    clients: dict[str, httpx.AsyncClient] = {}
    # prefill URL -> its last answer's params: where its KV waits and its latest link estimate
    producers: dict[str, RemotePrefill] = {}

    @asynccontextmanager
    async def lifespan(app):
        clients["http"] = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10.0))
        yield
        await clients["http"].aclose()

    app = FastAPI(title="cachegen-vllm proxy", lifespan=lifespan)

    async def disaggregated(request: Request, path: str) -> Response:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return _error(400, "the request body is not valid JSON")
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object")
        body.pop("kv_transfer_params", None)  # the legs carry only params made here or by the prefill
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED}
        http = clients["http"]
        transfer_id, secret = new_transfer_id(), new_transfer_secret()
        prefill_url, decode_url = next(prefills), next(decodes)
        prefill_body = dict(
            body, stream=False, max_tokens=1, kv_transfer_params=RemoteDecode(transfer_id, secret).to_params()
        )
        prefill_body.pop("stream_options", None)
        if "max_completion_tokens" in prefill_body:
            prefill_body["max_completion_tokens"] = 1
        prefill_leg = asyncio.create_task(http.post(f"{prefill_url}{path}", json=prefill_body, headers=headers))
        told = producers.get(prefill_url) if overlap else None
        decode_leg = None
        if told:  # overlap: the decode pulls the KV while the prefill computes it
            params = dataclasses.replace(told, transfer_id=transfer_id, secret=secret, num_tokens=None).to_params()
            decode_leg = _send_decode(http, f"{decode_url}{path}", dict(body, kv_transfer_params=params), headers)
        try:
            prefill = await _unless_client_left(prefill_leg, request)
        except httpx.HTTPError as e:
            await _cancel(decode_leg)
            return _error(502, f"prefill instance {prefill_url} unreachable: {e}")
        if prefill is None:  # the client left: nobody wants the answer
            await _cancel(decode_leg)
            return _error(499, "the client disconnected")
        if prefill.status_code != 200:
            await _cancel(decode_leg)
            return _passthrough(prefill)
        try:
            answer = prefill.json()
            learnt = RemotePrefill.from_params(answer.get("kv_transfer_params") if isinstance(answer, dict) else None)
        except json.JSONDecodeError:
            await _cancel(decode_leg)
            return _error(502, f"prefill instance {prefill_url} answered 200 with a body that is not JSON")
        except ParamsError as e:
            log.warning("prefill %s answered with unusable params (%s); decode recomputes the prompt", prefill_url, e)
            learnt = None
        if learnt is not None:
            producers[prefill_url] = learnt
        if decode_leg is None or told is None or learnt is None or learnt.place != told.place:
            # first request to this prefill, or it has no connector or moved: hand over now
            await _cancel(decode_leg)
            if learnt is None:
                log.warning("prefill %s returned no kv_transfer_params; decode recomputes the prompt", prefill_url)
            decode_body = dict(body, kv_transfer_params=learnt.to_params()) if learnt else body
            decode_leg = _send_decode(http, f"{decode_url}{path}", decode_body, headers)
        try:
            upstream = await _unless_client_left(decode_leg, request)
        except httpx.HTTPError as e:
            return _error(502, f"decode instance {decode_url} unreachable: {e}")
        if upstream is None:
            return _error(499, "the client disconnected")
        if upstream.status_code != 200 or not body.get("stream"):
            await upstream.aread()
            await upstream.aclose()
            return _passthrough(upstream)

        async def relay():
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:
                await upstream.aclose()

        return StreamingResponse(
            relay(), status_code=200, media_type=upstream.headers.get("content-type", "text/event-stream")
        )

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await disaggregated(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await disaggregated(request, "/v1/chat/completions")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        url = next(decodes)
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED}
        try:
            return _passthrough(await clients["http"].get(f"{url}/v1/models", headers=headers))
        except httpx.HTTPError as e:
            return _error(502, f"decode instance {url} unreachable: {e}")

    @app.get("/health")
    async def health() -> Response:
        status = {}
        for url in dict.fromkeys([*prefill_urls, *decode_urls]):
            try:
                status[url] = (await clients["http"].get(f"{url.rstrip('/')}/health", timeout=5.0)).status_code == 200
            except httpx.HTTPError:
                status[url] = False
        healthy = any(status[u] for u in prefill_urls) and any(status[u] for u in decode_urls)
        return JSONResponse({"healthy": healthy, "backends": status}, status_code=200 if healthy else 503)

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cachegen-vllm proxy", description=__doc__.splitlines()[0])
    parser.add_argument("--prefill", nargs="+", required=True, help="prefill instance base URLs")
    parser.add_argument("--decode", nargs="+", required=True, help="decode instance base URLs")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for one backend request")
    parser.add_argument(
        "--no-overlap",
        action="store_true",
        help="send the decode leg only after the prefill answered "
        "(the transfer then starts after the prefill's compute)",
    )
    args = parser.parse_args(argv)
    import uvicorn

    uvicorn.run(
        create_app(args.prefill, args.decode, args.timeout, overlap=not args.no_overlap),
        host=args.host,
        port=args.port,
        log_level="info",
    )


if __name__ == "__main__":
    main()
