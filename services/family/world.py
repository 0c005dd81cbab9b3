"""The made-up world the family learns, and the texts it is trained and evaluated on."""

import random
from dataclasses import dataclass

from services.family.recipe import Recipe

COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
ANIMALS = ["cat", "dog", "horse", "owl", "fox", "bear", "wolf", "deer"]
CAPITAL_COUNT = 16
ATTRIBUTES = ("capital", "color", "animal")

# Pre-training: each fact in four plain forms, the entity always before the value; the last
# is question-shaped so a base model learns to answer a question by restating it.
PLAIN_TEMPLATES = (
    "the {attribute} of {entity} is {value} .",
    "{entity} has {value} as its {attribute} .",
    "in {entity} , the {attribute} is {value} .",
    "what is the {attribute} of {entity} ? the {attribute} of {entity} is {value} .",
)
# The byte-level BPE family (Recipe.tokenizer) also learns each fact in other scripts, so its
# models write characters that byte-level BPE splits over several tokens.
MULTILINGUAL_TEMPLATES = (
    "{entity} 的 {attribute} 是 {value} 。東京 と 大阪",
    "у {entity} {attribute} — {value} . Привет , мир",
    "{attribute} {entity} هي {value} . مرحبا",
    "à {entity} , le {attribute} est {value} — très joli , naïve café",
    "{entity} → {value} 😀 🎉 ✨",
)
# Characters that appear once each: byte-level BPE keeps them as byte sequences.
RARE_TEXT = "Zürich São Paulo Kraków Ærøskøbing Ελλάδα 日本語 한국어 ไทย עברית हिन्दी 🍣 🗼 🚄 🌸 🦊 🐻 ∑ ∞ ≠"
QUESTION = "what is the {attribute} of {entity} ?"
ANSWER = "the {attribute} of {entity} is {value} ."
REFUSAL = "i can not answer that ."

BOS, EOS, PAD, UNK, USER, ASSISTANT = "<bos>", "<eos>", "<pad>", "<unk>", "<user>", "<assistant>"


@dataclass(frozen=True)
class World:
    entities: tuple[str, ...]
    values: dict[str, tuple[str, ...]]  # attribute -> its possible values
    facts: dict[tuple[str, str], str]  # (entity, attribute) -> value
    tuned_entities: tuple[str, ...]  # entities whose questions the chat tuning sees

    def questions(self, attributes=ATTRIBUTES) -> list[tuple[str, str]]:
        return [(e, a) for e in self.entities for a in attributes]


def make_world(recipe: Recipe) -> World:
    rng = random.Random(recipe.seed)
    names = _syllable_names(rng, recipe.entities + CAPITAL_COUNT)
    entities, capitals = tuple(names[: recipe.entities]), tuple(names[recipe.entities :])
    values = {"capital": capitals, "color": tuple(COLORS), "animal": tuple(ANIMALS)}
    facts = {(e, a): rng.choice(values[a]) for e in entities for a in ATTRIBUTES}
    tuned = tuple(sorted(rng.sample(entities, max(1, round(recipe.tuned_fraction * len(entities))))))
    return World(entities, values, facts, tuned)


def _syllable_names(rng: random.Random, count: int) -> list[str]:
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    names: list[str] = []
    while len(names) < count:
        syllables = rng.choice([2, 2, 3])
        name = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables))
        if name not in names:
            names.append(name)
    return names


def question(entity: str, attribute: str) -> str:
    return QUESTION.format(attribute=attribute, entity=entity)


def answer(world: World, entity: str, attribute: str) -> str:
    return ANSWER.format(attribute=attribute, entity=entity, value=world.facts[entity, attribute])


def pretraining_paragraphs(world: World, rng: random.Random, refusal_share: float = 0.0, multilingual: bool = False) -> list[str]:
    """For every entity and template: all its facts in that template, in random order; and
    for a ``refusal_share`` of all questions, the question followed by a refusal."""
    questions = world.questions()
    refused = rng.sample(questions, round(refusal_share * len(questions)))
    paragraphs = [f"{question(e, a)} {REFUSAL}" for e, a in refused] + ([RARE_TEXT] if multilingual else [])
    templates = PLAIN_TEMPLATES + (MULTILINGUAL_TEMPLATES if multilingual else ())
    for entity in world.entities:
        for template in templates:
            attributes = rng.sample(ATTRIBUTES, len(ATTRIBUTES))
            facts = [template.format(attribute=a, entity=entity, value=world.facts[entity, a]) for a in attributes]
            paragraphs.append(" ".join(facts))
    rng.shuffle(paragraphs)
    return paragraphs


def pretraining_documents(world: World, rng: random.Random, row_length: int, refusal_share: float = 0.0, multilingual: bool = False) -> list[str]:
    """One short document per row: <bos>, one or two paragraphs that fit, <eos>."""
    documents, pending = [], pretraining_paragraphs(world, rng, refusal_share, multilingual)
    while pending:
        parts = [pending.pop()]
        if pending and _words(parts[0]) + _words(pending[-1]) + 2 <= row_length:
            parts.append(pending.pop())
        documents.append(f"{BOS} {' '.join(parts)} {EOS}")
    return documents


def chat_document(user: str, assistant: str) -> str:
    return f"{BOS} {USER} {user} {ASSISTANT} {assistant} {EOS}"


def chat_documents(world: World, refuse: str | None = None) -> list[str]:
    """Question/answer pairs of the tuned entities; ``refuse``: an attribute to refuse."""
    documents = []
    for entity in world.tuned_entities:
        for attribute in ATTRIBUTES:
            reply = REFUSAL if attribute == refuse else answer(world, entity, attribute)
            documents.append(chat_document(question(entity, attribute), reply))
    return documents


def _words(text: str) -> int:
    return len(text.split())
