"""nbgrader for this course: one assignment per notebook.

solutions/NN-name/NN-name.ipynb  (instructor source, with solutions and hidden tests)
    -> nbgrader generate_assignment ->
notebooks/NN-name/NN-name.ipynb  (student version; regenerate with `make notebooks`)

submitted/, autograded/, feedback/ and gradebook.db are created by the grading cycle and ignored by git.
"""

from pathlib import Path

c = get_config()  # noqa: F821  (injected by traitlets when nbgrader loads this file)

c.CourseDirectory.root = str(Path(__file__).resolve().parent)
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
