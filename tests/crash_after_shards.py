"""`python crash_after_shards.py K ARGS...`: the smile CLI with ARGS, killed with SIGKILL (as by kill -9) right
after it has journaled its K-th new shard: a crash at a known point, for the resume tests.

CRASH_WITH=error makes it a failure instead (an OSError, as from a full disk: exit 1), CRASH_WITH=interrupt a
Ctrl-C (exit 130); with CRASH_ONCE=FILE it crashes only when FILE does not exist yet, and creates it (so that a
script's rerun of the same command completes)."""

import os
import signal
import sys
from pathlib import Path

from smile_cli import staging
from smile_cli.cli import run

crash_after = int(sys.argv.pop(1))
crash_with = os.environ.get("CRASH_WITH", "kill")
once = os.environ.get("CRASH_ONCE")
journal_add = staging.Journal.add
added = []


def add_then_crash(journal, shard):
    journal_add(journal, shard)
    added.append(shard)
    if len(added) != crash_after:
        return
    if once:
        if Path(once).exists():
            return
        Path(once).touch()
    if crash_with == "error":
        raise OSError(28, "No space left on device (simulated)")
    if crash_with == "interrupt":
        raise KeyboardInterrupt
    os.kill(os.getpid(), signal.SIGKILL)


staging.Journal.add = add_then_crash
sys.exit(run(sys.argv[1:]))
