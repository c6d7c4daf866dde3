"""`make check`: the student's progress across the whole course, from their own working folder.

    python -m lorakit.check              # every notebook in work/ (or $LORAKIT_WORK)
    python -m lorakit.check 03 10-dora   # only these (a number or a full name)
    python -m lorakit.check --all-cells  # run every cell, not only those the checks need

From a notebook cell:  `import lorakit.check; lorakit.check()`  (runs the same in a separate process, so the
kernel's own state is untouched, and prints the same table).

For each notebook it runs the student's current answers and the *visible* tests of each test cell, in small
mode (`lorakit.small_mode()` is true), all in ONE Python process for the whole course: no kernel per
notebook. It reads the notebooks and never writes them. A test cell counts as passed when it runs without
raising. Points come only from grading: a test cell's points include its hidden tests, which are not here.

Which cells run is decided from nbgrader's cell metadata alone, so a new notebook needs nothing special:
answer cells (`nbgrader.solution`) and test cells (`nbgrader.grade`) always run; any other code cell runs only
if a later cell that runs needs a name it binds or touches (a static analysis of the names each cell reads and
writes; names bound by `import`, `def` and `class` count as read-only). Two optional cell tags override it:
`check-always` (run it anyway: a cell whose effect the analysis cannot see, such as a seed set through a
module) and `check-never` (never run it, for example a long demonstration that the checks do not need).
The test cells' source comes from the course's release (`notebooks/`), matched by `grade_id`, when it has
the notebook, so an edited test cell in the student's copy does not change what is checked. Autograding runs
the cells `select_cells` picks too (`lorakit.grading.ExecuteGradedCells`), so a cell the checks need is one the
grader runs, and the pipeline test grades every solved notebook that way.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import copy
import io
import os
import signal
import subprocess
import sys
import time
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RELEASE = ROOT / "notebooks"
ALWAYS, NEVER = "check-always", "check-never"
VERBOSE = bool(os.environ.get("LORAKIT_CHECK_VERBOSE"))
CELL_TIMEOUT = int(os.environ.get("LORAKIT_CHECK_CELL_TIMEOUT", "300"))


def work_dir() -> Path:
    return Path(os.environ.get("LORAKIT_WORK", ROOT / "work"))


@dataclass
class Result:
    name: str
    passed: int = 0
    total: int = 0
    first_failure: str = ""
    seconds: float = 0.0
    missing: bool = False  # in the course, not (yet) in the student's folder
    failures: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.total > 0 and self.passed == self.total


# --------------------------------------------------------------------------------------------- analysis

def _python_source(source: str) -> str:
    """Cell source as plain Python (IPython magics and shell escapes translated)."""
    try:
        from IPython.core.inputtransformer2 import TransformerManager
        return TransformerManager().transform_cell(source)
    except Exception:  # noqa: BLE001 - a cell IPython cannot read is run as it is (and fails there)
        return source


class _Names(ast.NodeVisitor):
    """Names a cell reads and writes at its top level; inside a function, lambda or comprehension, only the
    names that are not its own parameters or locals (those are the function's business, not the cell's)."""

    def __init__(self):
        self.loads: set[str] = set()
        self.stores: set[str] = set()
        self.star = False

    def visit_Name(self, node):
        (self.loads if isinstance(node.ctx, ast.Load) else self.stores).add(node.id)

    def visit_ImportFrom(self, node):
        self.star |= any(a.name == "*" for a in node.names)

    def _scope(self, node, params: set[str], body):
        inner = _Names()
        for part in body:
            inner.visit(part)
        local = params | inner.stores
        self.loads |= inner.loads - local
        self.star |= inner.star

    def visit_FunctionDef(self, node):
        for d in node.decorator_list + node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
            self.visit(d)
        a = node.args
        params = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs} | {x.arg for x in (a.vararg, a.kwarg) if x}
        self.stores.add(node.name)
        self._scope(node, params, node.body)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node):
        for d in node.args.defaults:
            self.visit(d)
        a = node.args
        params = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs} | {x.arg for x in (a.vararg, a.kwarg) if x}
        self._scope(node, params, [node.body])

    def _comprehension(self, node):
        self.visit(node.generators[0].iter)
        inner = [g.target for g in node.generators] + [x for g in node.generators for x in g.ifs]
        inner += [g.iter for g in node.generators[1:]]
        inner += [node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]
        self._scope(node, set(), inner)

    visit_ListComp = visit_SetComp = visit_GeneratorExp = visit_DictComp = _comprehension


def _analyse(source: str):
    """(loads, refs, rebinds, readonly, star): the names the cell reads before binding them itself; every name
    it references at all; names it rebinds by an unconditional top-level statement; names it binds by import,
    def or class; whether it has a star import."""
    try:
        tree = ast.parse(_python_source(source))
    except SyntaxError:
        return set(), set(), set(), set(), False
    loads, refs, readonly, rebinds, defined, star = set(), set(), set(), set(), set(), False

    def names(*nodes):
        n = _Names()
        for node in nodes:
            if node is not None:
                n.visit(node)
        return n

    def top(statements):
        nonlocal star
        for st in statements:
            if isinstance(st, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = st.targets if isinstance(st, ast.Assign) else [st.target]
                value = names(st.value)
                target = names(*targets)
                loads.update(value.loads - defined)
                if isinstance(st, ast.AugAssign):
                    loads.update(target.stores - defined)
                loads.update(target.loads - defined)  # x[i] = ..., x.a = ...: x is read (and changed)
                refs.update(value.loads | value.stores | target.loads | target.stores)
                whole = set()
                for t in targets:
                    for node in ast.walk(t):
                        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                            whole.add(node.id)
                if not isinstance(st, ast.AugAssign):
                    rebinds.update(whole)
                defined.update(whole)
                star |= value.star
                continue
            n = names(st)
            star |= n.star
            loads.update(n.loads - defined - n.stores)
            refs.update(n.loads | n.stores)
            if isinstance(st, (ast.Import, ast.ImportFrom)):
                bound = {(a.asname or a.name.split(".")[0]) for a in st.names}
                readonly.update(bound)
                rebinds.update(bound)
            elif isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                readonly.add(st.name)
                rebinds.add(st.name)
            elif isinstance(st, (ast.With, ast.AsyncWith)):
                top(st.body)
                continue
            defined.update(n.stores)

    top(tree.body)
    return loads, refs, rebinds, readonly, star


def select_cells(cells: list[dict]) -> list[int]:
    """Indices (into `cells`, code cells only) of the cells to run, in order; see the module docstring."""
    info = [_analyse(c["source"]) for c in cells]
    readonly: set[str] = set(dir(builtins))
    for _, _, _, ro, _ in info:
        readonly |= ro
    needed: set[str] = set()
    chosen = []
    for i in reversed(range(len(cells))):
        cell, (loads, refs, rebinds, _, star) = cells[i], info[i]
        tags = cell.get("metadata", {}).get("tags", [])
        grading = cell.get("metadata", {}).get("nbgrader", {})
        if NEVER in tags:
            continue
        # a cell that reads a needed name without rebinding it may change the object (add_lora(model, ...));
        # read-only names (modules, functions, classes) are only used, never changed, by such a cell
        touches = (refs & needed) - (readonly - rebinds)
        if grading.get("solution") or grading.get("grade") or ALWAYS in tags or star or touches or (rebinds & needed):
            chosen.append(i)
            needed = (needed - rebinds) | loads
    return chosen[::-1]


# -------------------------------------------------------------------------------------------- execution

class _CellTimeout(Exception):
    pass


class _Sink(io.TextIOBase):
    """Swallows a cell's output (keeping only the last few KB, so huge output costs nothing)."""

    def __init__(self, keep: int = 4000):
        self.keep, self.tail = keep, ""

    def writable(self):
        return True

    def write(self, s):
        self.tail = (self.tail + s)[-self.keep:]
        return len(s)


def _cached_loader():
    """lorakit.models.load_smollm2 that loads SmolLM2 once per process and hands each notebook its own copy."""
    from lorakit import models
    original = models.load_smollm2
    cache = {}

    def load_smollm2(dtype=None, **kwargs):
        key = (str(dtype), tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = original(**({"dtype": dtype} if dtype is not None else {}), **kwargs)
        model, tokenizer = cache[key]
        return copy.deepcopy(model), tokenizer

    load_smollm2.__doc__ = original.__doc__
    return models, original, load_smollm2


def _short(exc: BaseException) -> str:
    if isinstance(exc, NotImplementedError):
        return "not answered yet (NotImplementedError)"
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def _read(path: Path):
    import nbformat
    return nbformat.read(path, as_version=4)


def _release_tests(name: str, release: Path) -> dict[str, str]:
    path = release / name / f"{name}.ipynb"
    if not path.exists():
        return {}
    return {c.metadata["nbgrader"]["grade_id"]: c.source for c in _read(path).cells
            if c.cell_type == "code" and c.metadata.get("nbgrader", {}).get("grade")
            and not c.metadata["nbgrader"].get("solution")}


def check_notebook(path: Path, release: Path = RELEASE, all_cells: bool = False) -> Result:
    """Run one notebook's answers and visible tests in a fresh namespace of this process."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from IPython.display import display

    name = path.stem
    result, start = Result(name), time.perf_counter()
    try:
        nb = _read(path)
    except Exception as exc:  # noqa: BLE001 - a broken file is reported, not fatal
        result.first_failure = f"cannot read the notebook: {_short(exc)}"
        return result
    official = _release_tests(name, release)
    cells = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        grading = cell.metadata.get("nbgrader", {})
        source = cell.source
        if grading.get("grade") and not grading.get("solution"):
            source = official.get(grading.get("grade_id"), source)
        cells.append({"source": source, "metadata": cell.metadata})
    order = range(len(cells)) if all_cells else select_cells(cells)
    namespace = {"__name__": "__main__", "display": display, "__builtins__": __builtins__}
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    cwd = os.getcwd()
    try:
        os.chdir(path.parent)
        for i in order:
            cell = cells[i]
            grading = cell["metadata"].get("nbgrader", {})
            is_test = grading.get("grade") and not grading.get("solution")
            t0 = time.perf_counter()
            error = _run_cell(cell["source"], namespace)
            if VERBOSE:
                print(f"\n  cell {i} ({grading.get('grade_id', '')}) {time.perf_counter() - t0:.1f} s"
                      f"{'' if error is None else ' ' + _short(error)}", end="", file=sys.stderr)
            if is_test:
                result.total += 1
                if error is None:
                    result.passed += 1
                else:
                    result.failures.append(f"{grading.get('grade_id')}: {_short(error)}")
    finally:
        os.chdir(cwd)
        signal.signal(signal.SIGALRM, previous)
        plt.close("all")
        namespace.clear()
    result.first_failure = result.failures[0] if result.failures else ""
    result.seconds = time.perf_counter() - start
    return result


def _raise_timeout(signum, frame):
    raise _CellTimeout(f"a cell ran longer than {CELL_TIMEOUT} s (LORAKIT_CHECK_CELL_TIMEOUT)")


def _run_cell(source: str, namespace: dict) -> BaseException | None:
    sink = _Sink()
    try:
        code = compile(_python_source(source), "<cell>", "exec")
        signal.alarm(CELL_TIMEOUT)
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            exec(code, namespace)
        return None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - SystemExit from a student's cell is a failure, not an exit
        exc.__traceback__ = None
        return exc
    finally:
        signal.alarm(0)


# ------------------------------------------------------------------------------------------- reporting

def course_notebooks(work: Path, release: Path = RELEASE) -> list[tuple[str, Path | None]]:
    """(name, path in work/ or None) for every notebook of the course and every one in the student's folder."""
    def listed(folder: Path) -> dict[str, Path]:
        return {p.stem: p for p in sorted(folder.glob("*/*.ipynb")) if p.stem == p.parent.name}

    mine, course = listed(work), listed(release)
    return [(name, mine.get(name)) for name in sorted(set(mine) | set(course))]


def bar(done: float, total: float, width: int = 24) -> str:
    filled = round(width * done / total) if total else 0
    return "█" * filled + "░" * (width - filled)


def report(results: list[Result], seconds: float) -> str:
    width = max([len(r.name) for r in results] + [8])
    lines = [f"{'notebook':<{width}}  visible checks", ""]
    for r in results:
        if r.missing:
            status = "not in your folder yet (run `make lab` to copy it)"
            lines.append(f"{r.name:<{width}}  {bar(0, 1, 10)}   -/-  {status}")
            continue
        status = "✓ complete" if r.complete else (f"next: {r.first_failure}" if r.first_failure else "")
        lines.append(f"{r.name:<{width}}  {bar(r.passed, r.total, 10)}  {r.passed:>2}/{r.total:<2} {status}")
    done = sum(r.complete for r in results)
    passed, total = sum(r.passed for r in results), sum(r.total for r in results)
    lines += ["", f"[{bar(done, len(results))}] {done} of {len(results)} notebooks complete "
              f"({passed} of {total} visible checks pass) in {seconds:.0f} s",
              "Visible checks only: hidden tests and points come when your work is graded."]
    return "\n".join(lines)


def run(names: list[str] | None = None, work: Path | None = None, release: Path = RELEASE,
        all_cells: bool = False, out=sys.stdout) -> list[Result]:
    """Check the student's notebooks in this process; prints a line per notebook as it goes, then the table.
    The process's environment, warning filters and lorakit.models are restored afterwards."""
    import warnings

    saved = {k: os.environ.get(k) for k in ("LORAKIT_SMALL", "TQDM_DISABLE", "MPLBACKEND")}
    os.environ.update({"LORAKIT_SMALL": "1", "TQDM_DISABLE": "1", "MPLBACKEND": "Agg"})
    work = work or work_dir()
    wanted = course_notebooks(work, release)
    if names:
        wanted = [(n, p) for n, p in wanted if any(n == k or n.startswith(k + "-") for k in names)]
    start = time.perf_counter()
    models, original, cached = _cached_loader()
    models.load_smollm2 = cached
    results = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, path in wanted:
                if path is None:
                    results.append(Result(name, missing=True))
                    continue
                print(f"checking {name} ...", end="", file=out, flush=True)
                r = check_notebook(path, release, all_cells)
                print(f" {r.passed}/{r.total} ({r.seconds:.0f} s)", file=out, flush=True)
                results.append(r)
    finally:
        models.load_smollm2 = original
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    print("\n" + report(results, time.perf_counter() - start), file=out, flush=True)
    return results


def check(*names: str, all_cells: bool = False) -> int:
    """From a notebook: run `python -m lorakit.check` in a fresh process (this kernel is left alone) and
    show its output; returns its exit code (0 when every notebook is complete)."""
    args = [sys.executable, "-m", "lorakit.check", *names] + (["--all-cells"] if all_cells else [])
    env = {**os.environ, "LORAKIT_WORK": str(work_dir())}
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          cwd=ROOT) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
    return proc.returncode


class _CallableModule(types.ModuleType):
    def __call__(self, *names: str, all_cells: bool = False) -> int:
        return check(*names, all_cells=all_cells)


sys.modules[__name__].__class__ = _CallableModule


def main(argv: list[str]) -> int:
    all_cells = "--all-cells" in argv
    names = [a for a in argv if not a.startswith("-")]
    try:
        results = run(names or None, all_cells=all_cells)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        return 2
    return 0 if results and all(r.complete for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
