"""How much memory this machine has free, and how much loading a whole model folder takes.

Commands that must load a whole model (`smile route`, the whole-model forward pass of `smile verify`) compare the
two before they start, so that they refuse, or skip that step, instead of being killed by the kernel's OOM killer.
Available memory is the least of /proc/meminfo's MemAvailable and what the process's cgroup (v2 or v1) still
allows (its limit minus its usage, not counting reclaimable file cache); SMILE_AVAILABLE_MEMORY (bytes, or e.g.
8GB, 512MiB) overrides it.

(How the tests and benchmarks measure a run's peak resident set: tests/peak_rss.py.)
"""

from __future__ import annotations

import os
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
