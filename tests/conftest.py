import os
import sys
import tempfile
from pathlib import Path

import pytest

# Before transformers / huggingface_hub are imported: never touch the user's caches, never go online.
_HF_HOME = tempfile.mkdtemp(prefix="smile-tests-hf-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_MODULES_CACHE"] = os.path.join(_HF_HOME, "modules")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import make_family  # noqa: E402


@pytest.fixture(scope="session")
def mistral_family(tmp_path_factory):
    """A tiny Mistral base and three fine-tunes, shared by tests that only read them."""
    return make_family(tmp_path_factory.mktemp("mistral"), "mistral")
