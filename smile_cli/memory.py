"""How much memory this machine has free, and how much loading a whole model folder takes.

Commands that must load a whole model (`smile route`, the whole-model forward pass of `smile verify`) compare the
two before they start, so that they refuse, or skip that step, instead of being killed by the kernel's OOM killer.
Available memory is the least of /proc/meminfo's MemAvailable and what the process's cgroup (v2 or v1) still
allows (its limit minus its usage, not counting reclaimable file cache); SMILE_AVAILABLE_MEMORY (bytes, or e.g.
8GB, 512MiB) overrides it.

Also the one way the tests and benchmarks measure a run's peak resident set (peak_rss, PEAK_RSS_RUN,
measured_run): the process's own VmHWM, printed by the process itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from smile_cli.errors import InputError

AVAILABLE_ENV = "SMILE_AVAILABLE_MEMORY"
# The Python interpreter with torch and transformers imported, and a model skeleton: about 0.45-0.6 GB measured
RUNTIME_BYTES = 700 * 10**6


def available_memory() -> tuple[int, str]:
    """(bytes available to this process now, where the figure comes from)."""
    override = os.environ.get(AVAILABLE_ENV)
    if override:
        from smile_cli.options import parse_size

        try:
            return parse_size(override), AVAILABLE_ENV
        except ValueError as e:
            raise InputError(f"{AVAILABLE_ENV}: {e}") from None
    found = []
    meminfo = _meminfo(Path("/proc/meminfo"))
    if "MemAvailable" in meminfo:
        found.append((meminfo["MemAvailable"], "MemAvailable"))
    cgroup = _cgroup_available()
    if cgroup is not None:
        found.append((cgroup, "the cgroup's memory limit"))
    if not found:  # not Linux: what psutil-free Python can tell
        try:
            pages, size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
            found.append((pages * size, "free physical pages"))
        except (ValueError, OSError, AttributeError):
            return 2**62, "unknown"
    return min(found)


def _meminfo(path: Path) -> dict[str, int]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    values = {}
    for line in lines:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key.strip()] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return values


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat(path: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines() if line.strip())}
    except (OSError, ValueError):
        return {}


def _cgroup_available(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The process's cgroup limit minus its usage without inactive file cache; None without a limit."""
    own = root
    try:  # cgroup v2: the process's own group under the unified hierarchy
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                own = root / line[3:].strip().lstrip("/")
    except OSError:
        pass
    for folder in dict.fromkeys([own, root]):
        limit, usage = _read_int(folder / "memory.max"), _read_int(folder / "memory.current")
        if limit is not None and usage is not None:
            return max(0, limit - usage + _stat(folder / "memory.stat").get("inactive_file", 0))
    v1 = root / "memory"
    limit, usage = _read_int(v1 / "memory.limit_in_bytes"), _read_int(v1 / "memory.usage_in_bytes")
    if limit is not None and usage is not None and limit < 2**60:
        return max(0, limit - usage + _stat(v1 / "memory.stat").get("total_inactive_file", 0))
    return None


def folder_weights(folder: Path) -> tuple[int, str]:
    """(bytes of every tensor of a model folder's safetensors files, the dtype most of those bytes are in), from
    the headers alone."""
    from smile_cli.inputs.safetensors_format import read_safetensors_header

    total, by_dtype = 0, Counter()
    for path in sorted(Path(folder).glob("*.safetensors")):
        tensors, _ = read_safetensors_header(path)
        for info in tensors.values():
            total += info.nbytes
            by_dtype[str(info.dtype).removeprefix("torch.")] += info.nbytes
    return total, (by_dtype.most_common(1)[0][0] if by_dtype else "float32")


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def check_fits(folder: Path, what: str) -> tuple[int, str]:
    """Refuse (InputError, one line) when loading the whole model in folder will not fit in the available memory;
    else (the bytes it needs, its stored dtype)."""
    weights, dtype = folder_weights(folder)
    need = weights + RUNTIME_BYTES
    available, source = available_memory()
    if need > available:
        raise InputError(
            f"{folder}: {what} needs about {gb(need)} of memory (the weights, {gb(weights)} in {dtype}, and the "
            f"runtime), but only {gb(available)} is available ({source}); free memory or use a larger machine"
        )
    return need, dtype


# ---- the peak resident set of a run (tests and benchmarks) -------------------------------------------------------
# A process's own peak is its VmHWM. Not a child's ru_maxrss (/usr/bin/time, wait4): Linux carries a parent's peak
# RSS over fork and exec into the child's ru_maxrss, so a child of a test or benchmark process that built families
# and serves files would report that process's peak, not its own.
PEAK_RSS_MARK = "PEAK_RSS"
# `python -c PEAK_RSS_RUN ARGV...` runs the smile CLI with ARGV, then prints "PEAK_RSS <bytes>" on stderr.
PEAK_RSS_RUN = (
    "import sys; from smile_cli.cli import run; from smile_cli.memory import print_peak_rss; "
    "code = run(sys.argv[1:]); print_peak_rss(); sys.exit(code)"
)


def peak_rss() -> int:
    """This process's peak resident set so far, in bytes (VmHWM of /proc/self/status; Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("/proc/self/status has no VmHWM")


def print_peak_rss() -> None:
    """The line read_peak_rss reads back, on stderr: a process that measures itself prints it last."""
    print(PEAK_RSS_MARK, peak_rss(), file=sys.stderr, flush=True)


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
