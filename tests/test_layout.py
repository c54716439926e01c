"""The layout: the commands on top, the library (gpt_trainer/) beneath them. Every library
module imports on its own without pulling in a command script, and no project module imports
another in a cycle."""
import ast
import re
import os
import subprocess
import sys

from trainutil import REPO

COMMANDS = ("train", "sample", "evaluate", "bench", "export", "plot", "harness", "chat")  # the scripts a user runs
LIBRARY = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "gpt_trainer")) if f.endswith(".py") and f != "__init__.py")


def project_modules():
    """{module name: file} of the top-level modules and the package's."""
    mods = {f[:-3]: os.path.join(REPO, f) for f in os.listdir(REPO) if f.endswith(".py")}
    mods.update({f"gpt_trainer.{m}": os.path.join(REPO, "gpt_trainer", f"{m}.py") for m in LIBRARY})
    return mods


def imported(path, mods):
    """The project modules a file imports, at the top or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in mods}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {node.module} & set(mods)
            out |= {f"{node.module}.{a.name}" for a in node.names} & set(mods)
    return out


def import_graph():
    mods = project_modules()
    return {m: imported(p, mods) - {m} for m, p in mods.items()}


def longest_chain(graph):
    """The longest import chain, as a list of modules; raises on a cycle."""
    memo, stack = {}, []

    def chain(m):
        if m in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if m not in memo:
            stack.append(m)
            memo[m] = max(([m] + chain(d) for d in graph[m]), key=len, default=[m])
            stack.pop()
        return memo[m]
    return max((chain(m) for m in graph), key=len)


def test_import_graph_is_acyclic_and_shallow():
    graph = import_graph()
    chain = longest_chain(graph)
    assert len(chain) <= 7, " -> ".join(chain)  # 9 before the package (train -> evaluate -> sample -> hf -> ...)
    for m in LIBRARY:
        assert not graph[f"gpt_trainer.{m}"] & set(COMMANDS), f"gpt_trainer.{m} imports a command script"


TORCH_FREE = ("errors", "fsutil", "dataloader", "tokenizer", "dataprep", "corpus", "metrics")  # the prepare
# scripts and the error path import these; torch would cost them seconds

# Each module is imported in a child forked from a parent that has imported no project module
# (only torch, for the modules that need it: importing it once keeps the test fast): the child
# must import it alone, without any command script, and TORCH_FREE ones without torch.
IMPORT_EACH = """
import importlib, os, sys, traceback
def check(module, torch_free):
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module("gpt_trainer." + module)
            bad = set(sys.modules) & set(sys.argv[2].split(","))
            bad |= {"torch"} & set(sys.modules) if torch_free else set()
            print(f"{module} imports {sorted(bad)}" if bad else "", end="", flush=True)
            os._exit(1 if bad else 0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    return os.waitpid(pid, 0)[1] == 0
modules, free = sys.argv[1].split(","), sys.argv[3].split(",")
failed = [m for m in modules if m in free and not check(m, True)]
import torch  # noqa
failed += [m for m in modules if m not in free and not check(m, False)]
sys.exit(f"failed: {failed}" if failed else 0)
"""


def test_each_library_module_imports_alone():
    """As `python -c "import gpt_trainer.X"` from the repo root: it needs nothing imported
    before it and pulls in no command script (nor torch, for the torch-free ones)."""
    p = subprocess.run([sys.executable, "-c", IMPORT_EACH, ",".join(LIBRARY), ",".join(COMMANDS), ",".join(TORCH_FREE)],
                       cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_readme_file_map_names_every_file():
    """The README's file map has a line for every script on top and every library module."""
    readme = open(os.path.join(REPO, "README.md")).read()
    mapped = set(re.findall(r"^\| `([^`]+)` \|", readme, flags=re.M))
    scripts = {f for f in os.listdir(REPO) if f.endswith(".py")}
    library = {f"gpt_trainer/{m}.py" for m in LIBRARY}
    assert scripts | library <= mapped, sorted((scripts | library) - mapped)
