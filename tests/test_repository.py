"""The repository speaks of the project only, and keeps its structure: checks over the tracked files."""

import ast
import json
import re
import subprocess

import pytest

# Words about how the project was built, which a reader cannot know: work periods, machine loans, "the
# [i]ssue", "Stage N", the machine where runs happened. Run-to-run noise is "separate machines of the same type".
# (Each word is spelled with a character class, [s] or [e], so that this file does not trip the check itself.)
BUILD_TALK = re.compile(r"\bses[s]ions? ?\d|\bses[s]ion's|\b(?:this|next|earlier|previous|later|one|each|work) "
                        r"ses[s]ions?\b|\blea[s]e[sd]?\b|devic[e] round|\bthe [i]ssue\b|\bstag[e][- ]?\d"
                        r"|\brounds? \d+\b|\bround [a-z]\d|\bon the devic[e]\b", re.IGNORECASE)


def tracked(repo, *patterns):
    out = subprocess.run(["git", "ls-files", *patterns], cwd=repo, capture_output=True, text=True, check=True)
    return [repo / line for line in out.stdout.splitlines() if (repo / line).is_file()]


def test_tracked_text_speaks_of_the_project_only(repo):
    hits = []
    for path in tracked(repo):
        if path.suffix in (".lock", ".png", ".gz", ".json") or path.name == "test_repository.py":
            continue
        for n, line in enumerate(path.read_text(errors="ignore").splitlines(), 1):
            if BUILD_TALK.search(line):
                hits.append(f"{path.relative_to(repo)}:{n}: {line.strip()[:100]}")
    assert hits == [], "say it in the project's terms:\n" + "\n".join(hits[:20])


@pytest.mark.parametrize("line, bad", [("as measured in ses" "sion 5", True), ("on another lea" "se", True),
                                       ("next ses" "sion's code", True), ("the is" "sue's estimate", True),
                                       ("Sta" "ge 2: training", True), ("the sta" "ge-5 fast path", True),
                                       ("pytest's scope='module'", False),
                                       ("lengths rounded to 256", False),
                                       ("a separate machine of the same type", False)])
def test_build_talk_pattern(line, bad):
    assert bool(BUILD_TALK.search(line)) is bad


def imports_of(path, packages):
    """The project packages a Python file imports (absolute imports, and relative ones within its package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found |= {f"{path.parent.name}.{node.module or a.name}" if node.module else
                          f"{path.parent.name}.{a.name}" for a in node.names}
            elif node.module:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {name for name in found if name.split(".")[0] in packages}


def module_graph(repo):
    packages = {"helpers": repo / "notebooks" / "helpers", "recipe": repo / "recipe", "fastpath": repo / "fastpath",
                "benchmarks": repo / "benchmarks"}
    graph = {}
    for package, folder in packages.items():
        for path in sorted(folder.glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            graph[name] = imports_of(path, packages)
    return {name: {d if d in graph else d.rsplit(".", 1)[0] for d in deps} & set(graph) - {name}
            for name, deps in graph.items()}


def test_no_import_cycles_and_the_tutorial_never_imports_the_fast_engine(repo):
    graph = module_graph(repo)
    assert not [m for m, deps in graph.items() if m.startswith("helpers") and any(
        d.startswith(("fastpath", "benchmarks")) and m != "helpers.unsloth_path" for d in deps)]
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for dep in graph[node]:
            if state.get(dep) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(stack + [node, dep])}")
            if dep not in state:
                visit(dep, stack + [node])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [])


BOUND = 1400  # lines of the modules notebooks 01-03 import (helpers/__init__.py included)


def tutorial_helpers(repo) -> set[str]:
    """The helpers modules notebooks 01-03 import, directly or through one another."""
    code = "\n".join("".join(cell["source"]) for path in sorted((repo / "notebooks").glob("0[123]_*.ipynb"))
                     for cell in json.loads(path.read_text())["cells"] if cell["cell_type"] == "code")
    todo = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "helpers":
            todo |= {node.module} if node.module != "helpers" else {f"helpers.{a.name}" for a in node.names}
    graph, found = module_graph(repo), {"helpers"}
    while todo:
        module = todo.pop()
        found.add(module)
        todo |= {d for d in graph[module] if d.startswith("helpers") and d not in found}
    return found


def test_the_tutorial_helpers_stay_small(repo):
    """What a learner reads beside notebooks 01-03: every helpers module they import, each opening with one paragraph
    that says which notebook uses it. The bound is their size now: it moves down as modules shrink, and up only
    for a fix or a feature that has to live there (its commit says which)."""
    modules = tutorial_helpers(repo)
    assert {"helpers.data", "helpers.model", "helpers.training"} <= modules and "helpers.unsloth_path" not in modules
    folder = repo / "notebooks" / "helpers"
    lines = {m: len((folder / f"{m.split('.')[1] if '.' in m else '__init__'}.py").read_text().splitlines())
             for m in modules}
    assert sum(lines.values()) <= BOUND, lines
    for path in folder.glob("*.py"):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert path.name == "__init__.py" or len(doc.split("\n\n")) == 1, f"{path.name}: one paragraph"
        assert "otebook" in doc, f"{path.name}: say which notebook uses it"
