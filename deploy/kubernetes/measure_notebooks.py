"""What one student's kernel needs: each solved notebook run at full size, as a student runs it, measured.

    python deploy/kubernetes/measure_notebooks.py [--threads 2] [--out deploy/kubernetes/measured.json] [NN-name ...]

Each notebook of solutions/ runs in its own process (nbclient: a fresh python3 kernel, every cell in order, in the
notebook's folder, outputs discarded) with the kernel's torch threads set to --threads, as the hub sets them
(LORA_THREADS_PER_USER). Recorded: the kernel's peak resident memory (getrusage of the finished kernel), its CPU
seconds, the wall time. deploy/kubernetes/README.md sizes a student's pod from these numbers; measured.json holds them,
the machine they were measured on, and the date of each (naming notebooks updates their entries only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_one(path: Path, threads: int) -> dict:
    """In this process: execute the notebook, then read what its (finished) kernel used."""
    import nbformat
    import psutil
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    # the kernel inherits this process's environment
    os.environ.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
                       "TQDM_DISABLE": "1"})
    start = time.perf_counter()
    client = NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    seen = {"rss": 0}
    stop = threading.Event()

    def sample():  # the kernel's memory as it runs: what it had reached, should it die
        while not stop.wait(1.0):
            for child in psutil.Process().children(recursive=True):
                try:
                    seen["rss"] = max(seen["rss"], child.memory_info().rss)
                except psutil.Error:
                    pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        client.execute()
    except Exception as e:
        raise SystemExit(f"{path.name}: {type(e).__name__} after {time.perf_counter() - start:.0f} s, the kernel "
                         f"had reached {seen['rss'] / 2**20:.0f} MB") from e
    finally:
        stop.set()
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the kernel, once it has exited and been waited for
    return {"peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "wall_s": round(wall, 1)}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="notebooks (NN-name); default: every one in solutions/")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(run_one(a.one, a.threads)))
        return 0
    names = a.names or sorted(q.parent.name for q in (ROOT / "solutions").glob("*/*.ipynb") if q.stem == q.parent.name)
    results, failed = {}, []
    for name in names:
        path = ROOT / "solutions" / name / f"{name}.ipynb"
        done = subprocess.run([sys.executable, __file__, "--one", str(path), "--threads", str(a.threads)],
                              capture_output=True, text=True, cwd=path.parent)
        if done.returncode != 0:
            failed.append(name)
            print(f"{name} failed:\n{done.stderr[-3000:]}", file=sys.stderr, flush=True)
            continue
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name:<32} {results[name]['peak_rss_mb']:>8.0f} MB peak  {results[name]['cpu_s']:>7.0f} s CPU  "
              f"{results[name]['wall_s']:>7.0f} s", flush=True)
    import torch

    machine = {"threads": a.threads, "python": platform.python_version(), "torch": torch.__version__,
               "cpu": _cpu_model(), "cores": os.cpu_count()}
    if a.out:  # notebooks named on the command line update their entries of an existing file
        report = json.loads(a.out.read_text()) if a.names and a.out.is_file() else {**machine, "notebooks": {}}
        differs = {k: (report.get(k), v) for k, v in machine.items() if report.get(k) != v}
        if differs:
            sys.exit(f"{a.out} was measured on another machine or setup {differs}: measure every notebook again")
        today = date.today().isoformat()
        report["notebooks"].update({name: {**r, "date": today} for name, r in results.items()})
        report["notebooks"] = dict(sorted(report["notebooks"].items()))
        a.out.write_text(json.dumps(report, indent=1) + "\n")
    return 1 if failed else 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
