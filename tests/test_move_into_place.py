"""Replacing an output (--force) never loses both the old and the new one: upscale and export move their staging
folder into place through staging.move_into_place, which renames the old output aside and deletes it only once
the new one is in place. A failure of the final rename is simulated (Path.rename refusing the staging folder)."""

import errno
import os
from pathlib import Path

from helpers import folder_hashes, smile, upscale_argv

RANKS = ("--router-rank", "2", "--expert-rank", "4", "--quiet")


def refuse_renaming(monkeypatch, suffix: str) -> None:
    rename = Path.rename

    def refuse(path, target):
        if path.name.endswith(suffix):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return rename(path, target)

    monkeypatch.setattr(Path, "rename", refuse)


def test_export_failing_to_move_keeps_the_old_output_and_the_new_one(tmp_path, mistral_family, capsys, monkeypatch):
    base, experts = mistral_family
    folder = tmp_path / "smile"
    assert smile(capsys, *upscale_argv(base, experts, folder, *RANKS))[0] == 0
    out = tmp_path / "expert"
    assert smile(capsys, "export", folder, out, "--expert", "0", "--as", "dense", "--quiet")[0] == 0
    old = folder_hashes(out)

    refuse_renaming(monkeypatch, ".smile-export")
    code, err = smile(capsys, "export", folder, out, "--expert", "1", "--as", "dense", "--force", "--quiet")
    assert code == 1 and "cannot move the finished model into place" in err[-1], err
    monkeypatch.undo()
    assert folder_hashes(out) == old  # the old output is back, whole
    staging = tmp_path / ".expert.smile-export"
    assert staging.is_dir() and err[-1].endswith(f"it is complete in {staging}")
    assert not (tmp_path / ".expert.smile-replaced").exists()

    # the kept staging folder is the complete new export: the same files a successful run writes
    staging.rename(tmp_path / "kept")
    assert smile(capsys, "export", folder, out, "--expert", "1", "--as", "dense", "--force", "--quiet")[0] == 0
    assert folder_hashes(tmp_path / "kept") == folder_hashes(out) != old


def test_upscale_force_failing_to_move_keeps_the_old_output(tmp_path, mistral_family, capsys, monkeypatch):
    base, experts = mistral_family
    out = tmp_path / "out"
    assert smile(capsys, *upscale_argv(base, experts[:2], out, *RANKS))[0] == 0
    old = folder_hashes(out)
    refuse_renaming(monkeypatch, ".smile-staging")
    code, err = smile(capsys, *upscale_argv(base, experts, out, *RANKS), "--force")
    assert code == 1 and "cannot move the finished model into place" in err[-1], err
    monkeypatch.undo()
    assert folder_hashes(out) == old
    assert (tmp_path / ".out.smile-staging" / "smile_manifest.json").is_file()
