"""An expert saved from another model class than the base's (a bare LlamaModel: `layers.0...` where the base has
`model.layers.0...`) is matched to the base's names by that prefix, with a warning, and gives the shards the same
expert saved with the base's names gives; the opened checkpoint is not renamed in place (planning works on a renamed
copy: Expert.aligned_to). Names that match nothing of the base's are refused in one line, exit 2."""

import shutil

from safetensors.torch import load_file, save_file

from helpers import FAITHFUL, folder_hashes, smile
from smile_cli.inputs.experts import open_expert
from smile_cli.inputs.local import open_checkpoint
from smile_cli.options import UpscaleOptions
from smile_cli.planning import build_plan
from tiny_models import make_family

OPTIONS = ("--router-rank", "2", "--expert-rank", "3", *FAITHFUL)


def renamed_copy(src, dst, rename):
    """src's model folder at dst with its tensors renamed (rename(name) -> new name, or None: left out)."""
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    state = {rename(n): t for n, t in state.items() if rename(n) is not None}
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def bare(name):  # as a bare LlamaModel saves it: no `model.` prefix, no output head
    return None if name == "lm_head.weight" else name.removeprefix("model.")


def test_bare_model_expert_is_matched_by_its_prefix(tmp_path, capsys):
    base, experts = make_family(tmp_path / "family", "llama", num_experts=2)
    stripped = renamed_copy(experts[1], tmp_path / "bare", bare)

    code, err = smile(capsys, "upscale", "--base", base, "--experts", f"{experts[0]},{stripped}", "--out",
                      tmp_path / "out_bare", *OPTIONS)  # fmt: skip
    assert code == 0, err
    assert any("carry the prefix '' where the base's carry 'model.'" in line for line in err)
    code, err = smile(capsys, "upscale", "--base", base, "--experts", f"{experts[0]},{experts[1]}", "--out",
                      tmp_path / "out_named", *OPTIONS)  # fmt: skip
    assert code == 0, err
    shards = {k: v for k, v in folder_hashes(tmp_path / "out_bare").items() if k.endswith(".safetensors")}
    assert shards and shards == {
        k: v for k, v in folder_hashes(tmp_path / "out_named").items() if k.endswith(".safetensors")
    }

    # planning renames a copy: the expert as opened keeps its own names
    options = UpscaleOptions(base=str(base), experts=[str(experts[0]), str(stripped)], router_rank=2, expert_rank=3)
    opened = [open_expert(ref) for ref in options.experts]
    plan = build_plan(options, open_checkpoint(options.base), opened)
    assert "layers.0.mlp.up_proj.weight" in opened[1].checkpoint.tensors
    assert "model.layers.0.mlp.up_proj.weight" not in opened[1].checkpoint.tensors
    assert "model.layers.0.mlp.up_proj.weight" in plan.experts[1].checkpoint.tensors
    assert plan.experts[0] is opened[0]


def test_names_of_another_model_are_refused(tmp_path, capsys):
    base, experts = make_family(tmp_path / "family", "llama", num_experts=2)
    other = renamed_copy(experts[1], tmp_path / "other", lambda n: "encoder." + n.replace("layers.", "blocks."))
    out = tmp_path / "out"
    code, err = smile(capsys, "upscale", "--base", base, "--experts", f"{experts[0]},{other}", "--out", out, *OPTIONS)
    assert code == 2
    assert len(err) == 1 and "start with 'encoder.'" in err[0] and "none matches the base's" in err[0], err
    assert not out.exists()
