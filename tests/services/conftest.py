import pytest

from services.family.build import build_family
from services.family.recipe import quick_recipe


@pytest.fixture(scope="session")
def quick_family(tmp_path_factory):
    """A reduced family (12 entities, tiny models, a few epochs): same code, built in seconds."""
    return build_family(tmp_path_factory.mktemp("family") / "quick", quick_recipe(), log=lambda *_: None)
