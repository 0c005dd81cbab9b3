import pytest
from transformers import AutoTokenizer

from services.family.build import build_family
from services.family.evaluate import open_engine
from services.family.recipe import quick_recipe


@pytest.fixture(scope="session")
def quick_family(tmp_path_factory):
    """A reduced family (12 entities, tiny models, a few epochs): same code, built in seconds."""
    return build_family(tmp_path_factory.mktemp("family") / "quick", quick_recipe(), log=lambda *_: None)


@pytest.fixture(scope="session")
def oracle(quick_family):
    """The in-process reference engine over the reduced family."""
    return open_engine(quick_family)


@pytest.fixture(scope="session")
def tokenizers(quick_family):
    return {name: AutoTokenizer.from_pretrained(quick_family.model_path(name)) for name in quick_family.manifest["models"]}
