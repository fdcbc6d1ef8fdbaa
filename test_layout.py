"""The module graph: every project import at the top of its file, no cycle; the commands' loops short."""
import ast
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
MODULES = sorted(f[:-3] for f in os.listdir(HERE)
                 if f.endswith(".py") and not f.startswith(("test_", "conftest")))
PROJECT = set(MODULES) | {"crf_ext"}


def _imports(path):
    """(top-level project imports, [(line, name) of project imports inside functions or classes])."""
    tree = ast.parse(open(path).read())
    top, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.split(".")[0] in PROJECT:
                    (top.add(name.split(".")[0]) if node in tree.body else nested.append((node.lineno, name)))
    return top, nested


def test_project_imports_are_at_the_top():
    files = [f"{m}.py" for m in MODULES] + [os.path.join("crf_ext", f)
                                            for f in os.listdir(os.path.join(HERE, "crf_ext"))
                                            if f.endswith(".py")]
    nested = {f: n for f in files if (n := _imports(os.path.join(HERE, f))[1])}
    assert not nested, nested


def test_the_module_graph_has_no_cycle():
    graph = {m: _imports(os.path.join(HERE, f"{m}.py"))[0] - {m} for m in MODULES}
    graph["crf_ext"] = set()
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", " -> ".join(path + [m])
        state[m] = "open"
        for n in sorted(graph[m]):
            visit(n, path + [m])
        state[m] = "done"

    for m in graph:
        visit(m, [])
    assert "train" not in graph["label"] and "label" not in graph["train"]  # the cycle there was


def test_the_commands_loops_stay_short():
    """train.py, pretrain.py and label.py: no function a reader cannot hold (about 120 lines at most)."""
    long = {}
    for f in ("train.py", "pretrain.py", "label.py"):
        for node in ast.walk(ast.parse(open(os.path.join(HERE, f)).read())):
            lines = node.end_lineno - node.lineno + 1 if isinstance(node, ast.FunctionDef) else 0
            if lines > 120:
                long[f"{f}:{node.name}"] = lines
    assert not long, long


def _help_without_torch(argv0, run):
    """Runs the code `run` with sys.argv [argv0, --help]; asserts it exits 0, printing the flags, with
    torch not imported."""
    probe = ("import runpy, sys, options\n"
             f"sys.argv = [{argv0!r}, '--help']\n"
             "try:\n"
             f"    {run}\n"
             "except SystemExit as e:\n"
             "    assert e.code == 0, e.code\n"
             "print('torch loaded' if 'torch' in sys.modules else 'no torch')\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=HERE)
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip().endswith("no torch") and "--images" in out.stdout, argv0


def test_help_answers_before_torch_is_imported():
    """train.py, label.py, pretrain.py and export.py --help print their flags without loading torch."""
    for command in ("train.py", "label.py", "pretrain.py", "export.py"):
        _help_without_torch(command, f"runpy.run_path({os.path.join(HERE, command)!r}, run_name='__main__')")


def test_the_console_scripts_answer_help_before_torch_is_imported():
    """pyproject.toml's mal-* scripts are options' entries, which parse before importing the command."""
    scripts = dict(line.replace('"', "").split(" = ") for line in open(os.path.join(HERE, "pyproject.toml"))
                   .read().split("[project.scripts]")[1].split("\n\n")[0].strip().splitlines())
    assert scripts == {f"mal-{c}": f"options:mal_{c}" for c in ("train", "label", "pretrain", "export")}
    for script, entry in scripts.items():
        _help_without_torch(script, f"options.{entry.split(':')[1]}()")


def test_train_py_offers_what_a_user_sets():
    """At most ~35 options in train.py --help; the experiments' knobs are --recipe items."""
    out = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--help"], capture_output=True,
                         text=True)
    options = [line for line in out.stdout.splitlines() if line.startswith("  -")]
    assert out.returncode == 0 and 25 <= len(options) <= 35, len(options)
