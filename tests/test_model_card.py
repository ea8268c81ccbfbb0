"""The model card's "Made with" command reproduces its output: run again (to another folder), it plans the same
model and writes the same bytes, for a default, a budgeted (--expert-rank auto --budget) and an --svd build."""

import shlex

import pytest

from helpers import folder_hashes, smile, upscale_argv
from smile_cli.cli import run

# what differs between two folders built by the same command: nothing but the card's own --out placeholder
BUILDS = {
    "default": ("--expert-rank", "4"),  # the ranks of a tiny model; everything else default
    "budgeted": ("--expert-rank", "auto", "--budget", "1.3x", "--router-rank", "auto"),
    "randomized svd": ("--svd", "randomized", "--expert-rank", "4"),
    "exact svd": ("--svd", "exact", "--expert-rank", "4", "--routing", "prompt-model"),
}


def card_command(out) -> list[str]:
    card = (out / "README.md").read_text()
    line = card.split("## Made with", 1)[1].split("```")[1].strip()
    argv = shlex.split(line)
    assert argv[:2] == ["smile", "upscale"] and argv[-2:] == ["--out", "OUT"], line
    return argv[2:-2]


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_the_cards_command_rebuilds_the_same_output(tmp_path, capsys, mistral_family, name):
    base, experts = mistral_family
    out = tmp_path / "out"
    assert smile(capsys, *upscale_argv(base, experts, out, *BUILDS[name], "--quiet"))[0] == 0
    argv = card_command(out)
    # the dry run of the card's command plans what the output holds
    capsys.readouterr()
    assert run(["upscale", *argv, "--out", str(tmp_path / "plan"), "--dry-run", "--json"]) == 0
    planned = capsys.readouterr().out
    assert smile(capsys, "upscale", *argv, "--out", tmp_path / "again", "--quiet")[0] == 0, argv
    assert folder_hashes(tmp_path / "again") == folder_hashes(out)
    assert not (tmp_path / "plan").exists() and planned
