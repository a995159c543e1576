"""The connector's scheduler side: pure request state, no tensors.

Prefill (``kv_producer``): a request whose params ask for a remote decode (`RemoteDecode`) has
every newly computed range of its prompt handed to the workers as a `SaveRequest`, step by step as
chunked prefill computes it, under the params' transfer id or one made up here. The state lives
until the request finishes, so a preempted and resumed request neither sends its tokens twice nor
reads its old blocks (a resumed request's block list replaces the old one); the workers are told
of each preemption before the step that may reuse its blocks (`CacheGenMetadata.preempted`). An aborted request's
transfer is dropped and its response carries no params.

An SSM hybrid's prefill stops one token short of such a prompt (`on_new_request`), so that its
state is the one the decode needs.

Decode (``kv_consumer``): a request whose params say where its KV waits (`RemotePrefill`) reports
the prompt, less the last token (which vLLM recomputes to sample from) and less any prefix it
already holds in its prefix cache, as loadable asynchronously, and gets a `LoadRequest`; unless
the KV, as the producer estimates its making and its link, would arrive slower than this instance
computes the prompt (``recompute_tokens_per_s``, `adaptation.should_recompute`): then it
recomputes, and the workers cancel the transfer. One load
attempt per request: asked again after a failure or a preemption, it recomputes, since the
producer has released or lost the frames by then. A request aborted while loading has its load
cancelled.

``kv_both`` does either, as each request's params ask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm.logger import init_logger
from vllm.v1.request import RequestStatus

from cachegen_vllm.adaptation import should_recompute
from cachegen_vllm.codec.geometry import rank_heads
from cachegen_vllm.config import ConnectorConfig
from cachegen_vllm.connector.metadata import CacheGenMetadata, LoadRequest, SaveRequest
from cachegen_vllm.connector.metrics import CacheGenStats
from cachegen_vllm.connector.ranks import Placement, rank_endpoint
from cachegen_vllm.params import ParamsError, RemoteDecode, RemotePrefill, new_transfer_id, new_transfer_secret

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = init_logger("vllm.cachegen_vllm.connector")
TRUNCATED = "_p_side_truncated"  # NixlConnector's mark on a prefill it stopped short: one connector does it


@dataclass
class _Saving:
    transfer_id: str
    secret: str  # hex: what the decode's PULLs prove
    total: int  # the prompt's tokens
    block_ids: tuple[list[int], ...]  # per KV cache group
    saved: int = 0  # tokens already handed to the workers


class CacheGenScheduler:
    def __init__(
        self,
        config: ConnectorConfig,
        placement: Placement | None = None,
        total_kv_heads: int | None = None,
        stops_short: bool = False,
    ):
        self.config = config
        # an SSM hybrid's prefill computes its prompt less the last token: the state the decode needs
        self._stops_short = stops_short
        self._total_kv_heads = total_kv_heads  # the model's: a producer split another way is refused
        placement = placement or Placement()
        # what a decode needs to find this engine's producers (connector.ranks)
        self._producer = rank_endpoint(config.advertise, placement.engine_offset)
        self._producer_tp = placement.tp_size
        self._saving: dict[str, _Saving] = {}
        self._new_loads: list[LoadRequest] = []
        self._new_cancels: list[str] = []
        self._new_aborts: list[str] = []
        self._local_hits: dict[str, int] = {}  # tokens a loading request already holds
        self._loaded: set[str] = set()  # requests whose load was scheduled or declined: never a second attempt
        self._new_declines: list[LoadRequest] = []
        self._kv_tokens_per_s: float | None = None  # prefill: its workers' latest estimate
        self._stats = CacheGenStats()

    def _remote_prefill(self, request: Request, report: bool = False) -> RemotePrefill | None:
        """Where the request's KV waits, if its params say so and may be believed: every field
        valid, a producer split the model allows, a producer this decode may load from. A refusal
        is counted and logged once (``report``), and the request recomputes."""
        if not self.config.receives:
            return None
        try:
            remote = RemotePrefill.from_params(request.kv_transfer_params)
            if remote is not None and self._total_kv_heads is not None:
                try:
                    rank_heads(self._total_kv_heads, remote.producer_tp, 0)
                except ValueError as e:
                    raise ParamsError(f"kv_transfer_params.producer_tp: {e}") from None
            allowed = self.config.allowed_producers
            if remote is not None and allowed is not None and not allowed.allows(remote.producer):
                raise ParamsError(f"kv_transfer_params.producer {remote.producer} is not among allowed_producers")
            return remote
        except ParamsError as e:
            if report:
                self._stats.add(params_refused=1)
                log.warning("request %s: %s; recomputing its prompt", request.request_id, e)
            return None

    def _remote_decode(self, request: Request) -> RemoteDecode | None:
        if not self.config.sends:
            return None
        try:
            return RemoteDecode.from_params(request.kv_transfer_params)
        except ParamsError as e:
            log.warning("request %s: %s; its KV is not sent (the decode recomputes it)", request.request_id, e)
            return None

    def on_new_request(self, request: Request) -> None:
        """An SSM hybrid's prefill stops one token short of a prompt it sends, as vLLM's
        NixlConnector makes it: the decode holds the prompt less its last token, and a state
        (unlike a token's K and V) exists only after all the tokens computed, so it must be the
        state after exactly those. The one token this prefill then samples is a throw-away (our
        proxy and vllm-router answer from the decode)."""
        if not self._stops_short or self._remote_decode(request) is None:
            return
        params = request.kv_transfer_params
        assert params is not None  # they asked for a remote decode
        if params.get(TRUNCATED) or request.num_prompt_tokens < 2 or request.get_skip_reading_prefix_cache():
            return  # already (NixlConnector beside us), or nothing a decode loads: it recomputes
        if request.prompt_token_ids is not None:
            del request.prompt_token_ids[-1]
        elif request.prompt_embeds is not None:
            request.prompt_embeds = request.prompt_embeds[:-1]
        else:
            return
        del request._all_token_ids[-1]
        request.num_prompt_tokens -= 1
        request.max_tokens = 1
        params[TRUNCATED] = True

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        if request.request_id in self._loaded:
            return 0, False
        remote = self._remote_prefill(request, report=True)
        if remote is None:
            return 0, False
        prompt = len(request.prompt_token_ids or [])
        # the prompt less the token vLLM computes to sample from; a prefill that stopped one short
        # (an SSM hybrid's) holds exactly that
        loadable = min(remote.num_tokens or prompt, prompt - 1)
        count = loadable - num_computed_tokens
        if count <= 0:
            return 0, False
        if self._declines(remote):
            self._loaded.add(request.request_id)
            self._new_declines.append(
                LoadRequest(
                    request.request_id, remote.transfer_id, remote.secret, remote.producer, (), 0, 0, remote.producer_tp
                )
            )
            self._stats.add(declined=1)
            log.info(
                "request %s: its KV would arrive at %.0f tokens/s, slower than recomputing it (%.0f); recomputing",
                request.request_id,
                remote.kv_tokens_per_s,
                self.config.recompute_tokens_per_s,
            )
            return 0, False
        self._local_hits[request.request_id] = num_computed_tokens
        return count, True

    def _declines(self, remote: RemotePrefill) -> bool:
        own = self.config.recompute_tokens_per_s
        arrives = remote.kv_tokens_per_s
        return own is not None and arrives is not None and should_recompute(arrives, own)

    def update_connector_output(self, stats: CacheGenStats | None) -> None:
        """Prefill: the workers' latest estimate of how fast its KV reaches a decode, for the params
        of the requests that finish."""
        if stats is not None and stats.data.get("kv_tokens_per_second"):
            self._kv_tokens_per_s = stats.data["kv_tokens_per_second"]

    def get_stats(self) -> CacheGenStats | None:
        if self._stats.is_empty():
            return None
        stats, self._stats = self._stats, CacheGenStats()
        return stats

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        remote = self._remote_decode(request)
        if remote is not None:
            if request.request_id not in self._saving:  # a resumed request keeps its progress and its id
                transfer_id = remote.transfer_id or new_transfer_id()
                secret = remote.secret or new_transfer_secret()
                total = len(request.prompt_token_ids or [])
                self._saving[request.request_id] = _Saving(transfer_id, secret, total, ())
            return
        if num_external_tokens <= 0:  # nothing to load (bad params were reported when matching)
            return
        prefill = self._remote_prefill(request)
        if prefill is None:
            return
        self._loaded.add(request.request_id)
        self._new_loads.append(
            LoadRequest(
                req_id=request.request_id,
                transfer_id=prefill.transfer_id,
                secret=prefill.secret,
                producer=prefill.producer,
                block_ids=tuple(list(group) for group in blocks.get_block_ids()),
                start=self._local_hits.pop(request.request_id, 0),
                count=num_external_tokens,
                producer_tp=prefill.producer_tp,
            )
        )

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> CacheGenMetadata:
        meta = CacheGenMetadata(
            loads=self._new_loads,
            cancels=self._new_cancels,
            aborted=self._new_aborts,
            declined=self._new_declines,
            preempted=sorted(scheduler_output.preempted_req_ids or ()),
            idle=scheduler_output.total_num_scheduled_tokens == 0,
        )
        self._new_loads, self._new_cancels, self._new_aborts, self._new_declines = [], [], [], []
        if not self._saving:
            return meta
        # (request, its new blocks per KV cache group, whether they replace the old ones, tokens
        # computed before this step)
        steps: list[tuple[str, tuple[list[int], ...] | None, bool, int]] = [
            (r.req_id, r.block_ids, True, r.num_computed_tokens) for r in scheduler_output.scheduled_new_reqs
        ]
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            resumed = req_id in cached.resumed_req_ids
            steps.append((req_id, cached.new_block_ids[i], resumed, cached.num_computed_tokens[i]))
        for req_id, new_blocks, replace, computed in steps:
            state = self._saving.get(req_id)
            if state is None:
                continue
            if replace or not state.block_ids:
                state.block_ids = tuple(list(group) for group in new_blocks or ())
            elif new_blocks:  # a sliding window's blocks that left it stay listed: nothing reads them again
                state.block_ids = tuple(old + list(new) for old, new in zip(state.block_ids, new_blocks, strict=True))
            end = min(computed + scheduler_output.num_scheduled_tokens.get(req_id, 0), state.total)
            if end > state.saved:  # a prefix-cache hit is sent too: its blocks hold valid KV
                meta.saves.append(
                    SaveRequest(
                        req_id,
                        state.transfer_id,
                        state.secret,
                        tuple(list(group) for group in state.block_ids),
                        state.saved,
                        end,
                        state.total,
                    )
                )
                state.saved = end
        return meta

    def request_finished(self, request: Request) -> tuple[bool, dict[str, Any] | None]:
        """Whether to keep the request's blocks until the workers report its sends done (so that
        an encoding still reading them on the device finishes first), and what a decode instance
        needs to load its KV: nothing for an aborted prefill, whose transfer is dropped (a decode
        already pulling it is refused at once and recomputes). A prefill request is held exactly
        when it was handed to the workers to save (a `SaveRequest`): they track those requests
        and report each one, whatever became of its encoding. An aborted load is cancelled and
        frees its blocks."""
        req_id = request.request_id
        aborted = request.status == RequestStatus.FINISHED_ABORTED
        saving = self._saving.pop(req_id, None)
        self._local_hits.pop(req_id, None)
        if req_id in self._loaded and aborted:
            self._new_cancels.append(req_id)  # stop its transfer: vLLM frees the blocks once it ends
        self._loaded.discard(req_id)
        if saving is None:
            return False, None
        held = saving.saved > 0
        if aborted:
            self._new_aborts.append(saving.transfer_id)
            return held, None
        return held, RemotePrefill(
            saving.transfer_id, saving.secret, self._producer, saving.total, self._producer_tp, self._kv_tokens_per_s
        ).to_params()
