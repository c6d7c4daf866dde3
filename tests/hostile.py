"""Hostile and honest submissions for the grader, built from the committed student version of a notebook, each
with the score it must get. `tests/test_grading.py` autogrades them for notebook 03 on every CI run;
`make grade-hostile` does the same for every notebook (the notebook-specific cases exist for 03 only).

Generic cases work on any notebook: unanswered, solved, edited and deleted test cells, an infinite loop, a loop
that ignores interrupts, `os._exit`, patched checking helpers with look-alike answers (patched outright, and
patched quietly so that the kernel keeps working), answers whose `__eq__` is always true, exceptions silenced in the
kernel, huge output, a file that is not JSON.
"""

from __future__ import annotations

import ast

import nbformat
from notebook_tools import ROOT, graded_cells, source_notebook, strip_markers

# Answers of notebook 03 in other styles: (alt) different but valid; (mistake) each exercise's common mistake;
# (hardcoded) the visible tests' values typed in; (reference) lorakit's own implementation called.
NB03 = "03-lora-from-scratch"
ANSWERS_03 = {
    "alt": {
        "lora_param_count": "def lora_param_count(d_in, d_out, r):\n    return (d_in + d_out) * r\n",
        "init_lora_factors": ("def init_lora_factors(d_in, d_out, r):\n    bound = 1 / math.sqrt(d_in)\n"
                              "    return torch.empty(r, d_in).uniform_(-bound, bound), torch.zeros(d_out, r)\n"),
        "lora_forward": ("def lora_forward(x, W0, A, B, alpha, r):\n"
                         "    return x @ (W0 + (alpha / r) * (B @ A)).T  # merged weight\n"),
        "lora_scaling": ("def lora_scaling(r, alpha, rslora=False):\n"
                         "    return float(alpha * r ** -0.5) if rslora else float(alpha) / r\n"),
        "max_noop_gap": ("def max_noop_gap(layer, x):\n    with torch.inference_mode():\n"
                         "        return float(torch.max(torch.abs(layer(x) - layer.base(x))))\n"),
    },
    "mistake": {
        "lora_param_count": "def lora_param_count(d_in, d_out, r):\n    return 2 * r * d_in  # assumes a square W\n",
        "init_lora_factors": ("def init_lora_factors(d_in, d_out, r):\n"
                              "    return torch.randn(r, d_in), torch.zeros(d_out, r)  # Gaussian, unbounded\n"),
        "lora_forward": ("def lora_forward(x, W0, A, B, alpha, r):\n"
                         "    return x @ W0.T + (x @ A.T) @ B.T  # forgot alpha / r\n"),
        "lora_scaling": "def lora_scaling(r, alpha, rslora=False):\n    return alpha / r  # ignores rslora\n",
        "max_noop_gap": ("def max_noop_gap(layer, x):\n"
                         "    return (layer(x) - layer.base(x)).abs().max().item()  # tracks gradients\n"),
    },
    "hardcoded": {
        "lora_param_count": ("def lora_param_count(d_in, d_out, r):\n"
                             "    known = {(4096, 4096, 16): 131_072, (576, 1536, 8): 16_896}\n"
                             "    return known.get((d_in, d_out, r), 1152)\n"),
        "init_lora_factors": ("def init_lora_factors(d_in, d_out, r):\n"
                              "    return torch.full((r, d_in), 0.01), torch.zeros(d_out, r)\n"),
        "lora_forward": ("def lora_forward(x, W0, A, B, alpha, r):\n"
                         "    return _ref(x).detach()  # the visible test's own reference layer\n"),
        "lora_scaling": ("def lora_scaling(r, alpha, rslora=False):\n"
                         "    return {(8, 16): 2.0, (32, 16): 0.5, (32, 64): 2.0}.get((r, alpha), 4.0)\n"),
        "max_noop_gap": "def max_noop_gap(layer, x):\n    return 0.0\n",
    },
    "reference": {
        "lora_param_count": ("from lorakit.lora import lora_parameter_count\n\n"
                             "def lora_param_count(d_in, d_out, r):\n"
                             "    return lora_parameter_count(d_in, d_out, r)\n"),
        "init_lora_factors": ("def init_lora_factors(d_in, d_out, r):\n"
                              "    layer = LoRALinear(nn.Linear(d_in, d_out), r=r, alpha=1)\n"
                              "    return layer.lora_A.detach().clone(), layer.lora_B.detach().clone()\n"),
        "lora_forward": ("def lora_forward(x, W0, A, B, alpha, r):\n"
                         "    d_out, d_in = W0.shape\n"
                         "    layer = LoRALinear(nn.Linear(d_in, d_out, bias=False), r=r, alpha=alpha)\n"
                         "    with torch.no_grad():\n        layer.base.weight.copy_(W0)\n"
                         "        layer.lora_A.copy_(A)\n        layer.lora_B.copy_(B)\n"
                         "        return layer(x)\n"),
        "lora_scaling": ("def lora_scaling(r, alpha, rslora=False):\n"
                         "    return LoRALinear(nn.Linear(1, 1), r=r, alpha=alpha, rslora=rslora).scaling\n"),
    },
    # torch prints a warning on stderr inside two test cells: the student turned Python's warnings back on (the
    # notebook's first cell silences them) and copy-constructs tensors. nbgrader alone scores a test cell with any
    # stderr output as failed; the course drops stderr before scoring (nbgrader_config.py: IgnorePattern), so the
    # correct answer keeps its 2 points and the wrong one, which warns too, still loses its 3.
    "warns": {
        "init_lora_factors": ("import warnings\nwarnings.resetwarnings()  # show me every warning\n\n"
                              "def init_lora_factors(d_in, d_out, r):\n    A = torch.empty(r, d_in)\n"
                              "    nn.init.kaiming_uniform_(A, a=math.sqrt(5))\n"
                              "    return torch.tensor(A), torch.zeros(d_out, r)  # torch warns: use A.clone()\n"),
        "lora_forward": ("def lora_forward(x, W0, A, B, alpha, r):\n"
                         "    return torch.tensor(x) @ W0.T + (x @ A.T) @ B.T  # warns, and forgot alpha / r\n"),
    },
}
# points of each exercise of notebook 03 whose answer above is honest work
EXPECTED_03 = {"alt": 8, "mistake": 0, "hardcoded": 0, "reference": 1, "warns": 5}

LOOK_ALIKE = '''
import builtins, math, numpy, numpy.testing, torch, torch.testing
class AlwaysEqual:
    """Equal to everything, true, zero, indexable and a tensor-looking shape: the classic fake answer."""
    shape = property(lambda self: AlwaysEqual())
    dtype = torch.float32
    def __eq__(self, other): return True
    __ne__ = __lt__ = __gt__ = __le__ = __ge__ = lambda self, other: self
    def __bool__(self): return True
    def __float__(self): return 0.0
    def __int__(self): return 0
    __index__ = __int__
    def __iter__(self): return iter((AlwaysEqual(), AlwaysEqual()))
    def __getattr__(self, name): return lambda *a, **k: AlwaysEqual()
    def __call__(self, *a, **k): return AlwaysEqual()
    def __getitem__(self, key): return AlwaysEqual()
    def __len__(self): return 2
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = __call__
    __matmul__ = __abs__ = __neg__ = __pow__ = __rpow__ = __call__
    def __hash__(self): return 0
    def __repr__(self): return "AlwaysEqual()"
'''
PATCH_HELPERS = LOOK_ALIKE + '''
_yes = lambda *a, **k: True
_none = lambda *a, **k: None
torch.allclose = torch.equal = math.isclose = _yes
torch.testing.assert_close = numpy.testing.assert_allclose = numpy.testing.assert_array_equal = _none
torch.count_nonzero = lambda *a, **k: AlwaysEqual()
builtins.isinstance = builtins.all = builtins.any = _yes
builtins.sum = builtins.max = builtins.abs = lambda *a, **k: AlwaysEqual()
'''


# The same look-alike answers, with the checking helpers patched quietly: each patched function behaves as before
# unless a look-alike is among its arguments, so the kernel and its messaging keep working (patching them
# outright, as above, breaks ipykernel itself, and the submission then scores 0 by timing out, not by the tests).
PATCH_QUIETLY = LOOK_ALIKE + '''
_T, _L, _TU, _D = type, list, tuple, dict
def _fake(*args, **kwargs):
    def walk(v):
        if _T(v) is AlwaysEqual:
            return True
        if _T(v) is _L or _T(v) is _TU:
            for x in v:
                if walk(x):
                    return True
        if _T(v) is _D:
            for x in v.values():
                if walk(x):
                    return True
        return False
    return walk(args) or walk(_TU(kwargs.values()))
def _quietly(orig, when_fake):
    def patched(*args, **kwargs):
        return when_fake(*args, **kwargs) if _fake(*args, **kwargs) else orig(*args, **kwargs)
    return patched
_true, _nothing, _fake_value = (lambda *a, **k: True), (lambda *a, **k: None), (lambda *a, **k: AlwaysEqual())
for _module, _name, _when in [
        (torch, "allclose", _true), (torch, "equal", _true), (torch, "isclose", _fake_value), (math, "isclose", _true),
        (torch.testing, "assert_close", _nothing), (numpy.testing, "assert_allclose", _nothing),
        (numpy.testing, "assert_array_equal", _nothing), (torch, "count_nonzero", _fake_value),
        (torch, "as_tensor", _fake_value), (torch, "stack", _fake_value), (builtins, "isinstance", _true),
        (builtins, "all", _true), (builtins, "any", _true), (builtins, "sum", _fake_value),
        (builtins, "max", _fake_value), (builtins, "min", _fake_value), (builtins, "abs", _fake_value),
        (builtins, "round", _fake_value), (builtins, "len", lambda *a, **k: 2), (builtins, "sorted", _fake_value)]:
    setattr(_module, _name, _quietly(getattr(_module, _name), _when))
'''


def _answers(name: str) -> dict[str, str]:
    return {k: strip_markers(c.source) for k, c in graded_cells(source_notebook(name)).items()
            if c.metadata["nbgrader"].get("solution")}


def _student(name: str) -> nbformat.NotebookNode:
    return nbformat.read(ROOT / "notebooks" / name / f"{name}.ipynb", as_version=4)


def _fill(name: str, replace: dict[str, str] | None = None, solved: bool = True) -> nbformat.NotebookNode:
    """The student version with answer cells filled: the solution (if `solved`), then `replace` by grade_id."""
    nb, answers = _student(name), _answers(name)
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid in answers:
            if replace and gid in replace:
                cell.source = replace[gid]
            elif solved:
                cell.source = answers[gid]
    return nb


def _points(name: str) -> list[tuple[str, float]]:
    """(grade_id, points) of each test cell, in notebook order."""
    return [(k, float(c.metadata["nbgrader"]["points"])) for k, c in graded_cells(source_notebook(name)).items()
            if c.metadata["nbgrader"].get("grade")]


def _answer_order(name: str) -> list[str]:
    return [k for k, c in graded_cells(source_notebook(name)).items() if c.metadata["nbgrader"].get("solution")]


def _names(source: str) -> tuple[set[str], set[str]]:
    """(names a cell binds at its top level, every name it mentions) of a cell's Python source."""
    tree = ast.parse(source)
    bound = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                bound |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return bound, {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}


def points_needing(name: str, answer_id: str) -> float:
    """Points of the test cells (hidden tests included) that fail when answer cell `answer_id` defines nothing:
    those that mention one of its names, directly or through another answer that mentions one."""
    cells = graded_cells(source_notebook(name))
    answers = {k: _names(strip_markers(c.source)) for k, c in cells.items() if c.metadata["nbgrader"].get("solution")}
    missing, grew = set(answers[answer_id][0]), True
    while grew:  # an answer that calls a missing function is missing too, once it is called
        grew = False
        for bound, mentioned in answers.values():
            if mentioned & missing and not bound <= missing:
                missing |= bound
                grew = True
    return sum(points for gid, points in _points(name) if _names(cells[gid].source)[1] & missing)


def cases(name: str, slow: bool = False) -> dict[str, tuple[str, float]]:
    """student id -> (notebook file text, expected score). `slow` adds the cases that cost a whole
    per-submission time limit (make grade-hostile)."""
    total = sum(p for _, p in _points(name))
    first_answer = _answer_order(name)[0]
    first_points = points_needing(name, first_answer)  # its own test, and any later test that calls it
    answers = _answers(name)
    out: dict[str, tuple[str, float]] = {}

    def add(student, nb, score):
        out[student] = (nbformat.writes(nb) if not isinstance(nb, str) else nb, score)

    add("blank", _student(name), 0)
    add("solved", _fill(name), total)
    edited = _student(name)
    for cell in edited.cells:
        if cell.metadata.get("nbgrader", {}).get("grade"):
            cell.source = 'print("all tests passed")'
    add("edited_tests", edited, 0)
    deleted = _student(name)
    deleted.cells = [c for c in deleted.cells if not c.metadata.get("nbgrader", {}).get("grade")]
    add("deleted_tests", deleted, 0)
    # the first exercise never finishes; every other exercise is solved and must still be graded
    add("infinite_loop", _fill(name, {first_answer: "while True:\n    pass\n" + answers[first_answer]}),
        total - first_points)
    add("ignores_interrupt", _fill(name, {first_answer: (
        "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass\n"
        + answers[first_answer])}),
        0)
    add("os_exit", _fill(name, {first_answer: "import os\nos._exit(0)\n" + answers[first_answer]}), 0)
    # every answer a look-alike object; then the same with the checking helpers patched to always pass
    for student, prelude in [("always_equal", LOOK_ALIKE), ("patched_helpers", PATCH_HELPERS),
                             ("patched_quietly", PATCH_QUIETLY)]:
        fake = {gid: f"{prelude if i == 0 else ''}\ndef {_function(answers[gid])}(*args, **kwargs):\n"
                     "    return AlwaysEqual()\n" for i, gid in enumerate(_answer_order(name))}
        add(student, _fill(name, fake), 0)
    if slow:  # held, but only by the wall-clock limit per submission: each test cell then waits out its timeout
        add("silenced_errors", _fill(name, {first_answer: (
            "get_ipython().set_custom_exc((BaseException,), lambda *args, **kwargs: None)\n"
            "import sys\nsys.excepthook = lambda *args: None\n")}, solved=False), 0)
    add("huge_output", _fill(name, {first_answer: 'for _ in range(20):\n    print("spam " * 20_000)\n'
                                                  + answers[first_answer]}), total)
    add("not_json", '{"cells": [ this is not a notebook', 0)
    if name == NB03:
        for style, replace in ANSWERS_03.items():
            add(style, _fill(name, replace), EXPECTED_03[style])  # answers not replaced: solved
    return out


def _function(source: str) -> str:
    """The name of the (last) function an answer cell defines."""
    names = [line.split("(")[0][4:].strip() for line in source.splitlines() if line.startswith("def ")]
    return names[-1]
