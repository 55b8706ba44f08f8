"""Static checks of the package layering (docs/architecture.md).

* nothing outside focusvlm/cli imports focusvlm.cli;
* transformers' model, layer, processor and auto classes are named only under focusvlm/models/ (and the boundary);
* only focusvlm/hfcompat.py reaches inside transformers (submodules), and it imports nothing of focusvlm;
* every module sits in a declared layer, imports only its own layer or lower, and no import (function-level
  ones included) closes a cycle.
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


# The declared layer order, lowest first (docs/architecture.md draws it). A module may import its own layer
# or a lower one; every import counts, the ones inside functions too. The first release kept many imports
# inside functions, and they hid cycles a module-level check could not see.
LAYERS = (
    ("foundation", ("focusvlm", "focusvlm.errors", "focusvlm.registry", "focusvlm.hfcompat")),
    ("config", ("focusvlm.config", "focusvlm.methods")),
    ("tensor functions", ("focusvlm.compress", "focusvlm.compress.*", "focusvlm.inhibit", "focusvlm.inhibit.*",
                          "focusvlm.viz")),
    ("models", ("focusvlm.models", "focusvlm.models.*")),
    ("methods", ("focusvlm.compress.*_method", "focusvlm.inhibit.*_method", "focusvlm.inhibit.cmai_wiring")),
    ("runtime", ("focusvlm.api", "focusvlm.runtime", "focusvlm.compiling")),
    ("applications", ("focusvlm.eval", "focusvlm.eval.*", "focusvlm.train", "focusvlm.train.*",
                      "focusvlm.bench", "focusvlm.bench.*", "focusvlm.demo", "focusvlm.demo.*")),
    ("integrations", ("focusvlm.integrations", "focusvlm.integrations.*")),
    ("cli", ("focusvlm.cli", "focusvlm.cli.*", "focusvlm.__main__")),
)


def layer_of(module: str) -> int:
    """The highest layer whose patterns match (a method module also matches its folder's tensor pattern)."""
    import fnmatch

    matches = [rank for rank, (_, patterns) in enumerate(LAYERS)
               if any(fnmatch.fnmatchcase(module, pattern) for pattern in patterns)]
    if not matches:
        raise AssertionError(f"{module} has no layer: add it to LAYERS in tests/test_layering.py")
    return max(matches)


def _graph() -> dict[str, dict[str, int]]:
    """module -> {imported focusvlm module: line}, every import statement included."""
    known = {m for m, _, _ in _modules()}
    graph: dict[str, dict[str, int]] = {}
    for module, path, tree in _modules():
        deps: dict[str, int] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [(alias.name, []) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                targets = [(_resolve(module, node, path.name == "__init__.py"), [a.name for a in node.names])]
            else:
                continue
            for target, names in targets:
                # ``from . import fastv`` imports the submodule; ``from .x import name`` the module x
                hits = [f"{target}.{n}" for n in names if f"{target}.{n}" in known] or [target]
                deps.update({hit: node.lineno for hit in hits if hit in known and hit != module})
        graph[module] = deps
    return graph


def test_every_module_has_a_layer():
    for module, _, _ in _modules():
        layer_of(module)


def test_every_import_respects_the_layer_order():
    upward = [f"{module}:{line} ({LAYERS[layer_of(module)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})"
              for module, deps in _graph().items() for dep, line in deps.items() if layer_of(dep) > layer_of(module)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle_anywhere():
    graph = _graph()
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
            visit(dep)
        stack.pop()

    for node in graph:
        visit(node)
    assert not cycles, cycles


def test_the_layering_check_sees_imports_inside_functions(tmp_path):
    """The check would fail on an upward import hidden in a function body."""
    tree = ast.parse("def f():\n    from ..cli import main\n")
    module = "focusvlm.compress.example"
    found = [target for target, _ in _imports(module, PACKAGE / "compress" / "example.py", tree, top_level_only=False)]
    assert found == ["focusvlm.cli"] and layer_of("focusvlm.cli") > layer_of(module)
