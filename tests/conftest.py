import contextlib
import os
import re
import socket
import threading
import time

import pytest
import torch

from cachegen_vllm.testing.asgi import serve

# Triton decides when it is imported whether its kernels run in its interpreter, and collecting
# the tests imports vLLM, which imports Triton: without a GPU, ask for the interpreter before that,
# so that tests/test_kernels.py runs the kernels on the CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def model_dir():
    from cachegen_vllm.offline.model import ensure_default_model

    return ensure_default_model()


def tiny_checkpoint(model_dir, path, config):
    """A transformers checkpoint of ``config`` with random weights (seed 0) in ``path``, with the
    embedded model's tokenizer (``config`` keeps its 49,152-token vocabulary)."""
    import shutil

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, path / name)
    return path


@pytest.fixture(scope="session")
def llama_dir(model_dir, tmp_path_factory):
    """A model of another geometry than the embedded one: a small Llama with head_dim 128 and 8 KV
    heads."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=2048,
    )
    return tiny_checkpoint(model_dir, tmp_path_factory.mktemp("llama"), config)


@pytest.fixture(scope="session")
def qwen3_dir(model_dir, tmp_path_factory):
    """A QK-norm model whose head width is not a power of two: a small Qwen3, head_dim 80, 2 KV
    heads of 4 query heads each."""
    from transformers import Qwen3Config

    config = Qwen3Config(
        vocab_size=49152,
        hidden_size=320,
        intermediate_size=640,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=80,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    return tiny_checkpoint(model_dir, tmp_path_factory.mktemp("qwen3"), config)


@pytest.fixture(scope="session")
def gemma3_dir(model_dir, tmp_path_factory):
    """A sliding-window hybrid with QK-norm, Gemma 3's text model in small: 4 layers, the 4th
    global and the others sliding over 32 tokens, one KV head of 256."""
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=49152,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=256,
        sliding_window=32,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
        max_position_embeddings=4096,
        query_pre_attn_scalar=256,
    )
    config.architectures = ["Gemma3ForCausalLM"]
    return tiny_checkpoint(model_dir, tmp_path_factory.mktemp("gemma3"), config)


@pytest.fixture(scope="session")
def deepseek_dir(model_dir, tmp_path_factory):
    """An MLA model, DeepSeek-V2's in small: 2 dense layers, a 512-wide compressed KV and a 64-wide
    RoPE part (the 576-wide latent vLLM's CPU MLA backends take), no query compression."""
    from transformers import DeepseekV2Config

    config = DeepseekV2Config(
        vocab_size=49152,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=512,
        q_lora_rank=None,
        qk_rope_head_dim=64,
        qk_nope_head_dim=32,
        v_head_dim=32,
        first_k_dense_replace=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        max_position_embeddings=4096,
    )
    return tiny_checkpoint(model_dir, tmp_path_factory.mktemp("deepseek"), config)


@pytest.fixture(scope="session")
def granite_dir(model_dir, tmp_path_factory):
    """An SSM hybrid, Granite 4's dense kind in small: Mamba2 and attention layers in turn (2 of
    each), no position embedding, 2 KV heads of 64; each Mamba layer's state is a conv state of 3
    x 544 and an SSM state of 8 heads x 64 x 16."""
    from transformers import GraniteMoeHybridConfig

    config = GraniteMoeHybridConfig(
        vocab_size=49152,
        hidden_size=256,
        intermediate_size=512,
        shared_intermediate_size=512,
        num_local_experts=0,
        num_hidden_layers=4,
        layer_types=["mamba", "attention", "mamba", "attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        mamba_n_heads=8,
        mamba_d_head=64,
        mamba_n_groups=1,
        mamba_d_state=16,
        mamba_d_conv=4,
        mamba_expand=2,
        attention_multiplier=0.125,
        max_position_embeddings=4096,
        position_embedding_type=None,
    )
    return tiny_checkpoint(model_dir, tmp_path_factory.mktemp("granite"), config)


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Whether ``predicate`` holds within ``timeout`` seconds, asked every ``interval``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@contextlib.contextmanager
def vllm_cluster(model_dir, procs: dict, ports: dict, proxied: dict | None = None, **proxy_options):
    """Wait for vLLM instances started on ``ports`` (``procs``, by name) and warm each up; put our
    proxy (``proxy_options``) in front of each pair in ``proxied`` (its url's name: (prefill,
    decode)); yield the urls by name. Every process in ``procs`` at the end, those added while it
    ran too, is stopped."""
    from cachegen_vllm.serving.launch import stop_all, wait_healthy, warm_up
    from cachegen_vllm.serving.proxy import create_app

    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    servers = []
    try:
        for name, proc in procs.items():
            wait_healthy(urls[name], proc, timeout_s=600)
            warm_up(urls[name], str(model_dir))
        for name, (prefill, decode) in (proxied or {}).items():
            urls[name], server = serve(create_app([urls[prefill]], [urls[decode]], **proxy_options))
            servers.append(server)
        yield urls
    finally:
        for server in servers:
            server.should_exit = True
        stop_all(list(procs.values()))


class FaultyLink:
    """A loopback TCP relay in front of a server that damages what flows back from it on demand:
    flips one byte at ``flip_at`` (counted over everything relayed back), or stops relaying after
    ``stall_after`` bytes (a network partition) until closed."""

    def __init__(self, server_port: int, flip_at: int | None = None, stall_after: int | None = None):
        self.server_port, self.flip_at, self.stall_after = server_port, flip_at, stall_after
        self.relayed = 0  # bytes relayed back from the server
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
                server = socket.create_connection(("127.0.0.1", self.server_port))
            except OSError:
                return
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, back: bool):
        try:
            while data := src.recv(1 << 16):
                if back:
                    data = self._damage(bytearray(data))
                    if data is None:
                        self._closed.wait()
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _damage(self, data: bytearray) -> bytearray | None:
        with self._lock:
            start, self.relayed = self.relayed, self.relayed + len(data)
            if self.stall_after is not None and self.relayed > self.stall_after:
                self.relayed = self.stall_after
                return None
            if self.flip_at is not None and start <= self.flip_at < self.relayed:
                data[self.flip_at - start] ^= 0x20
        return data

    def close(self):
        self._closed.set()
        self._listener.close()


_SERVER_LOG_LINE = re.compile(r"transfer |CacheGen|Traceback|Error|ERROR")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed end-to-end test's report carries what its servers logged about transfers (the
    newest ``vllm-logs*`` folder, the failing module's): CI shows the report, not the logs."""
    report = yield
    if report.failed and item.get_closest_marker("e2e") is not None:
        base = item.config._tmp_path_factory.getbasetemp()
        folders = sorted(base.glob("vllm-logs*"), key=lambda p: p.stat().st_mtime)
        for path in sorted(folders[-1].glob("*.log")) if folders else []:
            lines = [line for line in path.read_text(errors="replace").splitlines() if _SERVER_LOG_LINE.search(line)]
            if lines:
                report.sections.append((f"server log {path.name}", "\n".join(line[:300] for line in lines[-25:])))
    return report
