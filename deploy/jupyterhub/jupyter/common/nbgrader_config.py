"""nbgrader on every server of the hub (deploy/jupyterhub): the exchange, and who takes which course.

The hub puts this folder on each server's JUPYTER_CONFIG_PATH, after the folder of the person's role.
"""

import os

from nbgrader.auth import JupyterHubAuthPlugin

c = get_config()  # noqa: F821  (injected by traitlets when nbgrader loads this file)

c.Exchange.root = os.environ.get("LORA_EXCHANGE", "/srv/nbgrader/exchange")
# Assignments land in ~/lora-course/NN-name/ (nbgrader's layout for hubs that may hold more than one course).
c.Exchange.path_includes_course = True
# The courses a person takes come from the hub's groups: nbgrader-<course> (students), formgrade-<course> (graders).
c.Authenticator.plugin_class = JupyterHubAuthPlugin
