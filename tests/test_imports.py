"""The package's layering, read from its source: every import, at module level or inside a
function, goes one way down

    codec  <-  kernels  <-  paged  <-  connector  <-  serving tools
    codec  <-  transport  <-  config  <-  fitting  <-  connector, offline tools  <-  serving tools
    device  <-  kernels, paged, connector
    adaptation  <-  transport, connector   (the level choice's math: nothing below it)
    params  <-  transport, config, connector, serving tools   (the kv_transfer_params contract)
    testing: helpers of the tests and benchmarks, above everything

and no module imports itself back through others (no cycle, whatever hides it in a function)."""

import ast
import itertools
import os
from pathlib import Path

import pytest

import cachegen_vllm

ROOT = Path(cachegen_vllm.__path__[0])
PACKAGE = "cachegen_vllm"

# component: the components its modules may import (besides its own)
ALLOWED = {
    "codec": set(),
    "device": set(),  # streams, events, pinned memory: torch only
    "adaptation": set(),  # rates and the level choice: the standard library only
    "params": set(),  # the kv_transfer_params contract: the standard library only
    "kernels": {"codec", "device"},
    "transport": {"codec", "adaptation", "params"},
    "paged": {"codec", "kernels", "device"},
    "config": {"codec", "transport", "params"},
    "fitting": {"codec", "config"},
    "connector": {"codec", "paged", "transport", "config", "device", "adaptation", "params", "fitting"},
    "offline": {"codec", "kernels", "paged", "config", "device", "fitting"},
    "serving": {"codec", "config", "connector", "params", "fitting", "offline", "root"},
    "testing": {"serving", "offline", "config", "codec", "root"},
    "configs": set(),  # the shipped profiles and bases: data that anything may read
    "root": set(),
}
# third-party packages a component must not reach: what keeps the codec pure, the kernels off the
# network, vLLM out of everything below the connector and the contract free of everything
FORBIDDEN = {
    "codec": {"vllm", "triton", "zmq", "fastapi", "httpx"},
    "device": {"vllm", "triton", "zmq", "fastapi", "httpx"},
    "adaptation": {"vllm", "triton", "zmq", "fastapi", "httpx", "torch", "numpy"},
    "params": {"vllm", "triton", "zmq", "fastapi", "httpx", "torch", "numpy"},
    "kernels": {"vllm", "zmq", "fastapi", "httpx"},
    "transport": {"vllm", "triton", "fastapi", "httpx"},
    "config": {"vllm", "triton", "zmq"},
    "fitting": {"vllm", "triton", "zmq", "fastapi", "httpx"},
    "offline": {"vllm", "zmq", "fastapi", "httpx"},
}
COMPONENTS = {
    "codec",
    "kernels",
    "transport",
    "paged",
    "connector",
    "fitting",
    "serving",
    "offline",
    "testing",
    "configs",
}
MODULES = {"config", "device", "adaptation", "params"}


def component(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    if parts[1] in COMPONENTS or parts[1] in MODULES:
        return parts[1]
    raise AssertionError(f"{module} is in no component: add it to COMPONENTS or MODULES and to ALLOWED")


def modules() -> dict[str, Path]:
    """Every module of the package, by dotted name, the linked kernels/ and configs/ included."""
    out = {}
    for folder, _, files in os.walk(ROOT, followlinks=True):
        for name in files:
            if name.endswith(".py"):
                rel = (Path(folder) / name).relative_to(ROOT).with_suffix("")
                parts = [PACKAGE, *rel.parts]
                out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = Path(folder) / name
    return out


def imports(path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(modules of the package, top-level third-party names) that the file imports, anywhere in it,
    or runs in a process of its own (``python -m`` and the module's name, in a list)."""
    ours, theirs = set(), set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.List, ast.Tuple)):  # [..., "-m", "cachegen_vllm.x", ...]: run as a process
            values = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
            ours.update(m for flag, m in itertools.pairwise(values) if flag == "-m" and m in known)
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from package import submodule` imports the submodule; `from module import name` the module
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names
            ]
        else:
            continue
        for name in names:
            (ours if name.split(".")[0] == PACKAGE else theirs).add(
                name if name.split(".")[0] == PACKAGE else name.split(".")[0]
            )
    return ours, theirs


def with_packages(module: str, targets: set[str]) -> set[str]:
    """``targets`` and the packages importing each runs first (``a.b.c`` runs ``a.b``), those that
    ``module`` itself lies in aside: what importing them executes."""
    out = set(targets)
    for target in targets:
        parts = target.split(".")
        for i in range(2, len(parts)):
            package = ".".join(parts[:i])
            if package != module and not module.startswith(package + "."):
                out.add(package)
    return out


GRAPH = {name: imports(path, set(modules())) for name, path in modules().items()}
EXECUTES = {name: with_packages(name, ours) for name, (ours, _) in GRAPH.items()}


def test_the_walk_sees_every_layer():
    assert {component(m) for m in GRAPH} == set(ALLOWED)
    assert {
        "cachegen_vllm.kernels.tile_kernels",
        "cachegen_vllm.connector.scheduler",
        "cachegen_vllm.connector.saving",
        "cachegen_vllm.connector.loading",
        "cachegen_vllm.paged.layout",
        "cachegen_vllm.fitting.__main__",
    } <= set(GRAPH)
    # the automatic basis is fitted by `python -m cachegen_vllm.fitting`: a dependency the walk reads
    assert "cachegen_vllm.fitting" in GRAPH["cachegen_vllm.fitting.auto"][0]


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_go_down_the_layers(module):
    ours, theirs = GRAPH[module]
    here = component(module)
    wrong = sorted(m for m in ours if component(m) not in ALLOWED[here] | {here, "configs"})
    assert not wrong, f"{module} ({here}) imports {wrong}, against the layering"
    reached = sorted(theirs & FORBIDDEN.get(here, set()))
    assert not reached, f"{module} ({here}) imports {reached}"


def test_no_import_cycles():
    """Tarjan's strongly connected components over what importing each module executes."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in EXECUTES[node]:
            if nxt not in GRAPH:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            members = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                members.append(member)
                if member == node:
                    break
            if len(members) > 1 or node in EXECUTES[node]:
                cycles.append(sorted(members))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_catches_what_it_must(tmp_path):
    """A cycle hidden in a function and an upward import, in a scratch file, are both seen."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def f():\n    from cachegen_vllm.connector.worker import CacheGenWorker\n\nimport vllm.config\n"
        "ARGV = ['python', '-m', 'cachegen_vllm.serving.cli']\n"
    )
    ours, theirs = imports(bad, set(GRAPH))
    assert ours == {"cachegen_vllm.connector.worker", "cachegen_vllm.serving.cli"} and theirs == {"vllm"}
    assert component("cachegen_vllm.connector.worker") not in ALLOWED["codec"]


def test_the_kernels_folder_is_not_a_top_level_package():
    """Run from the repository's root, Python finds the top-level kernels/ as a package named
    `kernels`, which transformers and vLLM probe for (Hugging Face's kernel hub library): importing
    it must run none of our code (the codec would bring numba into every vLLM worker, whose
    kernel-override scan fails on it)."""
    import subprocess
    import sys

    probe = "import sys, kernels; print(sorted(m for m in sys.modules if m.startswith('cachegen_vllm')))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT.parent, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
