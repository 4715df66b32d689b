"""The layering rule of docs/ARCHITECTURE.md, checked on every import of every module in leanlm/ (imports inside
functions and under TYPE_CHECKING included): a module imports only from its own level or lower ones, and no
modules import each other in a cycle, however indirectly."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "leanlm"

# docs/ARCHITECTURE.md, "Layers of the package": the most specific prefix wins.
LEVELS = {
    "leanlm.errors": 0,
    "leanlm.config": 0,
    "leanlm.sampling_params": 0,
    "leanlm.plan": 1,
    "leanlm.formats": 1,
    "leanlm.kernels": 1,
    "leanlm.layers": 1,
    "leanlm.models": 2,
    "leanlm.cache": 2,
    "leanlm.sampling": 2,
    "leanlm.compress": 3,
    "leanlm.engine": 3,
    "leanlm.embed": 3,  # encoders: embeddings, reranking, semantic search (no engine)
    "leanlm.distributed": 3,  # tensor parallelism: shards models/ and builds engine/'s engine per rank
    "leanlm.speech": 3,  # Whisper decoding and transcription: a standalone batched loop beside the engine
    "leanlm.translate": 3,  # Marian/T5 generation (HF-style greedy and beam search) and instruct-model prompts
    "leanlm.compress.measure": 4,  # the manifests' speed and quality figures come from evaluate/
    "leanlm.compress.pipelines": 4,
    "leanlm.compress.encoders": 4,  # quantized encoder artifacts record evaluate/'s retrieval figures
    "leanlm.evaluate": 4,
    "leanlm.bench": 4,
    "leanlm.optimize": 5,  # decisions: searches over compress/, evaluate/ and bench/ measurements
    "leanlm.server": 5,
    "leanlm.cli": 5,
    "leanlm": 5,  # the package itself: `from leanlm import LLM` is for users and the edges
}



def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def level(module: str) -> int:
    prefix = max((p for p in LEVELS if module == p or module.startswith(p + ".")), key=len)
    return LEVELS[prefix]


def imports_of(module: str) -> set[str]:
    """leanlm modules that `module` imports anywhere in its source; `from a import b` names a.b when b is a module."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {name for name in found if name.split(".")[0] == "leanlm" and name != module}


GRAPH = {module: imports_of(module) for module in MODULES}


def test_the_level_table_covers_every_module_and_names_real_ones():
    assert all(name in MODULES or any(m.startswith(name + ".") for m in MODULES) for name in LEVELS)
    unknown = {target for targets in GRAPH.values() for target in targets if target not in MODULES}
    assert not unknown, f"imports of modules that do not exist: {sorted(unknown)}"


def test_every_import_goes_to_the_same_level_or_lower():
    upward = sorted(
        f"{module} (level {level(module)}) imports {target} (level {level(target)})"
        for module, targets in GRAPH.items()
        for target in targets
        if level(target) > level(module)
    )
    assert not upward, "\n".join(upward)


def test_no_module_imports_another_modules_private_names():
    private = sorted(
        f"{module} imports {node.module}.{alias.name}"
        for module, path in MODULES.items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("leanlm")
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    )
    assert not private, "\n".join(private)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(GRAPH)
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize(
    "graph, cycle",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"a"}}, ["a", "a"]),
    ],
)
def test_the_cycle_finder_finds_cycles(graph, cycle):
    assert find_cycle(graph) == cycle


def test_function_local_and_type_checking_imports_are_read(tmp_path, monkeypatch):
    """The checker sees imports inside function bodies (where the cycles used to hide) and under TYPE_CHECKING."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from leanlm.engine.llm import LLM\n"
        "def f():\n    from leanlm.evaluate import corpus\n    import leanlm.server.app\n"
    )
    monkeypatch.setitem(MODULES, "leanlm.compress._probe", probe)
    assert imports_of("leanlm.compress._probe") == {"leanlm.engine.llm", "leanlm.evaluate.corpus", "leanlm.server.app"}
