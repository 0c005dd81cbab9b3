import math

import pytest

from eft_core import Composition, Delta, InvalidArgumentError


def mixing() -> Composition:
    return Composition(
        "mixed",
        "large",
        (Delta("helpful", "small_chat", "small", 0.7), Delta("safe", "small_safe", "small", 0.3)),
    )


def test_models_are_distinct_and_ordered():
    composition = mixing()
    assert composition.scored_models == ("large", "small_chat", "small", "small_safe")
    assert composition.drafter_model == "small_chat"  # default: first delta's tuned model
    assert composition.nucleus_model == "small_chat"
    assert composition.models == composition.scored_models


def test_explicit_drafter_outside_the_scored_models_is_needed_but_not_scored():
    composition = Composition("c", "large", (Delta("d", "t", "r"),), drafter="tiny")
    assert composition.models == ("large", "t", "r", "tiny")
    assert "tiny" not in composition.scored_models


def test_base_alone_has_no_drafter():
    composition = Composition("base-only", "large")
    assert composition.drafter_model is None
    assert composition.models == ("large",)
    assert composition.weights() == ()


def test_per_request_weights_override_by_delta_name():
    assert mixing().weights() == (0.7, 0.3)
    assert mixing().weights({"safe": 1.0}) == (0.7, 1.0)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"unknown": 1.0}, "weights['unknown']"),
        ({"safe": math.nan}, "weights['safe']"),
        ({"helpful": math.inf}, "weights['helpful']"),
        ({"safe": "0.5"}, "weights['safe']"),
    ],
)
def test_bad_per_request_weights_name_the_field(overrides, field):
    with pytest.raises(InvalidArgumentError) as error:
        mixing().weights(overrides)
    assert error.value.field == field
    assert error.value.code == "INVALID_ARGUMENT"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(name="c", base=""), "base"),
        (dict(name="", base="b"), "name"),
        (dict(name="c", base="b", deltas=(Delta("d", "t", "r", math.nan),)), "deltas[0].weight"),
        (dict(name="c", base="b", deltas=(Delta("d", "t", "r", 1.0), Delta("e", "t", "r", -math.inf))), "deltas[1].weight"),
        (dict(name="c", base="b", deltas=(Delta("d", "t", "r"), Delta("d", "t2", "r"))), "deltas[1].name"),
        (dict(name="c", base="b", deltas=(Delta("d", "", "r"),)), "deltas[0].tuned"),
        (dict(name="c", base="b", deltas=(Delta("d", "t", None),)), "deltas[0].reference"),
        (dict(name="c", base="b", drafter=""), "drafter"),
    ],
)
def test_invalid_composition_names_the_field(kwargs, field):
    with pytest.raises(InvalidArgumentError) as error:
        Composition(**kwargs)
    assert error.value.field == field
    assert str(error.value).startswith(field + ": ")
