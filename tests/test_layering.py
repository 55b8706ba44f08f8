"""Static checks of the package layering (docs/architecture.md).

* nothing outside focusvlm/cli imports focusvlm.cli;
* transformers' model, layer, processor and auto classes are named only under focusvlm/models/ (and the boundary);
* only focusvlm/hfcompat.py reaches inside transformers (submodules), and it imports nothing of focusvlm;
* module-level imports inside focusvlm form no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "focusvlm"
MODEL_CLASS_WORDS = ("Llava", "CLIP", "Clip", "Siglip", "SigLIP", "Qwen", "Llama", "AutoModel", "AutoProcessor",
                     "AutoConfig", "AutoTokenizer", "EncoderLayer", "ForConditionalGeneration", "ImageProcessor")


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path, ast.parse(path.read_text(), str(path))


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path, tree: ast.AST, top_level_only: bool):
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [alias.name]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node, path.name == "__init__.py")
            yield target, [a.name for a in node.names]


def test_only_cli_imports_cli():
    bad = []
    for module, path, tree in _modules():
        if module.startswith("focusvlm.cli") or module == "focusvlm.__main__":
            continue
        for target, names in _imports(module, path, tree, top_level_only=False):
            if target.startswith("focusvlm.cli") or (target == "focusvlm" and "cli" in names):
                bad.append(f"{module} imports {target}")
    assert not bad, bad


def test_transformers_model_classes_only_in_models():
    bad = []
    for module, path, tree in _modules():
        if module.startswith("focusvlm.models") or module == BOUNDARY:
            continue
        for target, names in _imports(module, path, tree, top_level_only=False):
            if not target.startswith("transformers"):
                continue
            named = [n for n in names if any(w in n for w in MODEL_CLASS_WORDS)]
            if named or target.startswith("transformers.models"):
                bad.append(f"{module}: from {target} import {names}")
    assert not bad, bad


BOUNDARY = "focusvlm.hfcompat"


def test_transformers_internals_only_through_the_boundary():
    """Only focusvlm.hfcompat imports from inside transformers; everything else uses its top-level (public) names."""
    bad = []
    for module, path, tree in _modules():
        if module == BOUNDARY:
            continue
        for target, names in _imports(module, path, tree, top_level_only=False):
            if target.startswith("transformers."):
                bad.append(f"{module}: from {target} import {names}")
    assert not bad, bad


def test_the_boundary_is_a_leaf():
    tree = next(t for m, _, t in _modules() if m == BOUNDARY)
    inside = [target for target, _ in _imports(BOUNDARY, PACKAGE / "hfcompat.py", tree, top_level_only=False)
              if target.startswith("focusvlm") or target.startswith(".")]
    assert not inside, inside


def test_no_import_cycle_at_module_level():
    graph: dict[str, set[str]] = {}
    known = {m for m, _, _ in _modules()}
    for module, path, tree in _modules():
        deps = set()
        for target, names in _imports(module, path, tree, top_level_only=True):
            for candidate in [f"{target}.{n}" for n in names] + [target]:
                if candidate in known and candidate != module:
                    deps.add(candidate)
                    break
        graph[module] = deps
    seen, stack, cycles = set(), [], []

    def visit(node):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for dep in graph.get(node, ()):
            # a package importing its own submodule (registration lists) is not a cycle
            if not dep.startswith(node + "."):
                visit(dep)
        stack.pop()

    for node in graph:
        visit(node)
    assert not cycles, cycles
