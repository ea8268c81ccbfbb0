"""--resume for runs in parts: a part (`--shard i/N`) or a torchrun rank killed mid-run keeps its complete shards,
the rerun computes only the missing ones, and the assembled output is bitwise identical to a single run's."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import folder_hashes, smile, staging_of, upscale, upscale_argv
from smile_cli.cli import run

SRC = Path(__file__).resolve().parents[1]
CRASH = Path(__file__).resolve().parent / "crash_after_shards.py"
OPTIONS = ["--router-rank", "2", "--expert-rank", "4", "--max-shard-size", "8KB"]  # 20 shards, 10 per part
ENV = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def single_run(mistral_family, tmp_path_factory):
    """Hashes of an uninterrupted single-process run's output."""
    base, experts = mistral_family
    out = tmp_path_factory.mktemp("single") / "out"
    assert upscale(base, experts, out, *OPTIONS, "--quiet") == 0
    return folder_hashes(out)


def file_ids(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of each file: a file rewritten (a new file renamed over it) gets another inode."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()}


def part_record(staging: Path, index: int, count: int = 2) -> dict:
    return json.loads((staging / f".smile-part-{index:05d}-of-{count:05d}.json").read_text())


def test_shard_part_killed_then_resumed(mistral_family, single_run, tmp_path, capsys):
    base, experts = mistral_family
    out = tmp_path / "out"
    staging = staging_of(out)
    argv = [str(a) for a in upscale_argv(base, experts, out, *OPTIONS)]
    assert run([*argv, "--shard", "0/2", "--quiet"]) == 0
    part0 = file_ids(staging)
    crashed = subprocess.run([sys.executable, str(CRASH), "3", *argv, "--shard", "1/2", "--quiet"], env=ENV)
    assert crashed.returncode == -signal.SIGKILL
    record = part_record(staging, 1)
    kept = [s["name"] for s in record["shards"]]
    assert not record["complete"] and len(kept) == 3
    before = file_ids(staging)
    assert all(before[name] == part0[name] for name in part0)
    assert smile(capsys, "assemble", out, "--quiet")[0] == 2  # part 1 is not finished

    # resuming with another option is refused in one line, and nothing is touched
    other = [a if a != "4" else "3" for a in argv]  # --expert-rank 4 -> 3
    code, err = smile(capsys, *other, "--shard", "1/2", "--resume", "--quiet")
    assert code == 2 and len(err) == 1 and "part 1/2" in err[0] and "expert_rank 4 -> 3" in err[0], err
    assert file_ids(staging) == before
    # a single-process --resume does not take the parts' staging folder for its own (nor discard it)
    code, err = smile(capsys, *argv, "--resume")
    assert code == 2 and "--shard i/N --resume" in err[-1] and file_ids(staging) == before, err

    code, err = smile(capsys, *argv, "--shard", "1/2", "--resume")
    assert code == 0, err
    assert any("3 of 10 shard(s) kept" in line for line in err), err
    after = file_ids(staging)
    assert all(after[name] == before[name] for name in [*kept, *part0])  # neither rewritten nor touched
    assert part_record(staging, 1)["complete"]

    # without --resume a part starts afresh, and leaves the other part alone
    assert run([*argv, "--shard", "0/2", "--quiet"]) == 0
    again = file_ids(staging)
    assert all(again[name] != part0[name] for name in part0 if name.endswith(".safetensors"))
    assert all(again[name] == after[name] for name in after if name not in part0)

    assert smile(capsys, "assemble", out, "--quiet")[0] == 0
    assert folder_hashes(out) == single_run and not staging.exists()
    # a part resumed after the output is complete has nothing to do
    assert smile(capsys, *argv, "--shard", "1/2", "--resume", "--quiet")[0] == 0
    assert folder_hashes(out) == single_run


def test_torchrun_resumes_interrupted_parts(mistral_family, single_run, tmp_path, capsys, monkeypatch):
    """Part 0 finished and part 1 interrupted (as SIGTERM does; torchrun stops a failed run's ranks with it),
    then torchrun --resume: rank 0 keeps the staging folder, each rank keeps its part's shards."""
    from smile_cli import staging as staging_module

    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    base, experts = mistral_family
    out = tmp_path / "out"
    staging = staging_of(out)
    argv = [str(a) for a in upscale_argv(base, experts, out, *OPTIONS, "--quiet")]
    assert run([*argv, "--shard", "0/2"]) == 0
    journal_add = staging_module.Journal.add

    def add_then_interrupt(journal, shard):
        journal_add(journal, shard)
        if len(journal.shards) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(staging_module.Journal, "add", add_then_interrupt)
    code, err = smile(capsys, *argv, "--shard", "1/2")
    assert code == 130 and len(err) == 1 and "--resume" in err[0], err
    monkeypatch.undo()
    assert len(part_record(staging, 1)["shards"]) == 3
    kept = [s["name"] for i in range(2) for s in part_record(staging, i)["shards"]]
    before = file_ids(staging)
    for rank in ("0", "1"):  # a process group without --resume or --force refuses, as a single run does
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", rank)
        code, err = smile(capsys, *argv)
        assert code == 2 and "--resume" in err[-1] and file_ids(staging) == before, err
    monkeypatch.undo()

    group = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "smile_cli"]
    resumed = subprocess.run([*group, *argv, "--resume"], capture_output=True, text=True, env=ENV, timeout=60)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert folder_hashes(out) == single_run and not staging.exists()
    after = file_ids(out)  # the staging folder was renamed to out: its files keep their inodes
    assert len(kept) == 13 and all(after[name] == before[name] for name in kept)  # kept, not rewritten
