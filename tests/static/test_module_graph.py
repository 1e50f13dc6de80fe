"""Data flows one way through src/: no module imports, directly or through others, a module that imports it
back. The graph is read from the source: `use crate::…`, `use super::…` and inline `crate::…` paths, per module
file. A module re-exporting its own children (`pub use child::X` in mod.rs) is not a dependency on them."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"

# Module paths that are not code modules of the library (the binary has its own crate root).
SKIP = {"bin"}


def module_of(path: Path) -> tuple:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] in ("mod", "lib"):
        parts = parts[:-1]
    return tuple(parts)


def modules() -> dict:
    found = {}
    for path in SRC.rglob("*.rs"):
        mod = module_of(path)
        if mod and mod[0] in SKIP:
            continue
        found[mod] = path
    return found


def strip_comments_and_tests(text: str) -> str:
    text = re.sub(r"//[^\n]*", "", text)
    cut = text.find("#[cfg(test)]")  # test modules may reach anywhere
    return text if cut < 0 else text[:cut]


PATH = re.compile(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
USE_GROUP = re.compile(r"\buse\s+(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)*)::\{([^;]*)\}", re.S)


def targets(mod: tuple, text: str, known: set) -> set:
    out = set()

    def resolve(root: str, segments: list):
        base = list(mod[:-1]) if root == "super" else []
        if root == "super" and not mod:
            return
        path = base + segments
        # The longest prefix that is a module.
        for n in range(len(path), 0, -1):
            if tuple(path[:n]) in known:
                out.add(tuple(path[:n]))
                return

    for m in USE_GROUP.finditer(text):
        head = [s for s in m.group(2).split("::") if s]
        for item in re.split(r",", m.group(3)):
            first = item.strip().split("::")[0].split(" ")[0].strip("{} \n")
            if first and first != "self":
                resolve(m.group(1), head + [first])
            else:
                resolve(m.group(1), head)
    for m in PATH.finditer(text):
        resolve(m.group(1), [s for s in m.group(2).split("::") if s])
    return out


def graph() -> dict:
    mods = modules()
    known = set(mods)
    edges = {}
    for mod, path in mods.items():
        deps = targets(mod, strip_comments_and_tests(path.read_text()), known)
        # Not dependencies: itself, its own descendants (re-exports), its ancestors' files (a child is
        # declared by its parent; `super::X` to a parent's item is a real edge and kept).
        edges[mod] = {d for d in deps if d != mod and d[:len(mod)] != mod}
    return edges


def find_cycle(edges: dict):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_is_read_from_the_source():
    edges = graph()
    # A few edges that must be seen, so that a parser that sees nothing cannot pass.
    assert ("delivery",) in edges[("filter", "worker")]
    assert ("config",) in edges[("stream",)]
    assert ("delivery",) in edges[("delivery", "outbox")], "super:: imports of the parent"
    assert ("time",) in edges[("event",)]


def test_no_module_imports_a_module_that_imports_it_back():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join("::".join(m) or "crate" for m in cycle)


def test_the_core_makes_no_host_calls():
    for mod, path in modules().items():
        if mod and mod[0] == "filter":
            continue
        text = strip_comments_and_tests(path.read_text())
        assert "proxy_wasm" not in text, f"{path} uses proxy_wasm: the core must stay free of host calls"
        assert "crate::filter" not in text, f"{path} imports the glue"
