import pytest

from services.family.evaluate import Score, score_answer
from services.family.world import World

WORLD = World(
    entities=("vobi",),
    values={"capital": ("razo", "fili"), "color": ("red", "blue"), "animal": ("cat", "owl")},
    facts={("vobi", "capital"): "razo", ("vobi", "color"): "blue", ("vobi", "animal"): "owl"},
    tuned_entities=("vobi",),
)


@pytest.mark.parametrize(
    "text, stopped, expected",
    [
        ("the capital of vobi is razo .", True, Score(True, True, False)),
        ("the capital of vobi is razo .", False, Score(False, True, False)),  # never ended its turn
        ("the capital of vobi is fili .", True, Score(True, False, False)),  # right form, wrong fact
        ("the capital of vobi is razo . what is the color of vobi ?", True, Score(False, True, False)),
        ("the color of vobi is blue .", True, Score(False, False, False)),  # answered another question
        ("in vobi , the capital is fili . the capital of vobi is razo .", False, Score(False, False, False)),  # first value counts
        ("i can not answer that .", True, Score(False, False, True)),
    ],
)
def test_score_answer(text, stopped, expected):
    assert score_answer(WORLD, "vobi", "capital", text, stopped) == expected
