"""JupyterHub for one class of the LoRA course on one server (deploy/jupyterhub/README.md).

Students and instructors are local accounts (PAM); every server runs the course's pinned environment; assignments
move through nbgrader's filesystem exchange; the formgrader runs as a hub service named after the course, under a
grader account that owns the course folder (solutions, gradebook). tests/test_jupyterhub.py runs this file, unchanged,
end to end on loopback.

Start it as root:   jupyterhub -f /opt/lora-course/deploy/jupyterhub/jupyterhub_config.py
Settings: the defaults below, or the LORA_* variables in the hub's environment (the test sets them).
"""

import os
import pwd
import stat
import sys
from pathlib import Path

c = get_config()  # noqa: F821  (injected by traitlets when JupyterHub loads this file)

HERE = Path(__file__).resolve().parent
# The service's name must be the course id of the course's nbgrader_config.py (c.CourseDirectory.course_id).
COURSE = "lora-course"


def setting(name: str, default: str) -> str:
    return os.environ.get(f"LORA_{name}", default)


# The course environment every server runs: `make setup` in a copy of the *student bundle* (make student-bundle), so
# that no student can read a solution through it. Every account must be able to read it (not under /root).
ENV = Path(setting("COURSE_ENV", "/opt/lora-course/.venv"))
# nbgrader's filesystem exchange: created here with mode 1777 (anyone may add, nobody may remove another's entries).
EXCHANGE = Path(setting("EXCHANGE", "/srv/nbgrader/exchange"))
# The hub's database, cookie secret and proxy pid file (root only).
STATE = Path(setting("STATE_DIR", "/srv/jupyterhub"))
# One line a person, "instructor NAME" or "student NAME" (roster.example.txt); each NAME a local account.
ROSTER = Path(setting("ROSTER", str(HERE / "roster.txt")))
# The account the formgrader runs as, and its copy of the course (a clone of the private course repository).
GRADER = setting("GRADER_USER", f"grader-{COURSE}")
# The addresses: the public one (behind TLS termination in production), and loopback for the hub's API, the proxy's
# API and the grader service.
PUBLIC_URL = setting("PUBLIC_URL", "http://:8000")
HUB_API_URL = setting("HUB_API_URL", "http://127.0.0.1:8081")
PROXY_API_URL = setting("PROXY_API_URL", "http://127.0.0.1:8001")
GRADER_URL = setting("GRADER_URL", "http://127.0.0.1:9999")
PROXY_COMMAND = setting("PROXY_COMMAND", str(HERE / "proxy" / "node_modules" / ".bin" / "configurable-http-proxy"))
# torch threads per kernel: each student's kernel would otherwise use every core of the server.
THREADS = setting("THREADS_PER_USER", "2")


def fail(message: str) -> None:
    sys.exit(f"deploy/jupyterhub/jupyterhub_config.py: {message}")


def read_roster(path: Path) -> tuple[list[str], list[str]]:
    if not path.is_file():
        fail(f"no roster at {path}: copy {HERE / 'roster.example.txt'} there and list the class in it")
    people = {"instructor": [], "student": []}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        words = line.split("#")[0].split()
        if not words:
            continue
        if len(words) != 2 or words[0] not in people:
            fail(f"{path}:{number}: expected 'instructor NAME' or 'student NAME', got {line!r}")
        people[words[0]].append(words[1])
    both = set(people["instructor"]) & set(people["student"])
    if both:
        fail(f"{path}: {sorted(both)} listed as instructor and as student")
    return people["instructor"], people["student"]


def readable_by_all(path: Path, run: bool = False) -> Path | None:
    """The first folder on the way to `path` (symbolic links followed) that other accounts cannot enter, or `path`
    itself if they cannot read it (or, with `run`, run it); None when they can."""
    path = path.resolve()
    for folder in reversed(path.parents):
        if not folder.stat().st_mode & stat.S_IXOTH:
            return folder
    mode = path.stat().st_mode
    return None if mode & stat.S_IROTH and (mode & stat.S_IXOTH or not run) else path


def has_account(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


INSTRUCTORS, STUDENTS = read_roster(ROSTER)
missing = [name for name in [*INSTRUCTORS, *STUDENTS, GRADER] if not has_account(name)]
if missing:
    fail(f"no local account for {missing}: create each with `useradd -m -K HOME_MODE=0700 NAME` (README.md)")
GRADER_HOME = Path(pwd.getpwnam(GRADER).pw_dir)
COURSE_DIR = Path(setting("COURSE_DIR", str(GRADER_HOME / COURSE)))
if not (COURSE_DIR / "nbgrader_config.py").is_file():
    fail(f"{COURSE_DIR} holds no nbgrader_config.py: clone the course there as {GRADER} (README.md)")
if not COURSE_DIR.resolve().is_relative_to(GRADER_HOME.resolve()):
    fail(f"the course folder {COURSE_DIR} must lie inside {GRADER}'s home {GRADER_HOME} (the formgrader's root)")
if GRADER_HOME.stat().st_mode & 0o077:
    fail(f"{GRADER_HOME} holds the solutions and the gradebook: `chmod 700 {GRADER_HOME}`")
singleuser = ENV / "bin" / "jupyterhub-singleuser"
if not singleuser.is_file():
    fail(f"no {singleuser}: build the course environment with `make setup` in the student bundle (README.md)")
for program in (ENV / "bin" / "python", singleuser):
    blocked = readable_by_all(program, run=True)
    if blocked:
        fail(f"other accounts cannot reach {program}: {blocked} is not readable by all (put the environment in "
             "a folder every account can read, such as /opt/lora-course)")
# SmolLM2's converted checkpoint (lorakit.models): $LORAKIT_CACHE, else the .cache/ of the course folder holding ENV.
MODEL_CACHE = Path(os.environ["LORAKIT_CACHE"]) if os.environ.get("LORAKIT_CACHE") else (
    ENV.parent / ".cache" if (ENV.parent / "pyproject.toml").is_file() else None)
if MODEL_CACHE is not None:
    weights = MODEL_CACHE / "smollm2-135m-instruct" / "model.safetensors"
    if not weights.is_file():
        fail(f"no {weights}: run `make setup` in {ENV.parent} (it converts the model once)")
    blocked = readable_by_all(weights)
    if blocked:
        fail(f"other accounts cannot read {weights} ({blocked} is private): `chmod -R a+rX {MODEL_CACHE}`")
if not Path(PROXY_COMMAND).is_file():
    fail(f"no proxy at {PROXY_COMMAND}: `npm ci` in {HERE / 'proxy'} (README.md)")
STATE.mkdir(mode=0o700, parents=True, exist_ok=True)
EXCHANGE.mkdir(parents=True, exist_ok=True)
if stat.S_IMODE(EXCHANGE.stat().st_mode) != 0o1777:
    EXCHANGE.chmod(0o1777)

# ---------------------------------------------------------------------------------------------- the hub and proxy
c.JupyterHub.bind_url = PUBLIC_URL
c.JupyterHub.hub_bind_url = HUB_API_URL
c.JupyterHub.db_url = f"sqlite:///{STATE / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(STATE / "jupyterhub_cookie_secret")
c.ConfigurableHTTPProxy.api_url = PROXY_API_URL
c.ConfigurableHTTPProxy.command = [PROXY_COMMAND]
c.ConfigurableHTTPProxy.pid_file = str(STATE / "jupyterhub-proxy.pid")

# ------------------------------------------------------------------------------------------- people and groups
c.JupyterHub.authenticator_class = "pam"
c.Authenticator.allowed_users = set(INSTRUCTORS + STUDENTS)
c.Authenticator.admin_users = set()  # nobody needs the admin role: the roles below give what each person needs
# nbgrader's JupyterHubAuthPlugin reads these groups: formgrade-<course> may grade, nbgrader-<course> takes the course.
c.JupyterHub.load_groups = {f"formgrade-{COURSE}": INSTRUCTORS, f"nbgrader-{COURSE}": STUDENTS}
c.JupyterHub.load_roles = [
    {
        "name": f"formgrade-{COURSE}",
        "description": "open the formgrader, and find it from the Course List",
        "groups": [f"formgrade-{COURSE}"],
        "scopes": [f"access:services!service={COURSE}", "list:services", f"read:services!service={COURSE}"],
    },
]

# ------------------------------------------------------------------------------------------------ user servers
COMMON_ENV = {
    "PATH": f"{ENV / 'bin'}:/usr/local/bin:/usr/bin:/bin",
    "LORA_EXCHANGE": str(EXCHANGE),  # read by jupyter/common/nbgrader_config.py
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": THREADS,
    "MKL_NUM_THREADS": THREADS,
    "JUPYTERHUB_DEFAULT_URL": "/lab",
}
# Passed on from the hub's environment when set: the model cache when it is not the environment's own .cache/, and
# the loader's path for a Python built with a shared libpython outside the default one.
COMMON_ENV.update({k: os.environ[k] for k in ("LORAKIT_CACHE", "LD_LIBRARY_PATH") if os.environ.get(k)})


def config_path(role: str) -> str:
    """JUPYTER_CONFIG_PATH of a role: its folder (which nbgrader extensions it runs), then what every role shares."""
    return os.pathsep.join(str(HERE / "jupyter" / folder) for folder in (role, "common"))


c.Spawner.cmd = [str(singleuser)]
c.Spawner.default_url = "/lab"
c.Spawner.environment = {
    **COMMON_ENV,
    "JUPYTER_CONFIG_PATH": lambda spawner: config_path(
        "instructor" if spawner.user.name in INSTRUCTORS else "student"),
}
# $JUPYTERHUB_API_TOKEN of each server: what nbgrader needs from the hub (the person's own groups; the formgrader
# service for the Course List), intersected with what the person holds.
c.Spawner.server_token_scopes = [
    "users:activity!user",
    "access:servers!server",
    "read:users:name!user",
    "read:users:groups!user",
    "list:services",
    f"read:services!service={COURSE}",
]
c.Spawner.http_timeout = 120
c.Spawner.start_timeout = 180

# ------------------------------------------------------------------------------------------------- the grader
# The formgrader: a JupyterLab server as the grader account, in its home, reached at /services/<course>/ by the
# formgrade-<course> group. JupyterHub 4.1 and later forbid framing (CSP frame-ancestors 'none'); the formgrader shows
# in an iframe of that JupyterLab, so the grader's own config (jupyter/grader/jupyter_server_config.json) allows
# frame-ancestors 'self' for this service only (README.md: what that allows, and subdomains).
c.JupyterHub.services = [
    {
        "name": COURSE,
        "display": True,
        "info": {"description": "formgrader: release, collect, grade, feedback"},
        "url": GRADER_URL,
        "command": [str(singleuser)],
        "user": GRADER,
        "cwd": str(GRADER_HOME),
        "oauth_no_confirm": True,
        "environment": {**COMMON_ENV, "JUPYTER_CONFIG_PATH": config_path("grader"), "LORA_COURSE_DIR": str(COURSE_DIR)},
    },
]
