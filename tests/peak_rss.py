"""The one way the tests and benchmarks measure a run's peak resident set: the process's own VmHWM, printed by the
process itself (PEAK_RSS_RUN runs the smile CLI so; measured_run runs such a command). Measurement only: it is not
part of the package (benchmarks put tests/ on their path, as they do for synthetic_family.py).
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import time
from pathlib import Path

# A process's own peak is its VmHWM. Not a child's ru_maxrss (/usr/bin/time, wait4): Linux carries a parent's peak
# RSS over fork and exec into the child's ru_maxrss, so a child of a test or benchmark process that built families
# and serves files would report that process's peak, not its own.
PEAK_RSS_MARK = "PEAK_RSS"


def peak_rss() -> int:
    """This process's peak resident set so far, in bytes (VmHWM of /proc/self/status; Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("/proc/self/status has no VmHWM")


def print_peak_rss() -> None:
    """The line read_peak_rss reads back, on stderr: a process that measures itself prints it last."""
    print(PEAK_RSS_MARK, peak_rss(), file=sys.stderr, flush=True)


# `python -c PEAK_RSS_RUN ARGV...` runs the smile CLI with ARGV, then prints "PEAK_RSS <bytes>" on stderr: the two
# functions above, then the CLI (the child needs only smile_cli on its path, whichever source tree that is).
PEAK_RSS_RUN = "\n".join(
    [
        "import sys",
        "from pathlib import Path",
        f"PEAK_RSS_MARK = {PEAK_RSS_MARK!r}",
        inspect.getsource(peak_rss),
        inspect.getsource(print_peak_rss),
        "from smile_cli.cli import run",
        "code = run(sys.argv[1:])",
        "print_peak_rss()",
        "sys.exit(code)",
    ]
)


def read_peak_rss(stderr: str) -> int | None:
    """Bytes: the last peak RSS a process printed with print_peak_rss; None if it printed none."""
    if PEAK_RSS_MARK not in stderr:
        return None
    return int(stderr.split(PEAK_RSS_MARK)[-1].split()[0])


def measured_run(command: list[str], env: dict | None = None, timeout: float | None = None) -> dict:
    """Run command (a process that prints its own peak with print_peak_rss, e.g. `python -c PEAK_RSS_RUN ...`):
    {rc, wall_s, peak_rss_bytes (None if it printed none), stdout, stderr (without the peak line)}."""
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - started
    stderr = "\n".join(line for line in result.stderr.splitlines() if not line.startswith(PEAK_RSS_MARK + " "))
    return {
        "rc": result.returncode,
        "wall_s": round(wall, 2),
        "peak_rss_bytes": read_peak_rss(result.stderr),
        "stdout": result.stdout,
        "stderr": stderr,
    }
