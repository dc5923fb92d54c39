"""Wall time and peak resident memory of the demo (`make demo`'s training command).

Runs the demo's command in a child process with progress bars off and records
the child's peak resident set size (getrusage of the children) and its wall
time in benchmarks/results/demo.{json,md}. Run it on a quiet machine: the time
is absolute, so it only says whether the demo fits its 3-minute budget here.

  python benchmarks/measure_demo.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtl.io import atomic_write, write_json  # noqa: E402

DEMO_ARGS = ["scripts/train_multimnist.py", "--single-task-baselines", "--overwrite", "--no-progress"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"), help="where demo.json/md go")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as run_dir:
        command = [sys.executable, *DEMO_ARGS, "--out", run_dir]
        start = time.perf_counter()
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
    if result.returncode != 0:
        print(result.stderr[-3000:], file=sys.stderr)
        return result.returncode
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    table = result.stdout.split("\nrun folder:")[0].strip()
    figures = {
        "wall_s": round(wall, 1), "peak_rss_mib": round(peak_mib, 1), "budget_s": 180,
        "command": shlex.join(["python", *DEMO_ARGS, "--out", "RUN_DIR"]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "table": table,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "demo.json", figures)
    md = (f"# `make demo`: time and memory\n\n| wall time (s) | budget (s) | peak resident memory (MiB) |\n"
          f"|---:|---:|---:|\n| {figures['wall_s']} | 180 | {figures['peak_rss_mib']} |\n\n"
          f"{figures['date']}, {figures['machine']['platform']}, {figures['machine']['cpus']} CPUs. "
          f"Command: `{figures['command']}`\n\nIts output:\n\n```\n{table}\n```\n")
    atomic_write(out / "demo.md", lambda f: f.write(md), mode="w")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
