import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray stays on 127.0.0.1 (ENVIRONMENT.md)

import pytest
from hypothesis import settings
from transformers import AutoTokenizer

from services.family.build import build_family
from services.family.evaluate import open_engine
from services.family.recipe import bpe_recipe, quick_recipe

# Derandomised: property tests explore the same examples on every run, so CI is not flaky.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=60, print_blob=True)
settings.register_profile("thorough", deadline=None, max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def quick_family(tmp_path_factory):
    """A reduced family (12 entities, tiny models, a few epochs): same code, built in seconds."""
    return build_family(tmp_path_factory.mktemp("family") / "quick", quick_recipe(), log=lambda *_: None)


@pytest.fixture(scope="session")
def bpe_family(tmp_path_factory):
    """The quick family with a byte-level BPE tokenizer, ChatML and multilingual text (4 s)."""
    return build_family(tmp_path_factory.mktemp("family") / "bpe", bpe_recipe(), log=lambda *_: None)


@pytest.fixture(scope="session")
def oracle(quick_family):
    """The in-process reference engine over the reduced family."""
    return open_engine(quick_family)


@pytest.fixture(scope="session")
def tokenizers(quick_family):
    return {name: AutoTokenizer.from_pretrained(quick_family.model_path(name)) for name in quick_family.manifest["models"]}
