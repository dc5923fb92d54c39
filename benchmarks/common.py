"""What every benchmark records beside its figures: the machine and its load."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # not on every platform
        return None


def machine_info(**extra) -> dict:
    """Platform, CPUs, memory, torch and device facts, plus the benchmark's own ``extra`` entries."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = None
    try:
        with open("/proc/meminfo") as f:
            mem_kib = int(next(line for line in f if line.startswith("MemTotal:")).split()[1])
    except (OSError, StopIteration, ValueError):
        mem_kib = None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "memory_gib": round(mem_kib / 2**20, 1) if mem_kib else None,
        "torch": torch.__version__,
        "torch_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        **extra,
    }


def parse_choices(p, flag: str, text: str, allowed) -> list[str]:
    """A comma-separated option as a list of known, unique entries; an argparse error otherwise."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        p.error(f"{flag}: unknown or no entries {bad}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(items))  # unique, in the order given


def ensure_threads(threads: int) -> None:
    """Put torch's thread count back to ``threads`` (0: leave it) if something changed it: all sides equal."""
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def sync(device: torch.device) -> None:
    """Wait for the GPU, so that wall-clock times cover the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def verdict_at_most(value: float, limit: float) -> str:
    return "PASS" if value <= limit else "ABOVE TARGET"


def proc_status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (VmRSS, VmHWM), or None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0
    except OSError:
        return False
    return True


def save_results(out_dir, name: str, result: dict, write_markdown: Callable[[Path, dict], None]) -> Path:
    """``result`` as ``<out_dir>/<name>.json`` and, through ``write_markdown``, ``<name>.md`` (atomic writes)."""
    from mtl.io import write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{name}.json", result)
    write_markdown(out / f"{name}.md", result)
    return out


# ----- peer libraries, installed into the benchmarks' own ignored folder -----------------------------

CHECKOUT = Path(__file__).resolve().parents[1]


def shown_path(path: Path) -> str:
    """``path`` relative to the checkout when inside it (results files name no machine's folders)."""
    target = Path(path).resolve()
    return str(target.relative_to(CHECKOUT) if target.is_relative_to(CHECKOUT) else target)


def pip_target_command(peer_dir: Path, requirements, python: str = "python") -> list[str]:
    """pip into ``peer_dir`` without dependencies (never into the project's environment)."""
    return [python, "-m", "pip", "install", "--target", shown_path(peer_dir), "--no-deps", *requirements]


def install_into(peer_dir: Path, requirements, what: str) -> bool:
    """Run ``pip_target_command`` with this interpreter from the checkout; True when pip succeeded."""
    cmd = pip_target_command(peer_dir, requirements, sys.executable)
    print(f"installing {what} (run in {CHECKOUT}): {shlex.join(cmd)}", flush=True)
    return subprocess.run(cmd, cwd=CHECKOUT).returncode == 0
