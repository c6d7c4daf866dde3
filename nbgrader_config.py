"""nbgrader for this course: one assignment per notebook.

solutions/NN-name/NN-name.ipynb  (instructor source, with solutions and hidden tests)
    -> nbgrader generate_assignment ->
notebooks/NN-name/NN-name.ipynb  (student version; regenerate with `make notebooks`)

submitted/, autograded/, feedback/ and gradebook.db are created by the grading cycle and ignored by git.
"""

from pathlib import Path

c = get_config()  # noqa: F821  (injected by traitlets when nbgrader loads this file)

c.CourseDirectory.root = str(Path(__file__).resolve().parent)
# On JupyterHub (deploy/jupyterhub/), this id names the formgrader's hub service and the groups formgrade-lora-course
# (instructors) and nbgrader-lora-course (students). The exchange every server shares is set in
# deploy/jupyterhub/jupyter/common/nbgrader_config.py; the grader service finds this folder through
# deploy/jupyterhub/jupyter/grader/nbgrader_config.py.
c.CourseDirectory.course_id = "lora-course"
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "notebooks"
c.CourseDirectory.submitted_directory = "submitted"
c.CourseDirectory.autograded_directory = "autograded"
c.CourseDirectory.feedback_directory = "feedback"

# Graded cells are cheap by design, but each notebook loads SmolLM2 (about 10 s) and trains a little
# in small mode; 300 s per cell leaves room on a busy 2-core machine without hiding a hung kernel.
c.Execute.timeout = 300
c.Execute.interrupt_on_timeout = True
# After a cell's reply, wait this long for the rest of its output (nbclient's default, 4 s, is short for a cell
# that printed megabytes on a busy machine; past it nbclient gives up on the whole notebook).
c.Execute.iopub_timeout = 30

# A warning that torch (or transformers' logging, or a progress bar) prints on stderr inside a test cell must not cost a
# correct answer its points, as nbgrader alone scores a test cell with any stderr output as failed. In this course a
# test passes or fails by raising: every test cell is plain asserts, and a failure is an "error" output, never stderr.
# So nbgrader's IgnorePattern (in its autograde list, right after Execute) drops every stderr output before the
# scores are read: its pattern, an empty match at the start, matches any text. This gives a hostile submission
# nothing: to score a failing test it would have to keep the failure out of the error output, and then it could as
# well print nothing. tests/hostile.py, case "warns": a correct answer under a torch warning keeps its points, a wrong
# one that warns too still loses them.
c.IgnorePattern.enabled = True
c.IgnorePattern.pattern = r"\A"

c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"

# Feedback shows results, never the hidden tests' code: lorakit.grading.StripHiddenTests removes their regions
# from the test cells and cuts every error output down to its exception line (a traceback quotes the code).
from nbconvert.preprocessors import CSSHTMLHeaderPreprocessor  # noqa: E402
from nbgrader.converters import Autograde  # noqa: E402
from nbgrader.preprocessors import Execute, GetGrades  # noqa: E402

from lorakit.grading import ExecuteGradedCells, StripHiddenTests  # noqa: E402

c.GenerateFeedback.preprocessors = [StripHiddenTests, GetGrades, CSSHTMLHeaderPreprocessor]

# Autograde runs what grading needs, not the demonstrations: lorakit.grading.ExecuteGradedCells takes the place of
# nbgrader's Execute (same timeouts, set above) and runs the answer cells, the test cells and the cells they depend
# on, as `make check` chooses them. The rest of the list is nbgrader's own default, read from nbgrader itself.
c.Autograde.autograde_preprocessors = [
    ExecuteGradedCells if p is Execute else p
    for p in Autograde.class_traits()["autograde_preprocessors"].make_dynamic_default()
]
