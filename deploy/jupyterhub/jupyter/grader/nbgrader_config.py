"""nbgrader in the grader service (deploy/jupyterhub): the course folder, whose own nbgrader_config.py sets the rest
(course id, timeouts, the course's autograde and feedback preprocessors)."""

import os
from pathlib import Path

from nbgrader.auth import NoAuthPlugin

c = get_config()  # noqa: F821  (injected by traitlets when nbgrader loads this file)

c.CourseDirectory.root = os.environ.get("LORA_COURSE_DIR", str(Path.home() / "lora-course"))
# The grader serves one course, named in its own config: it asks the hub nothing (the common folder's
# JupyterHubAuthPlugin would look the grader account up as a hub user). Who takes the course is the roster's business
# (roster.txt, the hub's nbgrader-<course> group): a student added in the formgrader enters the gradebook only.
c.Authenticator.plugin_class = NoAuthPlugin
