"""The package's architecture: layers that import one way, no import cycles, no private names across modules; and
sources that never unpickle (nothing a user loads may run code).

The imports are read from the source (top-level and inside functions; `if TYPE_CHECKING:` blocks aside, they do
not run), so a function-local import cannot hide a cycle. Importing a module of a subpackage runs the
subpackage's `__init__` first, so that counts as an import of it too.
"""

import ast
import sys
from pathlib import Path

import pytest

import quantrt
import quantrt.kernels

PACKAGE = Path(quantrt.__file__).resolve().parent

# lowest first: a module may import from its own layer (without a cycle) and the layers below it. A module is
# placed by the longest entry that names it or a package above it; a module that no entry names fails the test,
# so a new module is placed on purpose.
LAYERS: list[tuple[str, ...]] = [
    ("quantrt.kernels",),
    ("quantrt.version", "quantrt.tables", "quantrt.examples", "quantrt.devices", "quantrt.metrics",
     "quantrt.models"),
    ("quantrt.formats", "quantrt.schemes"),
    ("quantrt.config",),
    ("quantrt.interop",),
    ("quantrt.backends",),
    ("quantrt.modules",),
    ("quantrt.calibrate", "quantrt.cache", "quantrt.aot", "quantrt.compile", "quantrt.archive"),
    # safetensors I/O: the streaming reader, and its package's __init__ (a docstring), which importing it runs
    ("quantrt.checkpoints.reader", "=quantrt.checkpoints"),
    ("quantrt.serialization",),
    ("quantrt.checkpoints",),
    ("quantrt.autoquant",),
    ("quantrt.transformer",),
    ("quantrt.pipelines",),
    ("quantrt.integrations",),  # diffusers/transformers quantizers: registered with the libraries
    ("quantrt.demo", "quantrt.cli"),
    ("quantrt.bench",),
    ("quantrt", "quantrt.__main__"),  # the public API and the program: they import everything
]


def module_files() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(["quantrt", *parts])] = path
    return modules


MODULES = module_files()


def layer_of(module: str) -> int:
    best, depth = None, -1
    for index, names in enumerate(LAYERS):
        for name in names:
            exact = name.startswith("=")  # "=quantrt.x": that module (a package's __init__) only
            name = name.removeprefix("=")
            rank = name.count(".") + (100 if module == name else 0)  # an exact match beats a package
            if (module == name or (not exact and module.startswith(name + "."))) and rank > depth:
                best, depth = index, rank
    if best is None:
        raise AssertionError(f"{module} has no layer: add it to LAYERS in {Path(__file__).name}")
    return best


def runs(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Whether an import statement runs: not inside `if TYPE_CHECKING:`."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return False
    return True


class Import:
    def __init__(self, importer: str, target: str, names: list[str], line: int):
        self.importer, self.target, self.names, self.line = importer, target, names, line

    def __repr__(self) -> str:
        path = MODULES[self.importer].relative_to(PACKAGE.parent)
        return f"{path}:{self.line} {self.importer} -> {self.target}"


def imports_of(module: str) -> tuple[list[Import], list[str]]:
    """The quantrt modules `module` imports (and the subpackages that brings in), and the private attributes it
    reads from a quantrt module it imported as a name."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found, aliases = [], {}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or not runs(node, parents):
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "quantrt":
                    found.append(Import(module, alias.name, [], node.lineno))
                    if alias.asname:
                        aliases[alias.asname] = alias.name
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            base = ".".join(anchor + ([node.module] if node.module else []))
        if base.split(".")[0] != "quantrt":
            continue
        plain = []
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            if submodule in MODULES:  # `from . import bench_common`: an import of that module
                found.append(Import(module, submodule, [], node.lineno))
                aliases[alias.asname or alias.name] = submodule
            else:
                plain.append(alias.name)
        if plain:
            found.append(Import(module, base, plain, node.lineno))
    # importing a.b.c runs a.b's __init__ first, unless it is running already: the importer's own packages (and
    # the root's, the public API, which runs before any of its modules)
    for item in list(found):
        parent = item.target.rpartition(".")[0]
        while parent.count("."):
            if not module.startswith(parent + "."):
                found.append(Import(module, parent, [], item.line))
            parent = parent.rpartition(".")[0]
    private = [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} reads {ast.unparse(node)}"
               for node in ast.walk(tree)
               if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
               and node.value.id in aliases and node.attr.startswith("_") and not node.attr.startswith("__")]
    return [i for i in found if i.target != module], private


IMPORTS = {module: imports_of(module) for module in MODULES}


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_module_imports_from_a_layer_above_it():
    upward = [f"{i} (layer {layer_of(i.importer)} imports layer {layer_of(i.target)}: {LAYERS[layer_of(i.target)]})"
              for imports, _ in IMPORTS.values() for i in imports if layer_of(i.target) > layer_of(i.importer)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_kernels_never_import_the_runtime():
    wrong = [str(i) for module, (imports, _) in IMPORTS.items() if module.startswith("quantrt.kernels")
             for i in imports if not i.target.startswith("quantrt.kernels")]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = {module: sorted({i.target for i in imports if i.target in MODULES and i.target != "quantrt"})
             for module, (imports, _) in IMPORTS.items() if module != "quantrt"}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in graph.get(module, []):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target] if target in path else [module, target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_no_private_names_from_another_module():
    private = [f"{i}: {name}" for imports, _ in IMPORTS.values() for i in imports for name in i.names
               if name.startswith("_") and not name.startswith("__")]
    private += [line for _, attributes in IMPORTS.values() for line in attributes]
    assert not private, "private names used across modules:\n" + "\n".join(private)


def test_the_checker_sees_function_local_imports_and_cycles(tmp_path, monkeypatch):
    # a check that cannot fail proves nothing: feed it a tiny package with a hidden cycle and an upward import
    package = tmp_path / "quantrt"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "config.py").write_text("def f():\n    from .modules import g\n    return g\n")
    (package / "modules.py").write_text("from .config import f\nfrom .cache import _secret\n")
    (package / "cache.py").write_text("_secret = 1\n")
    this = sys.modules[__name__]
    monkeypatch.setattr(this, "PACKAGE", package)
    monkeypatch.setattr(this, "MODULES", module_files())
    monkeypatch.setattr(this, "IMPORTS", {module: imports_of(module) for module in this.MODULES})
    with pytest.raises(AssertionError, match="config.py:2 quantrt.config -> quantrt.modules"):
        test_no_module_imports_from_a_layer_above_it()
    with pytest.raises(AssertionError, match="quantrt.config -> quantrt.modules -> quantrt.config"):
        test_no_import_cycles()
    with pytest.raises(AssertionError, match="_secret"):
        test_no_private_names_from_another_module()


UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def unsafe_calls(source: str) -> list[str]:
    """Where `source` imports a pickle-family module, or calls torch.load without weights_only=True."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNPICKLERS]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLERS:
            found.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "load" for a in node.names):
            found.append(f"line {node.lineno}: from torch import load")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            if not safe:
                found.append(f"line {node.lineno}: torch.load without weights_only=True")
    return sorted(found, key=lambda problem: int(problem.split(":")[0].removeprefix("line ")))


def test_the_scanner_finds_what_it_looks_for():
    source = "import pickle\nfrom dill import loads\nimport torch\ntorch.load(f)\ntorch.load(f, weights_only=False)\n" \
             "torch.load(f, weights_only=True)\nfrom torch import load\n"
    assert [line.split(":")[0] for line in unsafe_calls(source)] == ["line 1", "line 2", "line 4", "line 5", "line 7"]


def test_package_sources_never_unpickle():
    roots = {Path(quantrt.__file__).parent, Path(quantrt.kernels.__file__).parent}
    files = sorted({f for root in roots for f in root.rglob("*.py")})
    assert len(files) > 20
    problems = [f"{f}: {problem}" for f in files for problem in unsafe_calls(f.read_text())]
    assert not problems, "\n".join(problems)
