"""Where the connector's device work runs, and when the host waits for it.

The forward pass must not wait for compression. On a GPU, `save_kv_layer` only enqueues: an event
marks the layer's cache as written on the compute stream, the encode stream waits for that event
and runs the kernels into one frame buffer, the frames come back into pinned host memory
asynchronously, and the sealer thread waits for that copy's event before it seals the frames and
hands them to the transport. What waits for the sealer is bounded (`Staging`: the pinned memory,
allocated at start-up, and the reference codec's inputs): past the bound the forward pass waits. The
compute stream is ordered after the encode stream on the device (`join_encodes`), never by a host
wait. The decode side runs its kernels on a stream of its own, from frames staged in pinned memory,
and waits for them before it reports a request loaded.

Three implementations, one interface: `CudaRuntime` (streams, events, pinned staging, a sealer
thread), and for CPU caches `Runtime`, the synchronous one (work runs when it is enqueued,
in the caller's thread; events are always complete), or, where the process has a core its compute
threads leave free, `ThreadedRuntime`: the sealer's jobs (on a CPU, the whole encoding) run on a
thread of their own beside the forward pass, which waits for them only at the step's end
(`join_encodes`). The connector calls the same methods on all, so CI exercises its GPU code paths
on vLLM's CPU backend.

Host calls that enqueue device work (launches, copies, events, buffers) are counted in `work`, so
that a CPU run counts what a step costs the forward pass's thread on a GPU. Host synchronizations
are counted in `host_syncs`: the runtime's own waits, and, inside
`counting_host_syncs`, every tensor call that makes the host wait for a GPU (``.item()``,
``.cpu()``, ``bool()``, boolean indexing...), on any device, so that a CPU run counts what a GPU
run would wait for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger("vllm.cachegen_vllm.device")


class Event(Protocol):
    """A point in a stream's work; `Runtime.wait` makes the host wait for it."""

    def done(self) -> bool: ...


class _Complete:
    """The event of a synchronous runtime: whatever it marks has happened."""

    def done(self) -> bool:
        return True


COMPLETE = _Complete()


DEFAULT_STAGING_BYTES = 512 << 20


@dataclass(eq=False)
class Hold:
    """Bytes held for the sealer (`Staging.hold`); ``host``: pinned memory for them, where asked on a GPU."""

    nbytes: int
    host: torch.Tensor | None = None


class Staging:
    """What the encode side holds between the forward pass and the sealer, at most ``limit`` bytes:
    layers' frames in host memory and the reference codec's inputs on the device. `hold` waits while
    the sealer holds too much, so a lagging sealer slows the forward pass instead of growing memory;
    a hold larger than the limit goes alone. On a GPU (``pinned``) the frames' host memory is carved
    from one pinned buffer of ``limit`` bytes allocated here, at start-up, in the order the sealer
    gives it back."""

    def __init__(self, limit: int, pinned: bool = False):
        self.limit = limit
        self._ring = torch.empty(limit, dtype=torch.uint8, pin_memory=True) if pinned else None
        self._spans: OrderedDict[int, tuple[int, int]] = OrderedDict()  # ring spans held, oldest first
        self._held = 0
        self._cond = threading.Condition()
        self.peak = 0  # the most bytes ever held at once
        self.waits = 0  # holds that waited for the sealer

    def hold(self, nbytes: int, host: bool = False) -> Hold:
        """Hold ``nbytes`` until `let_go` (waiting if need be); ``host``: with host memory for them
        on a GPU (elsewhere the device's memory is the host's)."""
        pinned = host and self._ring is not None
        with self._cond:
            waited = False
            while True:
                alone = self._held == 0
                if alone or self._held + nbytes <= self.limit:
                    span = self._place(nbytes) if pinned else None
                    if span is not None or not pinned or alone:
                        break
                if not waited:
                    self.waits += 1
                    waited = True
                self._cond.wait()
            self._held += nbytes
            self.peak = max(self.peak, self._held)
            hold = Hold(nbytes)
            if span is not None:
                assert self._ring is not None
                self._spans[id(hold)] = span
                hold.host = self._ring[span[0] : span[1]]
        if pinned and hold.host is None:  # larger than the whole buffer: its own, once
            hold.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return hold

    def _place(self, nbytes: int) -> tuple[int, int] | None:
        """Where ``nbytes`` fit in the ring after the newest span held, before the oldest."""
        assert self._ring is not None
        if not self._spans:
            return (0, nbytes) if nbytes <= self.limit else None
        oldest, newest = next(iter(self._spans.values())), next(reversed(self._spans.values()))
        if newest[0] >= oldest[0]:  # not wrapped: free after the newest, or from the start to the oldest
            if newest[1] + nbytes <= self.limit:
                return newest[1], newest[1] + nbytes
            return (0, nbytes) if nbytes <= oldest[0] else None
        return (newest[1], newest[1] + nbytes) if newest[1] + nbytes <= oldest[0] else None

    def let_go(self, hold: Hold) -> None:
        with self._cond:
            self._held -= hold.nbytes
            self._spans.pop(id(hold), None)
            self._cond.notify_all()

    @property
    def held(self) -> int:
        with self._cond:
            return self._held


class Runtime:
    """The synchronous runtime, for CPU caches: every method keeps the CUDA runtime's contract,
    with nothing left to wait for."""

    kind = "cpu"
    encode_holds_compute = True  # the forward pass waits while a layer is encoded

    def __init__(self, device: torch.device, staging_bytes: int = DEFAULT_STAGING_BYTES):
        self.device = device
        self.host_syncs = 0
        self.work: Counter[str] = Counter()  # host calls that enqueue device work, by kind
        self._lock = threading.Lock()
        self.staging = Staging(staging_bytes, pinned=device.type == "cuda")

    def count_sync(self, n: int = 1) -> None:
        with self._lock:
            self.host_syncs += n

    def note(self, kind: str, n: int = 1) -> None:
        """Count host calls that enqueue device work (``kind``: launches, copies, events...)."""
        with self._lock:
            self.work[kind] += n

    # ---- streams and events ------------------------------------------------------------------

    def mark(self) -> Event:
        """An event after all work enqueued so far on the current stream."""
        self.note("events")
        return COMPLETE

    def encoding(self, after: Event | None = None) -> contextlib.AbstractContextManager[None]:
        """Make the encode stream current, its work ordered after ``after``."""
        return contextlib.nullcontext()

    def decoding(self, after: Event | None = None) -> contextlib.AbstractContextManager[None]:
        """Make the decode stream current (after ``after`` was reached on its stream)."""
        return contextlib.nullcontext()

    def join_encodes(self) -> None:
        """Order the current (compute) stream after the encode work enqueued so far, on the device."""

    def wait(self, event: Event) -> None:
        """The host waits for ``event`` (counted)."""
        self.count_sync()

    # ---- host memory -------------------------------------------------------------------------

    def reserve_frames(self, nbytes: int) -> None:
        """Allocate the frame buffer for layers of up to ``nbytes`` now, at start-up (a GPU's)."""

    def frame_buffer(self, nbytes: int) -> torch.Tensor:
        """uint8 zeros [nbytes] on the device for one layer's frames, zeroed on the current stream.
        Valid until the next call: its contents must be copied (`to_host`) first, on the same stream."""
        self.note("buffers")
        return torch.zeros(nbytes, dtype=torch.uint8, device=self.device)

    def to_host(self, tensor: torch.Tensor, hold: Hold) -> torch.Tensor:
        """A host copy of uint8 ``tensor`` in ``hold``'s memory (`Staging.hold` with ``host``),
        complete once an event marked after this call is waited for (here: the tensor itself)."""
        self.note("copies")
        return tensor

    def to_device(self, array: np.ndarray) -> torch.Tensor:
        """``array`` on the device, enqueued on the current stream (from pinned memory on a GPU: a
        copy from pageable memory would make the host wait for the stream)."""
        self.note("copies")
        host = torch.from_numpy(array)
        return host if self.device.type == "cpu" else host.to(self.device)

    def stage(self, parts: Sequence[tuple[int, memoryview]], nbytes: int) -> torch.Tensor:
        """uint8 [nbytes] on the device with each part's bytes at its offset (the rest undefined),
        enqueued on the current stream."""
        host = np.empty(nbytes, dtype=np.uint8)
        _fill(host, parts)
        return self.to_device(host)

    # ---- the sealer --------------------------------------------------------------------------

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the sealer (here: now). Jobs run one at a time, in order; a job handles
        its own errors."""
        job()

    def drain(self) -> None:
        """Return once every job submitted so far has run."""

    def close(self) -> None:
        """Stop the sealer after the jobs already submitted."""


def _fill(buffer: np.ndarray, parts: Sequence[tuple[int, memoryview]]) -> None:
    for at, part in parts:
        buffer[at : at + len(part)] = np.frombuffer(part, dtype=np.uint8)


class _CudaEvent:
    def __init__(self, stream: torch.cuda.Stream):
        self.event = torch.cuda.Event(blocking=True)  # a host waiting for it sleeps instead of spinning a core
        self.event.record(stream)

    def done(self) -> bool:
        return bool(self.event.query())


class _PinnedPool:
    """Pinned host buffers by power-of-two size, reused: allocating pinned memory is slow (it maps
    pages for the device), so each size is allocated once and kept. Buffers whose last use is an
    enqueued copy come back when its event completes."""

    KEEP = 8  # free buffers kept per size

    def __init__(self) -> None:
        self._free: dict[int, list[torch.Tensor]] = {}
        self._pending: list[tuple[Event, torch.Tensor]] = []
        self._lock = threading.Lock()

    @staticmethod
    def _size(nbytes: int) -> int:
        return max(1 << 16, 1 << (max(nbytes, 1) - 1).bit_length())

    def take(self, nbytes: int) -> torch.Tensor:
        size = self._size(nbytes)
        with self._lock:
            for event, buffer in [p for p in self._pending if p[0].done()]:
                self._pending.remove((event, buffer))
                self._put(buffer)
            free = self._free.get(size)
            if free:
                return free.pop()
        return torch.empty(size, dtype=torch.uint8, pin_memory=True)

    def _put(self, buffer: torch.Tensor) -> None:
        free = self._free.setdefault(buffer.numel(), [])
        if len(free) < self.KEEP:
            free.append(buffer)

    def give_after(self, event: Event, buffer: torch.Tensor) -> None:
        with self._lock:
            self._pending.append((event, buffer))


class _Sealer:
    """The sealer thread: jobs run one at a time, in order, beside the forward pass."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._sealer = threading.Thread(target=self._seal, name="cachegen-sealer", daemon=True)
        self._sealer.start()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def _seal(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception:  # a job reports its own failures; this keeps the sealer alive
                log.exception("a sealer job failed")
            finally:
                self._jobs.task_done()
        self._jobs.task_done()

    def drain(self) -> None:
        self._jobs.join()

    def close(self) -> None:
        if self._sealer.is_alive():
            self._jobs.put(None)
            self._sealer.join(timeout=30)


class ThreadedRuntime(_Sealer, Runtime):
    """For CPU caches where a core is spare: encodings run on the sealer thread (their torch work
    lets the forward pass's thread go on), and the step's end waits for them, since a CPU has no
    stream to order the next step after them."""

    kind = "cpu-threaded"
    encode_holds_compute = False

    def __init__(self, device: torch.device, staging_bytes: int = DEFAULT_STAGING_BYTES):
        Runtime.__init__(self, device, staging_bytes)
        _Sealer.__init__(self)

    def join_encodes(self) -> None:
        self.drain()


class CudaRuntime(_Sealer, Runtime):
    """Streams, events, pinned staging and a sealer thread on one CUDA device."""

    kind = "cuda"
    encode_holds_compute = False

    def __init__(self, device: torch.device, staging_bytes: int = DEFAULT_STAGING_BYTES):
        Runtime.__init__(self, device, staging_bytes)
        self._encode = torch.cuda.Stream(device)
        self._decode = torch.cuda.Stream(device)
        self._pinned = _PinnedPool()  # uploads (block tables, frames to decode)
        self._frames = torch.empty(0, dtype=torch.uint8, device=device)
        _Sealer.__init__(self)

    def mark(self) -> Event:
        self.note("events")
        return _CudaEvent(torch.cuda.current_stream(self.device))

    def reserve_frames(self, nbytes: int) -> None:
        if nbytes > self._frames.numel():
            if self._frames.numel():
                log.info("CacheGenConnector: a layer's frames need %d MiB of device memory", nbytes >> 20)
                self._frames.record_stream(self._encode)  # freed only after the encode stream's use of it
            self._frames = torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def frame_buffer(self, nbytes: int) -> torch.Tensor:
        # one buffer, layer after layer: the next layer's kernels follow this one's copy on the stream
        self.note("buffers")
        self.reserve_frames(nbytes)
        return self._frames[:nbytes].zero_()

    @contextlib.contextmanager
    def encoding(self, after: Event | None = None) -> Iterator[None]:
        with torch.cuda.stream(self._encode):
            if isinstance(after, _CudaEvent):
                self._encode.wait_event(after.event)
            yield

    @contextlib.contextmanager
    def decoding(self, after: Event | None = None) -> Iterator[None]:
        with torch.cuda.stream(self._decode):
            if isinstance(after, _CudaEvent):
                self._decode.wait_event(after.event)
            yield

    def join_encodes(self) -> None:
        torch.cuda.current_stream(self.device).wait_stream(self._encode)

    def wait(self, event: Event) -> None:
        self.count_sync()
        if isinstance(event, _CudaEvent):
            event.event.synchronize()

    def to_host(self, tensor: torch.Tensor, hold: Hold) -> torch.Tensor:
        self.note("copies")
        assert hold.host is not None
        host = hold.host[: tensor.numel()]
        host.copy_(tensor, non_blocking=True)
        return host

    def to_device(self, array: np.ndarray) -> torch.Tensor:
        self.note("copies")
        buffer = self._pinned.take(array.nbytes)
        buffer.numpy()[: array.nbytes] = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        return self._upload(buffer, array.nbytes).view(torch.from_numpy(array[:0]).dtype).view(array.shape)

    def stage(self, parts: Sequence[tuple[int, memoryview]], nbytes: int) -> torch.Tensor:
        buffer = self._pinned.take(nbytes)
        _fill(buffer.numpy(), parts)
        return self._upload(buffer, nbytes)

    def _upload(self, buffer: torch.Tensor, nbytes: int) -> torch.Tensor:
        on_device = buffer[:nbytes].to(self.device, non_blocking=True)
        self._pinned.give_after(self.mark(), buffer)  # reusable once the copy is done
        return on_device


def spare_core() -> bool:
    """Whether this process may run on more cores than its compute threads use (vLLM's CPU backend
    sets torch's threads to the cores it binds)."""
    return len(os.sched_getaffinity(0)) > torch.get_num_threads()


def runtime_for(device: torch.device, staging_bytes: int = DEFAULT_STAGING_BYTES) -> Runtime:
    """The runtime for caches on ``device``, holding at most ``staging_bytes`` for the sealer."""
    if device.type == "cuda":
        return CudaRuntime(device, staging_bytes)
    return ThreadedRuntime(device, staging_bytes) if spare_core() else Runtime(device, staging_bytes)


# ---- counting the host's waits -----------------------------------------------------------------

# Tensor calls that make the host wait for a GPU's work: they read a result on the host.
_SYNCING: set[Any] = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.cpu,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.Tensor.masked_select,
    torch.masked_select,
    torch.unique,
    torch.Tensor.unique,
    torch.repeat_interleave,
}


def _syncs(func: Any, args: tuple, kwargs: dict) -> bool:
    if func in _SYNCING:
        return func is not torch.repeat_interleave or "output_size" not in kwargs
    if func is torch.Tensor.__getitem__:  # a boolean mask: the result's size is data
        index = args[1] if len(args) > 1 else None
        items = index if isinstance(index, tuple) else (index,)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)
    if func is torch.Tensor.to:  # to the host
        targets = [*args[1:], *kwargs.values()]
        return any(str(t) == "cpu" or (isinstance(t, torch.device) and t.type == "cpu") for t in targets)
    return False


class _SyncCounter(TorchFunctionMode):
    def __init__(self, runtime: Runtime):
        super().__init__()
        self.runtime = runtime

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _syncs(func, args, kwargs):
            self.runtime.count_sync()
        return func(*args, **kwargs)


@contextlib.contextmanager
def counting_host_syncs(runtime: Runtime) -> Iterator[None]:
    """Count, into ``runtime.host_syncs``, every tensor call in this thread that would make the host
    wait for a GPU, whatever the tensors' device."""
    with _SyncCounter(runtime):
        yield
