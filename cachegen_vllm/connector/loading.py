"""The connector's loading side (decode, the consumer): a request's KV is pulled from the producer
ranks that hold it and decoded into the blocks vLLM allocated for it, while other requests run.

Each `LoadRequest` pulls the frames from the first token the request lacks, from every producer
rank that holds heads of this rank (`connector.ranks`), a thread per producer rank; each layer's
frames are decoded in one batch on the decode stream, their heads of this rank written into the
allocated blocks. Whatever ends a load (all tokens in, a transport or frame error, a cancel, or a
bug), the request is reported finished once all its threads are, and its decoding has completed
on the device; if any failed, its blocks (its request, for a model of several KV cache groups)
are reported as load errors and vLLM's ``kv_load_failure_policy`` decides (``recompute``
recomputes the prompt; ``fail`` fails it). With tensor parallelism every rank reports, and vLLM
waits for all.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from vllm.logger import init_logger

from cachegen_vllm.codec import FrameError, ParsedFrame
from cachegen_vllm.codec.basis import from_bytes as basis_from_bytes
from cachegen_vllm.config import ConnectorConfig
from cachegen_vllm.connector.metadata import CacheGenMetadata, LoadRequest
from cachegen_vllm.connector.metrics import FAILURE_PREFIX, Counters
from cachegen_vllm.connector.ranks import Placement, Source, rank_endpoint, sources
from cachegen_vllm.device import Event
from cachegen_vllm.paged import PagedCaches
from cachegen_vllm.transport import FrameConsumer, TransferRefused, TransferStream, TransportError

log = init_logger("vllm.cachegen_vllm.connector")
# How long a step that computes nothing waits for a load to end before it returns. vLLM steps a
# decode whose requests all wait for KV without pause, taking a whole core from whatever shares it
# (seen: a prefill's tensor-parallel rank on that core got no CPU for 10 s under the kernel's
# per-session group scheduling, and its transfer stalled); a load that ends wakes the wait at
# once, so only a new request's arrival can wait this long.
IDLE_WAIT_S = 0.01


@dataclass
class _Load:
    """A request's load: one stream per producer rank it reads, each read by a thread of its own."""

    request: LoadRequest
    streams: list[TransferStream]
    started: float
    zeroed: Event  # its blocks were zeroed once it is reached
    pending: int
    failed: bool = False
    wire_bytes: int = 0
    window_wire_bytes: int = 0  # of them, the frames of sliding-window layers
    state_bytes: int = 0  # an SSM hybrid's states
    decode_seconds: float = 0.0


class Loading:
    """The consumer side of one rank: loads into ``caches``, reported through ``counters``."""

    def __init__(self, config: ConnectorConfig, caches: PagedCaches, placement: Placement, counters: Counters):
        self.config, self.caches, self.placement, self.counters = config, caches, placement, counters
        self._counts_requests = placement.tp_rank == 0  # a request is counted once, by the first rank
        self.consumer = FrameConsumer(config.transport)
        self._lock = threading.Lock()  # the bookkeeping below, shared with the load threads
        self._ended = threading.Condition(self._lock)  # a load ended
        self._loads: dict[str, _Load] = {}  # in flight, by request id
        self._cancelled: set[str] = set()
        self._done: set[str] = set()  # ended since the last report
        self._failed_blocks: set[int] = set()
        self._failed_requests: set[str] = set()
        self._basis_lock = threading.Lock()  # guards _fetching only, never held while waiting
        self._fetching: dict[int, threading.Event] = {}  # bases being fetched, set when that ends
        log.info("CacheGenConnector receives (the profile of each transfer is in its frames)")

    def start(self, meta: CacheGenMetadata) -> None:
        """Start the step's new loads, decline the transfers its scheduler recomputes instead, and
        cancel the loads of aborted requests. Nothing a request carried raises here: a load that
        cannot start is that request's load error."""
        zeroed = self.caches.runtime.mark()  # vLLM zeroed the loads' blocks on this stream first
        for load in meta.loads:  # before the cancels: a request may be aborted in the step its load begins
            try:
                self._start(load, zeroed)
            except Exception:
                log.exception("transfer %s cannot be loaded; kv_load_failure_policy applies", load.transfer_id)
                self.counters.count(**{FAILURE_PREFIX + "internal": 1})
                self._finish(_Load(load, [], time.perf_counter(), zeroed, pending=0, failed=True))
        for declined in meta.declined:  # recomputed here: the producer frees the frames at once
            try:
                for source in self._plan(declined):
                    endpoint = rank_endpoint(declined.producer, source.producer_rank)
                    self.consumer.decline(
                        endpoint, declined.transfer_id, bytes.fromhex(declined.secret), (source.reader, source.readers)
                    )
            except Exception:  # a decline is a courtesy: the producer evicts the frames after ttl_s anyway
                log.exception("transfer %s: the producer could not be told it is declined", declined.transfer_id)
        for req_id in meta.cancels:
            with self._lock:  # a load already over has left _loads: nothing to stop
                cancelled = self._loads.get(req_id)
                if cancelled is not None:
                    self._cancelled.add(req_id)
            if cancelled is not None:
                for stream in cancelled.streams:
                    stream.cancel()

    def finished(self, wait: bool = False) -> set[str]:
        """The requests whose loads ended since the last call, however they ended. ``wait``: the
        step computed nothing, so wait up to `IDLE_WAIT_S` for a load in flight to end first."""
        with self._lock:
            if wait and self._loads and not self._done:
                self._ended.wait(IDLE_WAIT_S)
            done, self._done = self._done, set()
        return done

    def failed_blocks(self) -> set[int]:
        """Blocks of ended loads that hold no valid KV, since the last call (reported no later than
        their request's end), of a model with one KV cache group: vLLM recomputes from the first."""
        with self._lock:
            failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def failed_requests(self) -> set[str]:
        """Requests whose loads failed since the last call (reported no later than their end), of a
        model with several KV cache groups (hybrids), whose block ids vLLM cannot map back to
        requests (it raises on them): vLLM recomputes these requests' prompts whole."""
        with self._lock:
            failed, self._failed_requests = self._failed_requests, set()
        return failed

    def close(self) -> None:
        self.consumer.close()

    def _plan(self, request: LoadRequest) -> list[Source]:
        """The producer ranks this rank reads the transfer from."""
        geometry, placement = self.caches.geometry, self.placement
        try:
            return sources(geometry.total_kv_heads, request.producer_tp, placement.tp_size, placement.tp_rank)
        except ValueError as e:  # a producer split another way than the model can be: nothing to pull
            log.warning("transfer %s cannot be loaded: %s; kv_load_failure_policy applies", request.transfer_id, e)
            return []

    def _start(self, request: LoadRequest, zeroed: Event) -> None:
        secret = bytes.fromhex(request.secret)
        endpoints = [(rank_endpoint(request.producer, source.producer_rank), source) for source in self._plan(request)]
        streams = [
            self.consumer.fetch(
                endpoint,
                request.transfer_id,
                secret,
                self.config.load_timeout_s,
                from_token=request.start,
                reader=(source.reader, source.readers),
            )
            for endpoint, source in endpoints
        ]
        load = _Load(request, streams, time.perf_counter(), zeroed, pending=len(streams), failed=not streams)
        with self._lock:
            self._loads[request.req_id] = load
        if not streams:
            self.counters.count(**{FAILURE_PREFIX + "refused": 1})
            self._finish(load)
        for stream in streams:
            name = f"cachegen-load-{request.transfer_id}"
            threading.Thread(target=self._load, args=(load, stream), name=name, daemon=True).start()

    # ---- a load's threads ------------------------------------------------------------------------

    def _load(self, load: _Load, fetch: TransferStream) -> None:
        """Fetch, decode and scatter one producer rank's frames of a transfer; the last of a
        request's threads reports it finished, with its blocks as load errors if any failed."""
        request, failed = load.request, False
        try:
            self._receive(load, fetch)
        except Exception as e:  # whatever it is, vLLM must not wait for this request forever
            failed = request.req_id not in self._cancelled  # an aborted request's blocks are simply freed
            if not failed:
                log.info("transfer %s stopped: its request was aborted", request.transfer_id)
            elif isinstance(e, (TransportError, FrameError)):
                log.warning(
                    "transfer %s from %s failed (%s: %s); kv_load_failure_policy applies",
                    request.transfer_id,
                    fetch.endpoint,
                    type(e).__name__,
                    e,
                )
                self.counters.count(**{FAILURE_PREFIX + getattr(e, "kind", "corrupt"): 1})
            else:
                log.exception(
                    "transfer %s failed on an unexpected error; kv_load_failure_policy applies", request.transfer_id
                )
                self.counters.count(**{FAILURE_PREFIX + "internal": 1})
            for sibling in load.streams:  # the request recomputes: the other ranks' frames are of no use
                if sibling is not fetch:
                    sibling.cancel()
        with self._lock:
            load.failed |= failed
            load.pending -= 1
            last = load.pending == 0
        if last:
            self._finish(load)

    def _needed(self, request: LoadRequest) -> dict[int, int]:
        """Each layer's first token of the load: its start, or a sliding window's later one."""
        end, geometry = request.start + request.count, self.caches.geometry
        return {layer: max(request.start, geometry.window_start(layer, end)) for layer in self.caches.layers}

    def _finish(self, load: _Load) -> None:
        request, geometry = load.request, self.caches.geometry
        end = request.start + request.count
        if not load.failed and request.req_id not in self._cancelled:
            transfer = time.perf_counter() - load.started
            raw = {layer: geometry.layer_bytes(end - first) for layer, first in self._needed(request).items()}
            self.counters.count(
                raw_bytes=sum(raw.values()),
                wire_bytes=load.wire_bytes,
                window_raw_bytes=sum(n for layer, n in raw.items() if geometry.window(layer)),
                window_wire_bytes=load.window_wire_bytes,
                state_bytes=load.state_bytes,
                decode_seconds=load.decode_seconds,
                transfer_seconds=transfer,
                transfers=int(self._counts_requests),
            )
            if self._counts_requests:
                self.counters.sample(transfer_duration=transfer, decode_duration=load.decode_seconds)
        with self._lock:  # both at once: vLLM wants the errors no later than the finish
            self._loads.pop(request.req_id, None)
            self._cancelled.discard(request.req_id)
            if load.failed and self.caches.num_groups > 1:  # vLLM cannot map block ids of several groups back
                self._failed_requests.add(request.req_id)
            elif load.failed:  # one group: the blocks of the tokens loaded
                first, last = request.start // self.caches.block_tokens, -(-end // self.caches.block_tokens)
                self._failed_blocks.update(request.block_ids[0][first:last])
            self._done.add(request.req_id)
            self._ended.notify_all()

    def _receive(self, load: _Load, fetch: TransferStream) -> None:
        """Pull one producer rank's frames and decode them, a layer's frames at a time, on the decode
        stream; return once the device has written them all. An SSM hybrid's states come from the
        first producer rank the request reads, each written whole into its block."""
        request, caches = load.request, self.caches
        runtime = caches.runtime
        end = request.start + request.count
        needed = self._needed(request)
        loaded = dict.fromkeys(caches.layers, 0)
        states = set(range(len(caches.geometry.states))) if fetch is load.streams[0] else set()
        batch: list[ParsedFrame] = []
        decoding, window_wire, state_bytes = 0.0, 0, 0
        if len(request.block_ids) != caches.num_groups:  # the scheduler's: a bug, not the peer's
            raise RuntimeError(f"{len(request.block_ids)} KV cache groups' blocks for a model of {caches.num_groups}")
        with runtime.decoding(after=load.zeroed):  # what follows on the decode stream comes after
            tables = caches.block_tables(request.block_ids)

        def decode_batch() -> None:
            nonlocal decoding
            t0 = time.perf_counter()
            layer = batch[0].header.layer
            with runtime.decoding():
                decoded = caches.decode(batch, tables[caches.groups[layer]], needed[layer], end)
            for layer, written in decoded:
                loaded[layer] += written
            batch.clear()
            decoding += time.perf_counter() - t0

        with fetch as stream:
            for frame in stream:
                if batch and (frame.header.state_bytes or frame.header.layer != batch[0].header.layer):
                    decode_batch()
                if frame.header.state_bytes:
                    with runtime.decoding():
                        states.discard(caches.write_state(frame, request.block_ids, end))
                    state_bytes += frame.header.state_bytes
                    continue
                self._have_basis(frame.header.basis, stream)
                window_wire += len(frame.data) if frame.header.window else 0
                batch.append(frame)
            if batch:
                decode_batch()
        with runtime.decoding():
            decoded_all = runtime.mark()
        runtime.wait(decoded_all)  # reported loaded only once the device has written the KV
        short = [layer for layer, n in loaded.items() if n != end - needed[layer]]
        if short or states:
            raise FrameError(f"transfer ended without all tokens: {len(short)} layers short, {len(states)} states")
        with self._lock:
            load.wire_bytes += stream.bytes_received
            load.window_wire_bytes += window_wire
            load.state_bytes += state_bytes
            load.decode_seconds += decoding

    def _have_basis(self, digest: int, stream: TransferStream) -> None:
        """Fetch the basis a frame is coded in from its producer, once, if this decode has none of
        that digest (a producer's automatic basis): the frames' own producer serves it. Loads that
        need the same basis wait for one fetch; others go on (a fetch holds no lock while it waits),
        and an aborted load stops waiting."""
        bases = self.caches.bases
        while digest and bases.get(digest) is None:
            with self._basis_lock:
                fetching = self._fetching.get(digest)
                mine = fetching is None
                if mine:
                    fetching = self._fetching[digest] = threading.Event()
            assert fetching is not None
            if not mine:  # another load fetches it: wait for that, then look again
                while not fetching.wait(0.1):
                    if stream.cancelled.is_set() or time.monotonic() > stream.deadline:
                        raise TransferRefused(f"transfer {stream.transfer_id} stopped while basis {digest:016x} came")
                continue
            try:
                self._fetch_basis(digest, stream)
            finally:
                with self._basis_lock:
                    del self._fetching[digest]
                fetching.set()

    def _fetch_basis(self, digest: int, stream: TransferStream) -> None:
        geometry = self.caches.geometry
        wait_s = max(0.0, stream.deadline - time.monotonic())
        data = self.consumer.fetch_basis(stream.endpoint, digest, wait_s, stream.cancelled)
        shape = (geometry.num_layers, 2, geometry.total_kv_heads, geometry.head_dim, geometry.head_dim)
        try:
            basis = basis_from_bytes(data, shape)
        except ValueError as e:
            raise FrameError(f"the basis {digest:016x} that {stream.endpoint} sent is not one: {e}") from None
        if basis.digest != digest:
            raise FrameError(f"{stream.endpoint} sent basis {basis.digest:016x} for {digest:016x}")
        self.caches.bases.add(basis)
        self.counters.count(bases_fetched=1)
        log.info("CacheGenConnector fetched basis %016x %s from %s", digest, basis.shape, stream.endpoint)
