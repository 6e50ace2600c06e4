"""Import layering of the source tree, read with `ast` (nothing is imported).

Imports go one way: launch/ (and experiments/) build things from tfusion/ and
data_pipelines/; tfusion.eval may read data_pipelines (held-out data, the dataset's
ground truth); data_pipelines may use tfusion's core modules (config, batch, image
codecs); the model, trainer and inference code are handed their data and never reach
data_pipelines. Rules, counting imports inside functions too:

  (a) no import cycle among tfusion/ and data_pipelines/ modules; `from pkg import x`
      in a module of `pkg` is an edge to pkg/__init__ (which runs it), so a package
      whose __init__ re-exports its submodules makes a cycle with any of them that
      imports it: submodules import their siblings directly
      (`from data_pipelines.tokenizer import Tokenizer`);
  (b) no module of tfusion/ outside tfusion.eval reaches data_pipelines through any
      chain of imports;
  (c) tfusion/ and data_pipelines/ never import experiments/ or launch/;
  (d) data_pipelines never reaches tfusion.eval, tfusion.train or tfusion.inference.
"""
from __future__ import annotations

import ast
import collections
import os
from typing import Callable, Iterable, NamedTuple, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = ("tfusion", "data_pipelines")  # checked by every rule
IMPORTERS = ("launch", "experiments")  # read for their imports; nothing may import them
EVAL = "tfusion.eval"
DATA_MAY_NOT_REACH = ("tfusion.eval", "tfusion.train", "tfusion.inference")

# Nothing is being fixed: both stay empty (the arguments stay for the next refactor).
KNOWN_CYCLES_BEING_FIXED: tuple[tuple[str, ...], ...] = ()
KNOWN_REACHES_BEING_FIXED: tuple[str, ...] = ()


class Module(NamedTuple):
    source: str
    is_package: bool  # an __init__.py: relative imports resolve inside it


def in_area(module: str, area: str) -> bool:
    return module == area or module.startswith(area + ".")


def read_tree(root: str, packages: Iterable[str]) -> dict[str, Module]:
    """Dotted module name -> its source, for every .py file under root/<package>."""
    modules = {}
    for package in packages:
        for directory, _, files in os.walk(os.path.join(root, package)):
            for file in sorted(files):
                if not file.endswith(".py"):
                    continue
                path = os.path.join(directory, file)
                parts = os.path.relpath(path, root)[:-len(".py")].split(os.sep)
                is_package = parts[-1] == "__init__"
                with open(path, encoding="utf-8") as f:
                    modules[".".join(parts[:-1] if is_package else parts)] = Module(
                        f.read(), is_package)
    return modules


def _known(name: str, modules) -> Optional[str]:
    """The longest prefix of dotted `name` that is one of `modules` (None: third party)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def imported_modules(name: str, module: Module, modules) -> set[str]:
    """The modules of `modules` that `name` imports anywhere in its body."""
    targets = set()
    for node in ast.walk(ast.parse(module.source, filename=name)):
        if isinstance(node, ast.Import):
            targets.update(_known(alias.name, modules) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package holding `name`
                package = name.split(".") if module.is_package else name.split(".")[:-1]
                anchor = ".".join(package[:len(package) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            targets.add(_known(base, modules))  # `from pkg import x` runs pkg/__init__
            targets.update(_known(f"{base}.{alias.name}", modules) for alias in node.names)
    targets.discard(None)
    targets.discard(name)
    return targets


def import_graph(modules: dict[str, Module]) -> dict[str, set[str]]:
    return {name: imported_modules(name, module, modules) for name, module in modules.items()}


def shortest_path(graph, start: str, is_goal: Callable[[str], bool]) -> Optional[list[str]]:
    """start -> ... -> the nearest module (not start itself) with is_goal, or None."""
    parent = {}
    queue = collections.deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph.get(node, ())):
            if nxt in parent:
                continue
            parent[nxt] = node
            if is_goal(nxt):
                path = [nxt, node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return path[::-1]
            queue.append(nxt)
    return None


def reachable(graph, start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for nxt in graph.get(stack.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def cycles(graph, nodes: Iterable[str]) -> list[tuple[list[str], list[str]]]:
    """(members, one cycle a -> ... -> a through them) per strongly connected group of
    `nodes`, in the graph restricted to them."""
    nodes = set(nodes)
    sub = {n: graph.get(n, set()) & nodes for n in nodes}
    reach = {n: reachable(sub, n) for n in nodes}
    out, seen = [], set()
    for n in sorted(nodes):
        if n in reach[n] and n not in seen:
            members = sorted(m for m in reach[n] if n in reach[m])
            seen.update(members)
            out.append((members, shortest_path(sub, n, lambda m, n=n: m == n)))
    return out


def _path(path: list[str]) -> str:
    return " -> ".join(path)


def is_known_cycle(members: list[str], known) -> bool:
    return any(all(any(in_area(m, area) for area in areas) for m in members)
               for areas in known)


def layering_problems(modules: dict[str, Module], *, known_cycles=(),
                      known_reaches=()) -> list[str]:
    """Every broken rule of the module docstring, one message each, naming the modules."""
    graph = import_graph(modules)
    library = sorted(m for m in modules if any(in_area(m, p) for p in LIBRARY))
    problems = []
    for members, cycle in cycles(graph, library):  # (a)
        if not is_known_cycle(members, known_cycles):
            others = sorted(set(members) - set(cycle))
            problems.append(f"import cycle: {_path(cycle)}" + (
                f" (its group also holds {', '.join(others)})" if others else ""))
    for name in library:
        data = in_area(name, "data_pipelines")
        if not data and not in_area(name, EVAL) and name not in known_reaches:  # (b)
            path = shortest_path(graph, name, lambda m: in_area(m, "data_pipelines"))
            if path:
                problems.append(f"{name} reaches data_pipelines (only {EVAL}.* may): "
                                f"{_path(path)}")
        for target in sorted(graph[name]):  # (c)
            if any(in_area(target, p) for p in IMPORTERS):
                problems.append(f"{name} imports {target} (tfusion/ and data_pipelines/ "
                                "never import launch/ or experiments/)")
        if data:  # (d)
            path = shortest_path(graph, name, lambda m: any(in_area(m, a)
                                                            for a in DATA_MAY_NOT_REACH))
            if path:
                problems.append(f"{name} reaches {path[-1]} (data_pipelines never depends "
                                f"on {', '.join(DATA_MAY_NOT_REACH)}): {_path(path)}")
    return problems


def test_source_tree_keeps_its_layering():
    modules = read_tree(ROOT, LIBRARY + IMPORTERS)
    assert "tfusion.train.loop" in modules and "data_pipelines.pipeline" in modules
    problems = layering_problems(modules, known_cycles=KNOWN_CYCLES_BEING_FIXED,
                                 known_reaches=KNOWN_REACHES_BEING_FIXED)
    assert not problems, "\n".join(problems)


def _tree(sources: dict[str, str]) -> dict[str, Module]:
    """In-memory modules by dotted name; a name with submodules is a package."""
    return {name: Module(source, any(other.startswith(name + ".") for other in sources))
            for name, source in sources.items()}


# A small tree that keeps every rule; the tests below break one rule at a time.
CLEAN = {
    "tfusion": "",
    "tfusion.config": "import numpy as np\n",
    "tfusion.eval": "",
    "tfusion.eval.suites": "from data_pipelines.pipeline import make_eval_iterator\n",
    "tfusion.train": "",
    "tfusion.train.loop": "from tfusion.config import ConfigError\n",
    "tfusion.inference": "",
    "tfusion.inference.sampler": "from tfusion import config\n",
    "data_pipelines": "from data_pipelines.pipeline import make_eval_iterator\n",
    "data_pipelines.pipeline": "from .tokenizer import Tokenizer\nfrom tfusion.config import X\n",
    "data_pipelines.tokenizer": "import sentencepiece\n",
    "launch": "",
    "launch.train": "import data_pipelines\nfrom tfusion.train import loop\n",
    "experiments": "",
    "experiments.registry": "from data_pipelines import data_config\n",
}


def _problems(changed: dict[str, str], **known) -> list[str]:
    return layering_problems(_tree({**CLEAN, **changed}), **known)


def test_checker_passes_a_clean_tree():
    assert _problems({}) == []


def test_checker_reports_a_planted_cycle():
    # (a) A function-level `from data_pipelines import tokenizer` in a submodule is an
    # edge to the package, whose __init__ imports that submodule back.
    through_init = {"data_pipelines.pipeline": "def make_eval_iterator():\n"
                                               "    from data_pipelines import tokenizer\n"}
    assert _problems(through_init) == [
        "import cycle: data_pipelines -> data_pipelines.pipeline -> data_pipelines"]
    # Through a relative import; an allowlisted cycle is let through.
    relative = {"data_pipelines.tokenizer": "from .pipeline import batch_spec\n"}
    assert _problems(relative) == ["import cycle: data_pipelines.pipeline -> "
                                   "data_pipelines.tokenizer -> data_pipelines.pipeline"]
    assert _problems(relative, known_cycles=[("data_pipelines",)]) == []


def test_checker_reports_planted_layering_violations():
    # (b) The trainer reaches data_pipelines only through a chain, from inside a function.
    chain = {"tfusion.train.loop": "def run():\n    import tfusion.inference.sampler\n",
             "tfusion.inference.sampler": "from tfusion.eval import suites\n"}
    assert _problems(chain) == [
        "tfusion.inference.sampler reaches data_pipelines (only tfusion.eval.* may): "
        "tfusion.inference.sampler -> tfusion.eval.suites -> data_pipelines.pipeline",
        "tfusion.train.loop reaches data_pipelines (only tfusion.eval.* may): "
        "tfusion.train.loop -> tfusion.inference.sampler -> tfusion.eval.suites -> "
        "data_pipelines.pipeline"]
    assert _problems(chain, known_reaches=("tfusion.inference.sampler",
                                           "tfusion.train.loop")) == []
    # (c)
    assert _problems({"data_pipelines.tokenizer": "from experiments.registry import get\n",
                      "tfusion.eval.suites": "import launch.train\n"}) == [
        "data_pipelines.tokenizer imports experiments.registry (tfusion/ and "
        "data_pipelines/ never import launch/ or experiments/)",
        "tfusion.eval.suites imports launch.train (tfusion/ and data_pipelines/ never "
        "import launch/ or experiments/)"]
    # (d) Every data_pipelines module on the way is named.
    rule = "(data_pipelines never depends on tfusion.eval, tfusion.train, tfusion.inference)"
    assert _problems({"data_pipelines.tokenizer": "from tfusion.train.loop import run\n"}) == [
        f"data_pipelines reaches tfusion.train.loop {rule}: data_pipelines -> "
        "data_pipelines.pipeline -> data_pipelines.tokenizer -> tfusion.train.loop",
        f"data_pipelines.pipeline reaches tfusion.train.loop {rule}: "
        "data_pipelines.pipeline -> data_pipelines.tokenizer -> tfusion.train.loop",
        f"data_pipelines.tokenizer reaches tfusion.train.loop {rule}: "
        "data_pipelines.tokenizer -> tfusion.train.loop"]


def imports_of_test_modules(modules: dict[str, Module]) -> list[str]:
    """'<importer> imports <test module>' for every import of a test_* module: tests
    share helpers through tests/helpers/, never each other's private functions."""
    found = []
    for name, module in sorted(modules.items()):
        for node in ast.walk(ast.parse(module.source)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found += [f"{name} imports {t}" for t in targets
                      if t.startswith("tests.") and t.rsplit(".", 1)[-1].startswith("test_")]
    return found


def test_tests_import_helpers_not_each_other():
    modules = read_tree(ROOT, ("tests",))
    assert "tests.helpers.packed_batches" in modules and "tests.test_layering" in modules
    assert imports_of_test_modules(modules) == []
    planted = _tree({"tests": "", "tests.kernels": "",
                     "tests.kernels.test_sharded": "from tests.kernels.test_flash import _p\n",
                     "tests.kernels.test_flash": "from tests.helpers import REPO_ROOT\n"})
    assert imports_of_test_modules(planted) == [
        "tests.kernels.test_sharded imports tests.kernels.test_flash"]
