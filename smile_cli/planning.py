"""Resolve and plan: open every input (headers only) and plan the output, the stage every command that builds or
describes a SMILE model starts with (upscale, assemble, --dry-run, inspect).

The plan itself (types and layout) is plan.py; `auto` ranks come from ranks.py; the kept-tensor comparison from
kept.py. Nothing here writes.
"""

from __future__ import annotations

import dataclasses
import logging

from smile_cli import calibrate
from smile_cli.inputs.experts import open_expert, open_input
from smile_cli.kept import compare_kept
from smile_cli.options import UpscaleOptions
from smile_cli.plan import Plan, build_plan, clamp_ranks
from smile_cli.ranks import allocate_ranks

log = logging.getLogger("smile")


def load_plan(
    options: UpscaleOptions, *, allow_pickle: bool = False, trust_remote_code: bool = False, ranks=None
) -> Plan:
    """Open every input (headers only) and plan the output; raises InputError on any bad input. `auto` ranks are
    allocated here (ranks.py: a pass over every update's singular values) unless `ranks` gives the result."""
    policy = dict(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, inputs=options.inputs)
    base = open_input(options.base, **policy)
    experts = [open_expert(ref, **policy) for ref in options.experts]
    plan = build_plan(options, base, experts)
    if plan.budgeted:
        plan = plan.with_ranks(ranks or allocate_ranks(plan))
    plan = clamp_ranks(plan)
    kept, warnings = compare_kept(plan)
    plan = dataclasses.replace(plan, kept_differences=kept, warnings=[*plan.warnings, *warnings])
    if options.calibrate is not None:  # the example prompts, checked; their routers are fitted by upscale
        calibration = calibrate.read_calibration(options.calibrate, plan)
        plan = dataclasses.replace(plan, calibration=calibration).with_ranks(plan.ranks)
    for warning in plan.warnings:
        log.warning(warning)
    return plan
