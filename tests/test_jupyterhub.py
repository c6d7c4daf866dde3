"""A class on JupyterHub, end to end on loopback (deploy/jupyterhub/): the real parts, one instructor, three students.

JupyterHub (pinned in pyproject.toml, from PyPI), configurable-http-proxy (pinned by
deploy/jupyterhub/proxy/package-lock.json, installed here from npm into .cache/), nbgrader's filesystem exchange and
local accounts made for the run: an instructor, three students and the grader. deploy/jupyterhub/jupyterhub_config.py
runs unchanged; its LORA_* settings point it at a scratch folder and free loopback ports, and a wrapper config adds
only an API token for this test (start servers, make each person's token).

The instructor releases notebook 03 from the formgrader; the students' servers are started through the Hub's REST
API; through their own servers (nbgrader's Assignment List) the students fetch, write and submit: one solved, one
blank, one hostile (it edits a test cell and patches torch.allclose, tests/hostile.py). The instructor collects from
the formgrader, runs the course's autograde and feedback as the grader account with the grader service's own
environment (what a terminal of the formgrader's JupyterLab runs), releases the feedback from the formgrader, and
each student fetches theirs. Expected: full marks, 0 and 0; feedback with no line of the hidden tests; nothing in a
student's folder overwritten; the hub, the proxy and every server stopped at the end.

Skips, saying which, where local accounts cannot be made (not root, no useradd) or npm cannot install the proxy;
LORAKIT_REQUIRE_HUB_TEST=1 (set by .ci/run) makes those a failure instead. Marked `jupyterhub`:
`pytest -m jupyterhub` runs it alone, `-m "not jupyterhub"` leaves it out. About 1.5 minutes on 2 idle cores.
LORAKIT_KEEP_HUB_FILES=1 keeps the scratch folder (the hub's log, everyone's home) for a look after a failure.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import psutil
import pytest
import requests
from hostile import cases
from notebook_tools import ROOT
from test_grading import hidden_lines, text_of

pytestmark = pytest.mark.jupyterhub

NB = "03-lora-from-scratch"
COURSE = "lora-course"  # the course id of nbgrader_config.py, and the grader service's name
DEPLOY = ROOT / "deploy" / "jupyterhub"
PROXY_LOCK = DEPLOY / "proxy"
PROXY_DIR = ROOT / ".cache" / "configurable-http-proxy"
PROXY_VERSION = json.loads((PROXY_LOCK / "package.json").read_text())["dependencies"]["configurable-http-proxy"]
MARK = "lorakit tests/test_jupyterhub.py"  # the comment of every account this test makes (stale ones are removed)
TEST_SERVICE = "lkt-test"


# ------------------------------------------------------------------------------------------------ preconditions

def unavailable(reason: str):
    if os.environ.get("LORAKIT_REQUIRE_HUB_TEST") == "1":
        pytest.fail(f"LORAKIT_REQUIRE_HUB_TEST=1, but {reason}")
    pytest.skip(reason)


def run(args, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, timeout=timeout, capture_output=True, text=True, **kwargs)


def proxy_command() -> Path:
    """configurable-http-proxy, exactly as deploy/jupyterhub/proxy/package-lock.json pins it, installed by `npm ci`
    into .cache/configurable-http-proxy/ (once; again when the lock file changes)."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if not (npm and node):
        unavailable("npm unreachable: no `npm`/`node` on PATH to install configurable-http-proxy "
                    "(Debian: apt-get install nodejs npm)")
    lock = (PROXY_LOCK / "package-lock.json").read_bytes()
    stamp = PROXY_DIR / ".installed-lock.sha256"
    binary = PROXY_DIR / "node_modules" / ".bin" / "configurable-http-proxy"
    if not (binary.exists() and stamp.exists() and stamp.read_text() == hashlib.sha256(lock).hexdigest()):
        shutil.rmtree(PROXY_DIR, ignore_errors=True)
        PROXY_DIR.mkdir(parents=True)
        for name in ("package.json", "package-lock.json"):
            shutil.copyfile(PROXY_LOCK / name, PROXY_DIR / name)
        try:
            done = run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error",
                        "--fetch-timeout=30000", "--fetch-retries=1"], timeout=300, cwd=PROXY_DIR)
        except subprocess.TimeoutExpired:
            unavailable("npm unreachable: `npm ci` of configurable-http-proxy did not finish in 300 s")
        if done.returncode != 0:
            unavailable(f"npm unreachable: `npm ci` of configurable-http-proxy {PROXY_VERSION} failed:\n"
                        f"{done.stderr[-1500:]}")
        stamp.write_text(hashlib.sha256(lock).hexdigest())
    version = run([str(binary), "--version"], timeout=60)
    assert version.stdout.strip() == PROXY_VERSION, (version.stdout, version.stderr, run([node, "--version"], 10))
    return binary


def can_make_accounts() -> None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        unavailable("local users cannot be created: not root (the hub spawns each person's server as their own "
                    "local account, made for the run with useradd)")
    for tool in ("useradd", "userdel"):
        if not shutil.which(tool):
            unavailable(f"local users cannot be created: no `{tool}` on this machine")


# ------------------------------------------------------------------------------------------- accounts, files

def account(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def kill_processes_of(uids: set[int]) -> list[str]:
    """Kill every process owned by these accounts; returns what was still running."""
    left = []
    for proc in psutil.process_iter(["pid", "uids", "cmdline"]):
        try:
            if proc.info["uids"] and proc.info["uids"].real in uids:
                left.append(f"{proc.info['pid']} {' '.join(proc.info['cmdline'] or [])[:120]}")
                proc.kill()
        except psutil.Error:
            pass
    return left


def remove_account(name: str) -> None:
    user = account(name)
    if user is None:
        return
    kill_processes_of({user.pw_uid})
    time.sleep(0.2)
    for path in Path(tempfile.gettempdir()).iterdir():  # what its processes left in /tmp (torch's torchinductor_NAME)
        if path.lstat().st_uid != user.pw_uid:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    run(["userdel", "--remove", name], timeout=60)
    assert account(name) is None, f"could not remove the test account {name}"


def remove_stale_accounts() -> None:
    """Accounts left by an earlier run of this test that was killed before its clean-up."""
    for user in pwd.getpwall():
        if user.pw_gecos == MARK:
            remove_account(user.pw_name)


def add_account(name: str, home: Path) -> pwd.struct_passwd:
    done = run(["useradd", "--create-home", "--home-dir", str(home), "--shell", "/usr/sbin/nologin",
                "--comment", MARK, "--user-group", name], timeout=60)
    assert done.returncode == 0, f"useradd {name}: {done.stderr}"
    home.chmod(0o700)  # Debian's useradd leaves homes readable by all (UMASK 022)
    return pwd.getpwnam(name)


def chown_tree(path: Path, user: pwd.struct_passwd) -> None:
    for p in [path, *path.rglob("*")]:
        os.chown(p, user.pw_uid, user.pw_gid, follow_symlinks=False)


def files_under(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file below `folder` (read as root)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and ".ipynb_checkpoints" not in p.parts}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------ the course environment

def course_environment(tmp: Path) -> tuple[Path, dict[str, str], str]:
    """The environment every server runs: this test's own venv where every account can run it; else (its Python
    lives where other accounts cannot read, such as /root/.pyenv) a copy of the same interpreter (binary,
    libpython, standard library) in the scratch folder, with a venv-shaped folder whose lib/, share/ and etc/ link to
    this venv's: the same packages, nothing installed. Returns (prefix, extra environment, what was done)."""
    venv = Path(sys.prefix)
    try:
        probe = run([str(venv / "bin" / "python"), "-c", "import jupyterhub.singleuser, nbgrader, lorakit"],
                    timeout=120, user=65534, group=65534, extra_groups=[],  # nobody
                    env={"PATH": "/usr/bin:/bin", "HOME": "/"}, cwd="/")
        refused = probe.stderr.strip()[-160:] if probe.returncode else ""
    except PermissionError as e:
        refused = str(e)
    if not refused:
        return venv, {}, f"the course venv {venv}, which every account can run"
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    base, copy, env = Path(sys.base_prefix), tmp / "python", tmp / "env"
    (copy / "bin").mkdir(parents=True)
    (copy / "lib").mkdir()
    shutil.copy2(base / "bin" / version, copy / "bin" / version)
    for lib in (base / "lib").glob("libpython*.so*"):
        shutil.copy2(lib, copy / "lib" / lib.name)
    skip = {"site-packages", "test", "idlelib", "tkinter", "turtledemo"}
    shutil.copytree(base / "lib" / version, copy / "lib" / version, symlinks=True,
                    ignore=lambda folder, names: [n for n in names if Path(folder) == base / "lib" / version and (
                        n in skip or n.startswith("config-"))])
    (env / "bin").mkdir(parents=True)
    (env / "pyvenv.cfg").write_text(f"home = {copy / 'bin'}\ninclude-system-site-packages = false\n"
                                    f"version = {platform.python_version()}\n")
    for name in ("python", "python3", version):
        (env / "bin" / name).symlink_to(copy / "bin" / version)
    for folder in ("lib", "lib64", "share", "etc", "include"):
        if (venv / folder).exists():
            (env / folder).symlink_to(venv / folder)
    shebangs = {f"#!{venv / 'bin' / name}\n" for name in ("python", "python3", version)}
    for script in (venv / "bin").iterdir():  # console scripts (nbgrader, jupyterhub-singleuser, ...) for the copy
        if script.is_file() and not script.is_symlink():
            text = script.read_bytes()
            first, _, rest = text.partition(b"\n")
            if (first + b"\n").decode(errors="replace") in shebangs:
                (env / "bin" / script.name).write_bytes(f"#!{env / 'bin' / 'python'}\n".encode() + rest)
                (env / "bin" / script.name).chmod(0o755)
    extra = {"LD_LIBRARY_PATH": str(copy / "lib")}
    return env, extra, (f"{venv}'s Python is not readable by other accounts ({refused}): the "
                        f"servers run a copy of the same interpreter in {env}, with {venv}'s packages")


def model_cache(tmp: Path) -> tuple[dict[str, str], str]:
    """SmolLM2's checkpoint for the accounts: in place where they can read it (lorakit.models writes it with the
    umask's mode); else (a checkpoint converted before it did, or under a private umask) a readable copy in the scratch
    folder, named by LORAKIT_CACHE."""
    from lorakit.models import cache_dir, checkpoint_dir

    files = [p for p in checkpoint_dir().rglob("*") if p.is_file()]
    assert files, f"no converted model in {checkpoint_dir()}: run `make setup`"
    private = [p.name for p in files if not p.stat().st_mode & stat.S_IROTH]
    private += [str(d) for d in checkpoint_dir().resolve().parents if not d.stat().st_mode & stat.S_IXOTH]
    if not private:
        return {}, f"the model in {checkpoint_dir()}"
    copy = tmp / "cache"
    for folder in ("smollm2-135m-instruct", "native"):
        if (cache_dir() / folder).is_dir():
            shutil.copytree(cache_dir() / folder, copy / folder)
    for p in [copy, *copy.rglob("*")]:
        p.chmod(0o755 if p.is_dir() or p.suffix == ".so" else 0o644)
    return {"LORAKIT_CACHE": str(copy)}, (f"{checkpoint_dir()} holds files, or lies in folders, only their owner "
                                          f"may read ({private}): "
                                          f"the accounts read a copy in {copy}")


# ------------------------------------------------------------------------------------------------- HTTP

class Client:
    """One person's (or the test's) requests through the proxy, as a browser would: token header, xsrf cookie."""

    def __init__(self, base: str, token: str):
        self.base, self.http = base, requests.Session()
        self.http.trust_env = False  # loopback only: never a proxy from the environment
        self.http.headers["Authorization"] = f"token {token}"

    def request(self, method: str, path: str, expect=(200,), timeout: float = 60, **kwargs) -> requests.Response:
        # each server sets its own _xsrf cookie, for its own path
        xsrf = [c for c in self.http.cookies if c.name == "_xsrf" and path.startswith(c.path or "/")]
        xsrf = max(xsrf, key=lambda c: len(c.path or "/"), default=None)
        headers = {"X-XSRFToken": xsrf.value} if xsrf and method != "GET" else {}
        r = self.http.request(method, self.base + path, timeout=timeout, headers=headers, allow_redirects=False,
                              **kwargs)
        assert r.status_code in expect, f"{method} {path}: {r.status_code} {r.text[:800]}"
        return r

    def json(self, method: str, path: str, **kwargs):
        return self.request(method, path, **kwargs).json()


class MemorySampler:
    """The largest total resident memory of one account's processes, and of one of them, sampled every 0.25 s."""

    def __init__(self, uid: int):
        import threading

        self.uid, self.total, self.single = uid, 0, 0
        self.stop, self.thread = threading.Event(), threading.Thread(target=self.sample, daemon=True)

    def sample(self):
        while not self.stop.wait(0.25):
            sizes = []
            for proc in psutil.process_iter(["uids", "memory_info"]):
                if proc.info["uids"] and proc.info["uids"].real == self.uid and proc.info["memory_info"]:
                    sizes.append(proc.info["memory_info"].rss)
            self.total, self.single = max(self.total, sum(sizes)), max([self.single, *sizes])

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=10)

    @property
    def peaks(self) -> dict[str, int]:
        return {"all processes": round(self.total / 2**20), "largest process": round(self.single / 2**20)}


def wait_for(what: str, timeout: float, check, log: Path | None = None):
    """Poll `check` (None or False: not yet) for at most `timeout` seconds."""
    end, last = time.monotonic() + timeout, None
    while time.monotonic() < end:
        try:
            result = check()
            if result:
                return result
        except (requests.RequestException, AssertionError, KeyError) as e:
            last = e
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
    raise AssertionError(f"{what}: not within {timeout:.0f} s (last: {last})\n--- hub log ---\n{tail}")


# ----------------------------------------------------------------------------------------------- submissions

def submissions() -> dict[str, tuple[str | None, float]]:
    """Each student's notebook (None: the fetched one, unchanged) and the score it must get."""
    built = cases(NB)
    hostile = nbformat.reads(built["patched_quietly"][0], as_version=4)  # look-alike answers, torch.allclose patched
    for cell in hostile.cells:  # ... and a test cell edited
        if cell.metadata.get("nbgrader", {}).get("grade"):
            cell.source = 'print("all tests passed")'
            break
    return {"solved": (built["solved"][0], built["solved"][1]),
            "blank": (None, built["blank"][1]),
            "hostile": (nbformat.writes(hostile), 0)}


# --------------------------------------------------------------------------------------------- the scenario

@pytest.fixture(scope="module")
def hub_class():
    """Runs the whole class once; the tests below read what it observed."""
    can_make_accounts()
    proxy = proxy_command()
    remove_stale_accounts()
    started = time.monotonic()
    timings, seen = {}, {"proxy": str(proxy)}

    def lap(name):
        timings[name] = round(time.monotonic() - started, 1)

    tmp = Path(tempfile.mkdtemp(prefix="lkt-hub-"))
    tmp.chmod(0o755)  # the accounts' homes are below it
    suffix = secrets.token_hex(3)
    instructor, grader = f"lkt{suffix}i", f"lkt{suffix}g"
    students = {role: f"lkt{suffix}{role[0]}" for role in ("solved", "blank", "hostile")}
    names = [instructor, grader, *students.values()]
    hub = None
    try:
        prefix, extra_env, how = course_environment(tmp)
        cache_env, cache_how = model_cache(tmp)
        extra_env.update(cache_env)
        seen["environment"] = f"{how}\n{cache_how}"
        users = {name: add_account(name, tmp / "home" / name) for name in names}
        grader_home = Path(users[grader].pw_dir)
        course_dir = grader_home / COURSE  # the grader's copy of the course: config, the source and student version
        course_dir.mkdir()
        shutil.copyfile(ROOT / "nbgrader_config.py", course_dir / "nbgrader_config.py")
        for folder in ("solutions", "notebooks"):
            shutil.copytree(ROOT / folder / NB, course_dir / folder / NB,
                            ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
        chown_tree(course_dir, users[grader])
        state, exchange = tmp / "state", tmp / "exchange"
        roster = tmp / "roster.txt"
        roster.write_text(f"instructor {instructor}\n" + "".join(f"student {s}\n" for s in students.values()))
        token = secrets.token_hex(32)
        state.mkdir(mode=0o700)
        wrapper = state / "test_config.py"
        wrapper.write_text(
            "c = get_config()  # noqa: F821\n"
            f"load_subconfig({str(DEPLOY / 'jupyterhub_config.py')!r})  # noqa: F821\n"
            "# this test's own token: start servers, make each person's token\n"
            f"c.JupyterHub.services.append({{'name': {TEST_SERVICE!r}, 'api_token': {token!r}}})\n"
            f"c.JupyterHub.load_roles.append({{'name': {TEST_SERVICE!r}, 'services': [{TEST_SERVICE!r}], "
            "'scopes': ['tokens', 'admin:servers', 'read:users', 'list:users']})\n")
        port, api_port, proxy_port, grader_port = (free_port() for _ in range(4))
        hub_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "LORA_"))},
            **extra_env,
            "LORA_COURSE_ENV": str(prefix), "LORA_EXCHANGE": str(exchange), "LORA_STATE_DIR": str(state),
            "LORA_ROSTER": str(roster), "LORA_GRADER_USER": grader, "LORA_PROXY_COMMAND": str(proxy),
            "LORA_PUBLIC_URL": f"http://127.0.0.1:{port}", "LORA_HUB_API_URL": f"http://127.0.0.1:{api_port}",
            "LORA_PROXY_API_URL": f"http://127.0.0.1:{proxy_port}",
            "LORA_GRADER_URL": f"http://127.0.0.1:{grader_port}",
        }
        log = state / "hub.log"
        with log.open("w") as out:
            hub = subprocess.Popen([str(Path(sys.prefix) / "bin" / "jupyterhub"), "-f", str(wrapper)], cwd=state,
                                   env=hub_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        admin = Client(base, token)

        def hub_answers():
            if hub.poll() is not None:
                raise RuntimeError(f"the hub exited with {hub.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
            return admin.json("GET", "/hub/api/")

        info = wait_for("the hub answers", 90, hub_answers, log)
        seen["hub_version"] = info["version"]
        seen["proxy_pid"] = int((state / "jupyterhub-proxy.pid").read_text())
        lap("hub up")

        # each person's token, and every server started through the REST API
        tokens = {name: admin.json("POST", f"/hub/api/users/{name}/tokens", expect=(201,),
                                   json={"note": "test_jupyterhub", "expires_in": 1800})["token"]
                  for name in [instructor, *students.values()]}
        for name in tokens:
            admin.request("POST", f"/hub/api/users/{name}/server", expect=(201, 202))
        for name in tokens:
            wait_for(f"{name}'s server is ready", 180, lambda n=name: admin.json("GET", f"/hub/api/users/{n}")[
                "servers"][""]["ready"], log)
        people = {name: Client(base, tok) for name, tok in tokens.items()}
        teacher = people[instructor]
        formgrader = f"/services/{COURSE}/formgrader"
        wait_for("the formgrader answers", 120, lambda: teacher.json("GET", f"{formgrader}/api/status")["status"], log)
        lap("servers and formgrader up")

        # who may see what: the formgrader for instructors only, framed by the hub's own pages only
        page = teacher.request("GET", f"{formgrader}/manage_assignments")
        seen["formgrader_csp"] = page.headers.get("Content-Security-Policy", "")
        one = people[students["solved"]]
        seen["student_formgrader_status"] = one.request("GET", f"{formgrader}/api/status",
                                                        expect=(302, 403, 404)).status_code
        seen["student_server_csp"] = one.request("GET", f"/user/{students['solved']}/api/status").headers.get(
            "Content-Security-Policy", "")
        seen["student_local_formgrader"] = one.request("GET", f"/user/{students['solved']}/formgrader/api/status",
                                                       expect=(200, 404)).status_code
        seen["course_list"] = teacher.json("GET", f"/user/{instructor}/formgraders")
        lab = {who: people[name].request("GET", f"/user/{name}/lab").text
               for who, name in (("student", students["solved"]), ("instructor", instructor))}
        lab["grader"] = teacher.request("GET", f"/services/{COURSE}/lab").text
        seen["lab_disabled"] = {who: list(json.loads(re.search(r'<script id="jupyter-config-data"[^>]*>(.*?)</script>',
                                                               html, re.S).group(1))["disabledExtensions"])
                                for who, html in lab.items()}

        # release from the formgrader
        teacher.request("GET", f"{formgrader}/manage_assignments")  # the formgrader's page sets the xsrf cookie
        released = teacher.json("POST", f"{formgrader}/api/assignment/{NB}/release")
        assert released["success"], released
        lap("released")

        # each student: fetch, write, fetch again (refused), submit, through their own server
        work = submissions()
        folder = f"{COURSE}/{NB}"
        seen["work"] = {}
        for role, name in students.items():
            me = people[name]
            me.request("GET", f"/user/{name}/lab")  # sets the xsrf cookie, as the browser's first page does
            listed = me.json("GET", f"/user/{name}/assignments", params={"course_id": COURSE})
            assert listed["success"] and [a["status"] for a in listed["value"] if a["assignment_id"] == NB] == [
                "released"], listed
            fetched = me.json("POST", f"/user/{name}/assignments/fetch",
                              data={"assignment_id": NB, "course_id": COURSE})
            assert "fetched" in [a["status"] for a in fetched["value"] if a["assignment_id"] == NB], fetched
            text, _ = work[role]
            if text is not None:
                me.request("PUT", f"/user/{name}/api/contents/{folder}/{NB}.ipynb", expect=(200, 201),
                           json={"type": "notebook", "format": "json", "content": json.loads(text)})
            me.request("PUT", f"/user/{name}/api/contents/{folder}/my-notes.txt", expect=(200, 201),
                       json={"type": "file", "format": "text", "content": f"{role}'s own notes\n"})
            home = Path(users[name].pw_dir) / COURSE
            before_refetch = files_under(home)
            me.json("POST", f"/user/{name}/assignments/fetch", data={"assignment_id": NB, "course_id": COURSE})
            seen["work"][role] = {"refetch_kept": files_under(home) == before_refetch}
            submitted = me.json("POST", f"/user/{name}/assignments/submit",
                                data={"assignment_id": NB, "course_id": COURSE})
            assert submitted.get("success", True) and any(
                a["status"] == "submitted" for a in submitted["value"] if a["assignment_id"] == NB), submitted
            seen["work"][role]["files"] = files_under(home)
        lap("fetched and submitted")

        # the exchange keeps students apart, and the grader's folder is the grader's alone
        nobody_else = {"HOME": "/", "PATH": "/usr/bin:/bin"}
        who = users[students["blank"]]
        seen["student_lists_inbound"] = run(["ls", str(exchange / COURSE / "inbound")], timeout=30,
                                            user=who.pw_uid, group=who.pw_gid, extra_groups=[], env=nobody_else,
                                            cwd="/").returncode
        seen["student_reads_solutions"] = run(["cat", str(course_dir / "solutions" / NB / f"{NB}.ipynb")],
                                              timeout=30, user=who.pw_uid, group=who.pw_gid, extra_groups=[],
                                              env=nobody_else, cwd="/").returncode
        seen["exchange_mode"] = oct(stat.S_IMODE(exchange.stat().st_mode))

        # collect from the formgrader; then the course's own autograde and feedback, as the grader account, with the
        # environment of the grader service's processes (what a terminal in the formgrader's JupyterLab has)
        collected = teacher.json("POST", f"{formgrader}/api/assignment/{NB}/collect")
        assert collected["success"], collected
        seen["collected"] = sorted(p.parent.parent.name for p in (course_dir / "submitted").glob(f"*/{NB}/{NB}.ipynb"))
        lap("collected")
        service = [p for p in psutil.process_iter(["uids", "cmdline"]) if p.info["uids"].real == users[grader].pw_uid
                   and any("jupyterhub-singleuser" in part for part in p.info["cmdline"] or [])]
        assert len(service) == 1, service
        grader_env = service[0].environ()
        seen["grader_service_env"] = {k: "<secret>" if "TOKEN" in k else v for k, v in sorted(grader_env.items())
                                      if k.startswith(("JUPYTERHUB_", "JUPYTER_", "LORA_"))}

        def as_grader(*args, timeout):
            proc = subprocess.Popen([str(prefix / "bin" / "python"), "-m", "lorakit.grading", "--root",
                                     str(course_dir), *args], cwd=course_dir, env=grader_env,
                                    user=users[grader].pw_uid, group=users[grader].pw_gid, extra_groups=[],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            try:
                out, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                for child in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
                    child.kill()
                raise AssertionError(f"lorakit.grading {' '.join(args)} did not finish in {timeout} s") from None
            assert proc.returncode == 0, f"lorakit.grading {' '.join(args)}: exit {proc.returncode}\n{out[-4000:]}"
            return out

        with MemorySampler(users[grader].pw_uid) as grading:  # the grader's processes while 2 jobs grade
            seen["autograde"] = as_grader("autograde", NB, "--jobs", "2", "--timeout", "200", timeout=260)
        seen["autograde_mb"] = grading.peaks
        lap("autograded")
        seen["feedback"] = as_grader("feedback", NB, timeout=120)
        seen["submissions"] = {s["student"]: s for s in teacher.json("GET", f"{formgrader}/api/submissions/{NB}")}
        teacher.request("GET", f"{formgrader}/manage_assignments")
        released = teacher.json("POST", f"{formgrader}/api/assignment/{NB}/release_feedback")
        assert released["success"], released
        as_grader("grades", timeout=120)
        with open(course_dir / "autograded" / "grades.csv", newline="") as f:
            seen["grades_csv"] = {r["student_id"]: float(r["raw_score"]) for r in csv.DictReader(f)
                                  if r["assignment"] == NB}
        lap("feedback released")

        # each student fetches their feedback
        for role, name in students.items():
            people[name].json("POST", f"/user/{name}/assignments/fetch_feedback",
                              data={"assignment_id": NB, "course_id": COURSE})
            home = Path(users[name].pw_dir) / COURSE
            seen["work"][role]["after"] = files_under(home)
            seen["work"][role]["feedback"] = {str(p.relative_to(home)): text_of(p)
                                                  for p in (home / NB / "feedback").glob(f"*/{NB}.html")}
        lap("feedback fetched")

        # what each server holds in memory at the end (no kernel running): the sizing in deploy/kubernetes/
        def resident_mb(name):
            procs = [p for p in psutil.process_iter(["uids"]) if p.info["uids"].real == users[name].pw_uid]
            return round(sum(p.memory_info().rss for p in procs) / 2**20)

        seen["server_mb"] = {"student (largest)": max(resident_mb(s) for s in students.values()),
                             "instructor": resident_mb(instructor), "grader service": resident_mb(grader)}

        # the end of the class: stop the hub; it stops every server, the service and the proxy
        watched = {name: users[name].pw_uid for name in names}
        hub.send_signal(signal.SIGTERM)
        try:
            seen["hub_exit"] = hub.wait(timeout=60)
        except subprocess.TimeoutExpired:
            seen["hub_exit"] = "still running 60 s after SIGTERM"
        time.sleep(1)
        seen["left_running"] = [f"{p.pid} {' '.join(p.info['cmdline'] or [])[:100]}" for p in psutil.process_iter(
            ["uids", "cmdline"]) if p.info["uids"] and p.info["uids"].real in set(watched.values())]
        seen["proxy_running"] = psutil.pid_exists(seen["proxy_pid"]) and psutil.Process(
            seen["proxy_pid"]).status() != psutil.STATUS_ZOMBIE
        seen["ports_open"] = [p for p in (port, api_port, proxy_port, grader_port) if _listening(p)]
        lap("stopped")
        seen["timings"] = timings
        seen["log"] = log.read_text(errors="replace")
        yield {"students": students, "instructor": instructor, "expected": {r: s for r, (_, s) in work.items()},
               **seen}
    finally:
        if hub is not None and hub.poll() is None:
            for proc in [*psutil.Process(hub.pid).children(recursive=True), psutil.Process(hub.pid)]:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
            hub.wait(timeout=30)
        if "proxy_pid" in seen and psutil.pid_exists(seen["proxy_pid"]):
            try:
                psutil.Process(seen["proxy_pid"]).kill()
            except psutil.Error:
                pass
        keep = os.environ.get("LORAKIT_KEEP_HUB_FILES") == "1"  # for a look at the hub's log and everyone's files
        for name in names:
            if keep and (tmp / "home" / name).is_dir():
                kill_processes_of({account(name).pw_uid})
                shutil.copytree(tmp / "home" / name, tmp / "kept" / name, symlinks=True)
            remove_account(name)
        if keep:
            print(f"\nkept {tmp} (LORAKIT_KEEP_HUB_FILES=1): the homes in {tmp / 'kept'}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


# ------------------------------------------------------------------------------------------------------- tests

def test_the_pinned_hub_ran_the_class(hub_class):
    from importlib.metadata import version
    assert hub_class["hub_version"] == version("jupyterhub")
    print(f"\n{hub_class['environment']}\nproxy {hub_class['proxy']}\nseconds since the start: {hub_class['timings']}"
          f"\nresident memory of each server at the end, MB: {hub_class['server_mb']}"
          f"\npeak resident memory of the grader account while autograde ran 2 jobs, MB: {hub_class['autograde_mb']}"
          f"\nthe grader service's environment (from the hub): {hub_class['grader_service_env']}")


def test_solved_blank_and_hostile_get_full_marks_zero_and_zero(hub_class):
    expected = {hub_class["students"][role]: score for role, score in hub_class["expected"].items()}
    assert expected[hub_class["students"]["solved"]] > 0
    assert sorted(hub_class["collected"]) == sorted(expected), hub_class["collected"]
    formgrader = {s: row["score"] for s, row in hub_class["submissions"].items()}
    assert formgrader == expected, f"formgrader's scores {formgrader}, expected {expected}\n{hub_class['autograde']}"
    assert hub_class["grades_csv"] == expected, hub_class["grades_csv"]


def test_each_student_gets_feedback_without_hidden_tests(hub_class):
    lines = hidden_lines(NB)
    assert lines, f"{NB} has no hidden tests to look for"
    for role, seen in hub_class["work"].items():
        feedback = seen["feedback"]
        assert len(feedback) == 1, f"{role}: feedback files {sorted(feedback)}"
        (path, text), = feedback.items()
        score = hub_class["expected"][role]
        assert f"{NB} (Score: {score:.1f} / " in text, f"{role}'s feedback does not show the score {score}"
        leaked = [line for line in lines if line in text]
        assert not leaked, f"{role}'s feedback {path} shows hidden tests: {leaked[:3]}"


def test_nothing_in_a_students_folder_is_overwritten(hub_class):
    for role, seen in hub_class["work"].items():
        assert seen["refetch_kept"], f"fetching {NB} again changed {role}'s folder"
        before, after = seen["files"], seen["after"]
        assert f"{NB}/my-notes.txt" in before and f"{NB}/{NB}.ipynb" in before, sorted(before)
        changed = [path for path, digest in before.items() if after.get(path) != digest]
        assert not changed, f"{role}: {changed} changed or gone after the feedback"
        added = sorted(set(after) - set(before))
        assert added and all(path.startswith(f"{NB}/feedback/") for path in added), f"{role}: new files {added}"


def test_the_formgrader_is_for_instructors_and_framed_by_the_hub_only(hub_class):
    assert "frame-ancestors 'self'" in hub_class["formgrader_csp"], hub_class["formgrader_csp"]
    assert "frame-ancestors 'none'" in hub_class["student_server_csp"], hub_class["student_server_csp"]
    assert hub_class["student_formgrader_status"] == 403
    assert hub_class["student_local_formgrader"] == 404, "a student's own server runs the formgrader extension"
    courses = hub_class["course_list"]
    assert courses["success"] and [(c["course_id"], c["kind"]) for c in courses["value"]] == [
        (COURSE, "jupyterhub")], courses
    assert courses["value"][0]["url"].endswith(f"/services/{COURSE}/lab?formgrader=true"), courses
    # JupyterLab's own page config in each server: the nbgrader panels each role has (jupyter/<role>/labconfig/)
    disabled = {who: {name.split(":")[1] for name in names if name.startswith("@jupyter/nbgrader:")}
                for who, names in hub_class["lab_disabled"].items()}
    assert disabled == {"student": {"formgrader", "create-assignment", "course-list"},
                        "instructor": {"formgrader", "create-assignment"},
                        "grader": {"assignment-list", "course-list"}}, disabled


def test_the_exchange_keeps_students_apart(hub_class):
    assert hub_class["exchange_mode"] == "0o1777"
    assert hub_class["student_lists_inbound"] != 0, "a student could list the others' submissions"
    assert hub_class["student_reads_solutions"] != 0, "a student could read the grader's solutions"


def test_the_hub_and_every_server_stopped(hub_class):
    assert hub_class["hub_exit"] == 0, hub_class["hub_exit"]
    assert not hub_class["left_running"], f"still running after the hub stopped: {hub_class['left_running']}"
    assert not hub_class["proxy_running"], "the proxy outlived the hub"
    assert not hub_class["ports_open"], f"ports still listening: {hub_class['ports_open']}"
