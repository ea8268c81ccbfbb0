import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from tiny_models import make_family  # noqa: E402


@pytest.fixture(scope="session")
def mistral_family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("mistral"), "mistral")


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path, monkeypatch):
    """Never touch the user's Hugging Face cache; remote code modules go to a per-test folder."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
