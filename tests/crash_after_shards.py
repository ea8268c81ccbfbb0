"""`python crash_after_shards.py K ARGS...`: the smile CLI with ARGS, killed with SIGKILL (as by kill -9) right
after it has journaled its K-th new shard: a crash at a known point, for the resume tests."""

import os
import signal
import sys

from smile_cli import staging
from smile_cli.cli import run

crash_after = int(sys.argv.pop(1))
journal_add = staging.Journal.add
added = []


def add_then_crash(journal, shard):
    journal_add(journal, shard)
    added.append(shard)
    if len(added) == crash_after:
        os.kill(os.getpid(), signal.SIGKILL)


staging.Journal.add = add_then_crash
sys.exit(run(sys.argv[1:]))
