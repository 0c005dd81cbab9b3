"""The paper's claims, reproduced on the full demo family (built once per recipe, cached in
EFT_HOME, about 3 minutes on 2 cores; the evaluation takes about 2 more)."""

import pytest

from services.family.build import build_family
from services.family.evaluate import evaluate
from services.family.recipe import default_family_dir


@pytest.fixture(scope="module")
def results():
    family = build_family(default_family_dir())
    return evaluate(family, progress=print, row_names={"small-tuned", "large-base", "upscaled"})  # the rows the claims below read


@pytest.mark.slow
def test_upscaling_answers_in_chat_format_with_the_large_models_knowledge(results):
    rows = {row["name"]: row for row in results["rows"]}
    small, upscaled = rows["small-tuned"], rows["upscaled"]
    assert upscaled["n"] == 600
    assert upscaled["both"] >= small["both"] + 40, rows
    assert upscaled["facts"] >= 90, rows
    assert upscaled["format"] >= small["format"], rows
    assert rows["large-base"]["format"] < upscaled["format"]  # the delta, not the base, brings the format


@pytest.mark.slow
def test_refusals_rise_monotonically_as_the_safe_delta_gains_weight(results):
    by_safe_weight = sorted(results["mixing"], key=lambda point: 1 - point["lambda"])
    refused = [point["refused"] for point in by_safe_weight]
    assert refused == sorted(refused) and refused[-1] > refused[0], by_safe_weight
