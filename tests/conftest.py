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
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts")]  # scripts/: tiny_experts, the demo's trained models

from tiny_experts import models  # noqa: E402
from tiny_models import make_family  # noqa: E402


@pytest.fixture(scope="session")
def mistral_family(tmp_path_factory):
    """A tiny Mistral base and three fine-tunes, shared by tests that only read them."""
    return make_family(tmp_path_factory.mktemp("mistral"), "mistral")


@pytest.fixture(scope="session")
def char_family(tmp_path_factory):
    """A tiny Llama base with the tasks' character tokenizer (for `smile route`) and three fine-tunes."""
    base, experts = make_family(tmp_path_factory.mktemp("llama-chars"), "llama")
    models.save_char_tokenizer(base)
    return base, experts


@pytest.fixture(scope="session")
def demo_models():
    """The bundled demo's trained base and four task experts (scripts/demo.py), from the shared model cache
    (.cache/tiny-experts, or SMILE_TINY_CACHE); trained on one core when the cache is cold (a few minutes)."""
    return models.build_or_load(models.DEFAULT_CACHE, "demo", log=lambda *_: None)
