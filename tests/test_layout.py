"""The package layout: recipes/ and tflite_export/ are leaf libraries (nothing from ktoolkit, not even
inside a function), no module-level imports form a cycle, and the legacy-Keras switch is set in one
place that imports no TensorFlow."""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("recipes", "tflite_export", "ktoolkit")
LEAVES = ("recipes", "tflite_export")
SWITCH = "TF_USE_LEGACY_KERAS"


def module_files(*packages) -> dict[str, Path]:
    """Module name -> file, for every .py under the packages (a package is its __init__.py)."""
    found = {}
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = module_files(*PACKAGES)


def is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def absolute(node: ast.ImportFrom, importer: str) -> str:
    """The module an ImportFrom names, with relative imports resolved against ``importer``."""
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package(importer) else importer.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imported_names(node, importer: str) -> list[str]:
    """Every module an Import/ImportFrom node may load: ``from a import b`` names a.b too."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    module = absolute(node, importer)
    return [module] + [f"{module}.{alias.name}" for alias in node.names]


def all_imports(tree: ast.AST, importer: str):
    """(line, module) for every import anywhere in the file, functions and classes included."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            for name in imported_names(node, importer):
                yield node.lineno, name
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if func in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                yield node.lineno, node.args[0].value


def top_level_imports(body: list[ast.stmt]):
    """Import nodes that run when the module is imported: the module's body and the blocks in it (if,
    try, with, class bodies), not functions, and not ``if TYPE_CHECKING:``."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from top_level_imports(node.orelse)
        else:  # if/else, try/except/finally, with, for, class bodies: a list of statements (or handlers)
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from top_level_imports(getattr(node, field, []))


def ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules its top-level imports run. Importing a.b.c also runs the __init__
    of a and a.b, unless they are the importer's own packages (already being imported, as Python does)."""
    graph = {}
    for module, path in MODULES.items():
        targets = set()
        for node in top_level_imports(ast.parse(path.read_text(), str(path)).body):
            for name in imported_names(node, module):
                if name in MODULES:
                    targets.add(name)
                    targets.update(a for a in ancestors(name) if a not in ancestors(module) and a != module)
        targets.discard(module)
        graph[module] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [m1, m2, ..., m1], or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_leaf_libraries_import_nothing_from_ktoolkit():
    offenders = {  # file:line -> the first ktoolkit module named there
        f"{path.relative_to(ROOT)}:{line}": name
        for module, path in module_files(*LEAVES).items()
        for line, name in reversed(list(all_imports(ast.parse(path.read_text(), str(path)), module)))
        if name == "ktoolkit" or name.startswith("ktoolkit.")
    }
    offenders = [f"{where} imports {name}" for where, name in offenders.items()]
    assert not offenders, "recipes/ and tflite_export/ must not import ktoolkit:\n" + "\n".join(offenders)


def test_the_checks_see_imports_inside_functions_and_the_cycles():
    tree = ast.parse("def f():\n    from ktoolkit.io import write_text\n")
    assert list(all_imports(tree, "tflite_export.x")) == [(2, "ktoolkit.io"), (2, "ktoolkit.io.write_text")]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert "ktoolkit.io" in import_graph()["ktoolkit.export.workflow"]  # the graph sees real imports


def test_no_module_level_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "a cycle of module-level imports: " + " -> ".join(cycle)


def switch_assignments(path: Path) -> list[int]:
    """Lines of ``path`` that set TF_USE_LEGACY_KERAS (os.environ[...] = , setdefault, putenv, update)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Assign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            sets = any(isinstance(t, ast.Subscript) and SWITCH in ast.unparse(t.slice) for t in targets)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            sets = node.func.attr in ("setdefault", "putenv", "update") and SWITCH in ast.unparse(node)
        else:
            sets = False
        if sets:
            lines.append(node.lineno)
    return lines


def test_the_legacy_keras_switch_is_set_in_one_place():
    files = [*module_files(*PACKAGES).values(), ROOT / "tests" / "conftest.py", ROOT / "benchmarks" / "_common.py"]
    setting = [f"{p.relative_to(ROOT)}:{line}" for p in files for line in switch_assignments(p)]
    assert [s.split(":")[0] for s in setting] == ["recipes/_keras.py"], f"{SWITCH} is set in: {setting}"


def test_every_entry_point_sets_the_switch_without_importing_tensorflow():
    # TensorFlow and Keras made unimportable: the device runtime (LiteRT/onnxruntime only) must still load.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('tensorflow', 'tf_keras', 'keras'):\n"
        "            raise ImportError(name + ' is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import os, importlib\n"
        "importlib.import_module(sys.argv[1])\n"
        "print(os.environ.get('TF_USE_LEGACY_KERAS'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != SWITCH}
    for entry in ("recipes", "tflite_export", "tflite_export.runtime", "ktoolkit"):
        done = subprocess.run([sys.executable, "-c", code, entry], env=env, capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0, f"import {entry} without TensorFlow: {done.stderr}"
        assert done.stdout.strip() == "1", f"import {entry} did not set {SWITCH}"
