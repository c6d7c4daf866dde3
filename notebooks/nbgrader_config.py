"""nbgrader settings for the student's working folder: `make lab` copies this file into work/ with the notebooks,
and JupyterLab's Validate button reads it from there (the folder the server runs in). Validate runs the notebook
in small mode (nbgrader sets NBGRADER_EXECUTION); loading SmolLM2 can take longer than nbgrader's default 30 s
per cell on a busy laptop, hence the course's own limit."""

c = get_config()  # noqa: F821  (injected by traitlets when nbgrader loads this file)
c.Execute.timeout = 300
c.Execute.interrupt_on_timeout = True
