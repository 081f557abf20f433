"""The library's import graph: no circle, and the engine never reaches into the server.

Every import counts, those inside functions too (a lazy import is still a dependency); imports
under ``if TYPE_CHECKING:`` do not (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    out = {}
    for path in (ROOT / "cp_infer").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:``."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            test = getattr(child, "test", None)
            if isinstance(child, ast.If) and getattr(test, "id", None) == "TYPE_CHECKING":
                todo.extend(child.orelse)
                continue
            todo.append(child)


def import_graph() -> dict[str, set[str]]:
    """Module -> the cp_infer modules it imports (``from pkg import mod`` names ``pkg.mod``)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for target in (node.module, *(f"{node.module}.{a.name}" for a in node.names)):
                    if target in modules:
                        deps.add(target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in modules)
        graph[name] = deps - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    assert graph.get("cp_infer.engine.core")
    assert _cycles(graph) == []


def test_a_circle_is_found():  # the check itself, on a graph with one
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_the_engine_imports_nothing_of_the_server_or_the_entry_points():
    graph = import_graph()
    for name, deps in graph.items():
        if name == "cp_infer.engine" or name.startswith("cp_infer.engine."):
            bad = {d for d in deps if d.startswith(("cp_infer.serving", "cp_infer.entrypoints"))}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_the_api_process_imports_no_torch(checkpoint):
    """What the API process loads (the HTTP apps, the request types, the tokenizer readers)
    leaves torch out: it starts in a fraction of the time and memory of a rank. With torch
    hidden as the API process hides it, transformers still loads the checkpoint's tokenizer
    (template and special tokens) and a log record finds the rank without it."""
    import subprocess
    import sys

    code = (
        "import sys, logging\n"
        "from cp_infer.serving.api_process import keep_torch_out\n"
        "keep_torch_out()\n"
        "import cp_infer.serving.api_process\n"
        "from cp_infer.serving.api import build_app\n"
        "from cp_infer.serving.ipc import ApiLink\n"
        "from cp_infer.serving.lifecycle import STOP_GRACE_S\n"
        "from cp_infer.checkpoint.formats import has_tokenizer, load_tokenizer\n"
        "from cp_infer.checkpoint.gguf_tokenizer import gguf_tokenizer\n"
        "from cp_infer.engine import Request, SamplingConfig\n"
        "from cp_infer.log import setup_logging\n"
        "setup_logging()\n"
        "logging.getLogger('cp_infer').info('a record')\n"
        f"tok = load_tokenizer(__import__('pathlib').Path({str(checkpoint)!r}), transformers=True)\n"
        "assert tok.apply_chat_template([{'role': 'user', 'content': 'w5'}], tokenize=False)\n"
        "assert tok.decode(tok.encode('w1 w2')) == 'w1 w2'\n"
        "print(sorted(m for m in sys.modules if m.startswith('torch.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
