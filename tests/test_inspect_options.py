"""smile inspect takes its options as upscale does: a --config file (flags override it), --target, and the same
defaults (defaults.py); ranks `auto` are refused in one line (inspect reports at given ranks)."""

import json

from helpers import smile


def inspect_json(capsys, *argv):
    capsys.readouterr()
    from smile_cli.cli import run

    code = run([str(a) for a in ["inspect", *argv, "--json", "--quiet"]])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else None), captured.err.strip().splitlines()


def test_inspect_reads_a_config_and_target(tmp_path, capsys, mistral_family):
    base, experts = mistral_family
    config = tmp_path / "smile.yaml"
    config.write_text(
        f"base: {base}\nexperts: [{', '.join(map(str, experts))}]\nrouter_rank: 2\nexpert_rank: 4\n"
        "target: '*.q_proj'\nsvd: exact\n"
    )
    code, report, err = inspect_json(capsys, "--config", config)
    assert code == 0, err
    assert report["router_rank"] == 2 and report["expert_rank"] == 4
    assert report["layers"] and all(layer["module"].endswith(".q_proj") for layer in report["layers"])
    assert report["factorization"]["svd"] == "exact"
    # flags override the file; the defaults are upscale's
    code, report, err = inspect_json(capsys, "--config", config, "--expert-rank", "3", "--target", "*.down_proj")
    assert code == 0, err
    assert report["expert_rank"] == 3 and all(layer["module"].endswith(".down_proj") for layer in report["layers"])
    code, report, err = inspect_json(capsys, base, "--experts", f"{experts[0]},{experts[1]}", "--expert-rank", "4")
    assert code == 0, err
    assert (report["router_rank"], report["factorization"]["svd"]) == (8, "auto")


def test_inspect_refuses_auto_ranks_and_missing_base(tmp_path, capsys, mistral_family):
    base, experts = mistral_family
    code, err = smile(capsys, "inspect", base, "--experts", experts[0], "--router-rank", "auto")
    assert code == 2 and len(err) == 1 and "inspect reports at given ranks" in err[0], err
    code, err = smile(capsys, "inspect", "--experts", experts[0])
    assert code == 2 and len(err) == 1 and "--base is required" in err[0], err
