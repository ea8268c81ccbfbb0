"""The recipes in scripts/ and the configs in configs/, run as users run them (subprocesses, real env vars) on the
tiny families: the shell pipeline and its exit-code branches, the Slurm array (its body with SLURM_ARRAY_TASK_ID,
and its submission through a stand-in sbatch), the Kubernetes Indexed Job's commands, the torchrun launch, the
GitHub Actions merge job's run steps, every config as a dry run, and the bundled demo on the trained models."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import staging_of
from tiny_lora import make_lora

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS, CONFIGS = ROOT / "scripts", ROOT / "configs"
CRASH = Path(__file__).parent / "crash_after_shards.py"
TINY = ("--router-rank", "2", "--expert-rank", "4", "--max-shard-size", "40KB")  # several shards of the tiny models


@pytest.fixture(scope="module")
def shell_env(tmp_path_factory):
    """The environment of a shell on which `smile` is this checkout's CLI (a shim first on PATH)."""
    bin_dir = tmp_path_factory.mktemp("bin")
    shim = bin_dir / "smile"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m smile_cli "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": pythonpath}


def sh(argv, env, cwd=None, timeout=900):
    return subprocess.run(list(map(str, argv)), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def verified(out: Path, env) -> dict:
    result = sh(["smile", "verify", out, "--json"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def config_for_tiny(name: str, base, experts, folder: Path, **options) -> Path:
    """configs/NAME with the tiny base and experts (and options) in place of its models: what a user edits."""
    config = yaml.safe_load((CONFIGS / name).read_text())
    config.update(base=str(base), experts=[str(e) for e in experts], **options)
    path = folder / name
    path.write_text(yaml.safe_dump(config))
    return path


# ---------------------------------------------------------------------------------------------------- configs


def tiny_overrides(config: dict) -> list[str]:
    """Options that fit a config's model sizes to the tiny models (32 hidden units, 2 layers)."""
    overrides = []
    if isinstance(config.get("expert_rank"), int):
        overrides += ["--expert-rank", "4"]
    if "budget" in config:  # the tiny models' embeddings are a larger share: 1.2x is below their smallest SMILE
        overrides += ["--budget", "2x"]
    return overrides


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_configs_are_valid_for_a_dry_run(name, char_family, tmp_path, shell_env):
    base, experts = char_family
    config = yaml.safe_load((CONFIGS / name).read_text())
    if "lora" in name:  # its experts are PEFT adapters
        experts = [tmp_path / f"adapter{i}" for i in range(2)]
        for i, folder in enumerate(experts):
            make_lora(base, folder, seed=i, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    argv = ["smile", "upscale", "--config", CONFIGS / name, "--base", base, "--experts", ",".join(map(str, experts))]
    result = sh([*argv, "--out", tmp_path / "out", *tiny_overrides(config), "--dry-run"], shell_env)
    assert result.returncode == 0, result.stderr
    assert "parameters" in result.stdout and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------- pipeline


def pipeline(env, family, out, *options, **extra_env):
    base, experts = family
    env = {**env, "BASE": str(base), "EXPERTS": ",".join(map(str, experts)), "OUT": str(out), **extra_env}
    env.setdefault("INSPECT_OPTIONS", "--router-rank 2 --expert-rank 4")
    return sh(["bash", SCRIPTS / "pipeline.sh", *options], env)


def test_pipeline_inspects_plans_builds_verifies_and_routes(char_family, tmp_path, shell_env):
    out = tmp_path / "smile"
    config = ("--config", CONFIGS / "routing.yaml")  # its base and experts overridden by the pipeline's
    result = pipeline(shell_env, char_family, out, *config, *TINY, PROMPTS="abc>\nx=1;x?\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    reports = Path(f"{out}.reports")
    assert json.loads((reports / "inspect.json").read_text())
    assert "parameters" in (reports / "plan.txt").read_text()
    summary = json.loads((reports / "summary.json").read_text())
    assert summary["out"] == str(out)
    assert json.loads((out / "config.json").read_text())["smile_routing"] == "prompt-model"  # from the config
    assert json.loads((reports / "verify.json").read_text())["ok"] is True and verified(out, shell_env)["ok"]
    route = json.loads((reports / "route.json").read_text())
    assert [p["prompt"] for p in route["prompts"]] == ["abc>", "x=1;x?"]


def test_pipeline_stops_on_bad_input_with_exit_2(char_family, tmp_path, shell_env):
    base, experts = char_family
    out = tmp_path / "smile"
    result = pipeline(shell_env, (base, [*experts, tmp_path / "missing"]), out, *TINY)
    assert result.returncode == 2
    assert "bad arguments or inputs (exit 2)" in result.stderr and "missing" in result.stderr
    assert not out.exists() and not staging_of(out).exists()


def test_pipeline_retries_a_failed_upscale_with_resume(char_family, tmp_path, shell_env):
    """Exit 1 mid-run (a simulated full disk after 2 shards): the pipeline reruns the upscale with --resume."""
    out, marker = tmp_path / "smile", tmp_path / "crashed"
    smile = f"{sys.executable} {CRASH} 2"
    result = pipeline(shell_env, char_family, out, *TINY, SMILE=smile, CRASH_WITH="error", CRASH_ONCE=str(marker))
    assert result.returncode == 0, result.stderr
    assert marker.exists() and "retrying with --resume" in result.stderr
    assert "resum" in result.stderr.split("retrying with --resume", 1)[1]  # the rerun kept the written shards
    verified(out, shell_env)


def test_pipeline_stops_on_interrupt_and_a_rerun_resumes(char_family, tmp_path, shell_env):
    """Exit 130 (Ctrl-C after 2 shards): the pipeline stops, keeping the staging folder; run again, it resumes."""
    out, marker = tmp_path / "smile", tmp_path / "interrupted"
    crash = {"SMILE": f"{sys.executable} {CRASH} 2", "CRASH_WITH": "interrupt", "CRASH_ONCE": str(marker)}
    first = pipeline(shell_env, char_family, out, *TINY, **crash)
    assert first.returncode == 130, first.stderr
    assert "interrupted (exit 130)" in first.stderr
    assert staging_of(out).is_dir() and not out.exists()
    second = pipeline(shell_env, char_family, out, *TINY, **crash)
    assert second.returncode == 0, second.stderr
    assert "resum" in second.stderr
    verified(out, shell_env)


# ------------------------------------------------------------------------------------------------------ Slurm


def test_slurm_array_parts_then_assemble(char_family, tmp_path, shell_env):
    base, experts = char_family
    out = tmp_path / "smile"
    config = CONFIGS / "budgeted-ranks.yaml"  # the recipe's config: the same allocation in every part
    env = {**shell_env, "CONFIG": str(config), "OUT": str(out), "PARTS": "2"}
    options = ["--base", base, "--experts", ",".join(map(str, experts)), "--budget", "2x", "--max-shard-size", "40KB"]
    for part in range(2):  # what each array task runs
        result = sh(["bash", SCRIPTS / "slurm_array.sh", *options], {**env, "SLURM_ARRAY_TASK_ID": str(part)})
        assert result.returncode == 0, result.stderr
        assert not out.exists()
    result = sh(["bash", SCRIPTS / "slurm_array.sh", "assemble"], env)  # the dependent job
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["smile_ranks"]  # budgeted ranks, per module and expert
    verified(out, shell_env)


def test_slurm_array_submits_parts_and_a_dependent_assemble(tmp_path, shell_env):
    """On a login node the script submits itself as an array and `assemble` after it (afterok)."""
    calls = tmp_path / "sbatch-calls"
    sbatch = tmp_path / "bin" / "sbatch"
    sbatch.parent.mkdir()
    sbatch.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nwc -l < {calls} | tr -d " " | sed "s/^/100/"\n')
    sbatch.chmod(0o755)
    env = {**shell_env, "PATH": f"{sbatch.parent}{os.pathsep}{shell_env['PATH']}", "CONFIG": "c.yaml", "OUT": "o"}
    result = sh(["bash", SCRIPTS / "slurm_array.sh", "--top-k", "2"], {**env, "PARTS": "3"})
    assert result.returncode == 0, result.stderr
    array_call, assemble_call = calls.read_text().splitlines()
    script = str((SCRIPTS / "slurm_array.sh").resolve())
    assert "--array=0-2" in array_call and array_call.endswith(f"{script} --top-k 2")
    assert "--dependency=afterok:1001" in assemble_call and assemble_call.endswith(f"{script} assemble")
    assert "parts 1001" in result.stdout and "assemble 1002" in result.stdout


# ------------------------------------------------------------------------------------------------- Kubernetes


def container(job: dict) -> tuple[list[str], dict]:
    """The command line and environment of a Job's container."""
    spec = job["spec"]["template"]["spec"]["containers"][0]
    return spec["command"] + spec["args"], {e["name"]: e["value"] for e in spec.get("env", [])}


def test_k8s_indexed_job_runs_every_index_then_assembles(char_family, tmp_path, shell_env):
    documents = list(yaml.safe_load_all((SCRIPTS / "k8s-indexed-job.yaml").read_text()))
    jobs = {d["metadata"]["name"]: d for d in documents if d["kind"] == "Job"}
    parts, assemble = jobs["smile-parts"], jobs["smile-assemble"]
    assert parts["spec"]["completionMode"] == "Indexed"
    command, env = container(parts)
    count = parts["spec"]["completions"]
    assert parts["spec"]["parallelism"] == count and env["SMILE_PARTS"] == str(count)
    mounted = {v["name"]: v for v in parts["spec"]["template"]["spec"]["volumes"]}
    assert mounted["config"]["configMap"]["name"] == "smile-config"
    # the ConfigMap is made from a config of configs/ (its file name in the comment): here, with the tiny models
    name = re.search(r"--from-file=smile\.yaml=configs/([\w.-]+)", (SCRIPTS / "k8s-indexed-job.yaml").read_text())[1]
    config = config_for_tiny(name, *char_family, tmp_path, expert_rank=4, max_shard_size="20KB")
    out = tmp_path / "smile"
    local = {**shell_env, **env, "SMILE_CONFIG": str(config), "SMILE_OUT": str(out), "HF_HOME": str(tmp_path)}
    for index in range(count):  # what each pod runs, JOB_COMPLETION_INDEX set by Kubernetes
        result = sh(command, {**local, "JOB_COMPLETION_INDEX": str(index)})
        assert result.returncode == 0, result.stderr
    command, env = container(assemble)
    result = sh(command, {**local, **env, "SMILE_OUT": str(out)})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout[result.stdout.index("{") :])["ok"] is True
    verified(out, shell_env)


# --------------------------------------------------------------------------------------------------- torchrun


def test_torchrun_recipe_builds_in_two_processes(mistral_family, tmp_path, shell_env):
    base, experts = mistral_family
    out = tmp_path / "smile"
    env = {**shell_env, "NPROC": "2", "TORCHRUN": f"{sys.executable} -m torch.distributed.run"}
    argv = ["--base", base, "--experts", ",".join(map(str, experts)), "--out", out, *TINY, "--quiet"]
    result = sh(["bash", SCRIPTS / "torchrun.sh", *argv], env)
    assert result.returncode == 0, result.stderr
    verified(out, shell_env)


# ----------------------------------------------------------------------------------------------------- GitHub


def test_github_actions_merge_job_builds_verifies_and_publishes(char_family, tmp_path, shell_env):
    workflow = yaml.safe_load((SCRIPTS / "github-actions-merge.yml").read_text())
    steps = workflow["jobs"]["merge"]["steps"]
    base = char_family[0]
    adapters = [tmp_path / f"adapter{i}" for i in range(2)]
    for i, folder in enumerate(adapters):
        make_lora(base, folder, seed=i, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    config = Path(workflow["env"]["SMILE_CONFIG"])
    assert (ROOT / config).is_file()  # the workflow builds from a config of configs/
    (workspace / config.parent).mkdir(parents=True)
    config_for_tiny(config.name, base, adapters, workspace / config.parent, expert_rank=4)
    env = {k: v for k, v in workflow["env"].items() if "${{" not in v}  # expressions: Actions' own
    env = {**shell_env, **env, "HF_HOME": str(tmp_path / "hf"), "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md")}
    ran = []
    for step in steps:
        if "run" not in step or step.get("id") == "install":  # smile is installed here already
            continue
        result = sh(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]], env, cwd=workspace)
        assert result.returncode == 0, (step["name"], result.stderr)
        ran.append(step["name"])
    assert len(ran) == 3
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact"))
    published = upload["with"]["path"].split()
    assert all((workspace / p).is_file() for p in published), published
    summary = json.loads((workspace / env["SMILE_REPORTS"] / "summary.json").read_text())
    assert Path(summary["out"]) == workspace / env["SMILE_OUT"]
    assert json.loads((workspace / env["SMILE_REPORTS"] / "verify.json").read_text())["ok"] is True
    assert "SMILE merge" in (tmp_path / "summary.md").read_text()


# ------------------------------------------------------------------------------------------------------- demo


@pytest.mark.slow
def test_demo_experts_master_their_tasks_and_smile_keeps_accuracy(demo_models, tmp_path, shell_env):
    """The README's first command, on the cached demo models (the demo_models fixture trains them when cold)."""
    out = tmp_path / "smile-demo" / "model"
    argv = [sys.executable, SCRIPTS / "demo.py", "--out", out, "--examples", "50", "--workers", "1"]
    result = sh(argv, shell_env, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == len(demo_models["tasks"]) + 3 and cells[0] not in ("model", "---"):
            rows[cells[0]] = dict(zip(demo_models["tasks"], map(float, cells[1:-2]), strict=True))
    for task in demo_models["tasks"]:
        assert rows[f"expert: {task}"][task] >= 90, rows  # every expert masters its own task
        assert rows["base"][task] == 0
    kept = dict(re.findall(r"SMILE \(([\w-]+)\) keeps (\d+)% of the experts' accuracy", result.stdout))
    assert set(kept) == {"likelihood-prompt", "faithful"}, result.stdout
    # the default keeps most of it on these tiny task models (59% measured), the paper's router little (7%)
    default, faithful = int(kept["likelihood-prompt"]), int(kept["faithful"])
    assert default >= 40 and default > faithful, result.stdout
    cost = re.findall(r"([\d.]+)x the base, ", result.stdout)
    assert cost and all(1 < float(c) < 2.5 for c in cost), result.stdout
    assert (out / "config.json").is_file() and "smile route" in result.stdout
