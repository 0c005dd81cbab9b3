"""`eft eval`: the EFT paper's up-scaling result and behaviour mixing, on the demo family.

Every question is "what is the <attribute> of <entity> ?" sent as a chat message; each
model renders it with its own template. An answer is scored on

- **format**: exactly the chat answer form ``the <attribute> of <entity> is <value> .``
  followed by the end of the turn (what chat tuning teaches);
- **facts**: the first value of that attribute's kind in the answer is the right one
  (what pre-training teaches; the large models know far more than the small ones);
- **both**: format and facts.

Mixing: large-base + lambda * (small-tuned - small-base) + (1 - lambda) * (small-safe -
small-base) on questions about the attribute small-safe refuses: share answered (format)
and refused.
"""

import random
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass

import torch

from eft_core import SamplingParams, eft_logprobs
from services.family.build import Family
from services.family.compositions import family_compositions
from services.family.world import REFUSAL, World, question
from services.oracle import OracleEngine, load_model
from services.progress import bar

MAX_ANSWER_TOKENS = 16
LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0)
# (row name, composition, per-request weights)
ROWS = (
    ("small-tuned", "small-tuned", None),
    ("large-base", "large-base", None),
    ("large-tuned", "large-tuned", None),
    ("upscaled", "upscaled", {"chat": 1.0}),
    ("upscaled x1.5", "upscaled", {"chat": 1.5}),
)
SAMPLED_ROWS = (ROWS[0], ROWS[3])  # --sample: small-tuned and upscaled at temperature 1


@dataclass
class Row:
    name: str
    format: float
    facts: float
    both: float
    n: int


@dataclass
class MixingPoint:
    # "lambda" is a Python keyword: the JSON key is written by to_json
    mix: float
    answered: float
    refused: float
    n: int


@dataclass(frozen=True)
class Score:
    format: bool
    fact: bool
    refused: bool


def score_answer(world: World, entity: str, attribute: str, text: str, stopped: bool) -> Score:
    words = text.split()
    shape = ["the", attribute, "of", entity, "is"]
    form = stopped and len(words) == 7 and words[:5] == shape and words[6] == "." and words[5] in world.values[attribute]
    first_value = next((w for w in words if w in world.values[attribute]), None)
    return Score(form, first_value == world.facts[entity, attribute], " ".join(words) == REFUSAL)


def open_engine(family: Family) -> OracleEngine:
    models = {name: load_model(family.model_path(name)) for name in family.manifest["models"]}
    return OracleEngine(models, family_compositions())


def evaluate(
    family: Family,
    limit: int | None = None,
    sample: int = 0,
    progress: Callable[[str], None] = print,
    row_names: Collection[str] | None = None,
) -> dict:
    """Greedy rows (those of ROWS named in ``row_names``; None: all) over every (or the first
    ``limit``) entity, the mixing sweep, and the mean total variation between small-tuned and
    upscaled along upscaled greedy trajectories."""
    chosen = [row for row in ROWS if row_names is None or row[0] in row_names]
    engine, world = open_engine(family), family.world()
    entities = world.entities[:limit] if limit else world.entities
    questions = [(e, a) for e in entities for a in world.values]
    greedy = SamplingParams(temperature=0, max_tokens=MAX_ANSWER_TOKENS)
    rows, tv = [], []
    for name, composition, weights in chosen:
        started = time.perf_counter()
        record_tv = tv if name == "upscaled" else None
        scores = [_ask(engine, world, composition, weights, e, a, greedy, record_tv) for e, a in _bar(questions, name)]
        rows.append(_row(name, scores))
        progress(f"{name:<16} {_fmt(rows[-1])}  ({time.perf_counter() - started:.0f} s)")
    sampled = random.Random(0).sample(questions, min(sample, len(questions)))
    for name, composition, weights in SAMPLED_ROWS if sampled else ():
        scores = [_ask(engine, world, composition, weights, e, a, SamplingParams(seed=i, max_tokens=MAX_ANSWER_TOKENS)) for i, (e, a) in enumerate(sampled)]
        rows.append(_row(f"{name} (T=1)", scores))
        progress(f"{rows[-1].name:<16} {_fmt(rows[-1])}")
    mixing = mixing_sweep(engine, world, entities, family.refused_attribute, greedy)
    for point in mixing:
        progress(f"mixed lambda={point.mix:<5} answered {point.answered:5.1f}%  refused {point.refused:5.1f}%")
    return {
        "rows": [asdict(r) for r in rows],
        "mixing": [{"lambda": p.mix, "answered": p.answered, "refused": p.refused, "n": p.n} for p in mixing],
        "upscaled_small_tuned_mean_tv": sum(tv) / len(tv) if tv else None,
        "questions": len(questions),
    }


def mixing_sweep(engine, world, entities, attribute, params) -> list[MixingPoint]:
    points = []
    for mix in LAMBDAS:
        weights = {"chat": mix, "safe": 1.0 - mix}
        scores = [_ask(engine, world, "mixed", weights, e, attribute, params) for e in _bar(entities, f"mixed lambda={mix}")]
        n = len(scores)
        points.append(MixingPoint(mix, _percent(sum(s.format for s in scores), n), _percent(sum(s.refused for s in scores), n), n))
    return points


def _ask(engine, world, composition, weights, entity, attribute, params, record_tv: list | None = None) -> Score:
    messages = [{"role": "user", "content": question(entity, attribute)}]
    result = engine.generate(composition, messages, params, weights=weights, keep_logits=record_tv is not None)
    if record_tv is not None:
        record_tv.extend(_small_tuned_tv(engine, result.step_logits, weights))
    return score_answer(world, entity, attribute, result.text, result.generation.finish_reason == "stop")


def _small_tuned_tv(engine, step_logits, weights) -> list[float]:
    """Total variation between small-tuned's and the up-scaled distribution at each step."""
    composition = engine.composition("upscaled")
    vocab = engine.vocab_sizes[composition.name]
    out = []
    for logits in step_logits:
        batched = {m: t[None, None] for m, t in logits.items()}
        p = eft_logprobs(batched, composition, composition.weights(weights), vocab)[0, 0].exp()
        q = torch.softmax(logits["small-tuned"][:vocab].float(), dim=-1)
        out.append(0.5 * float((p - q).abs().sum()))
    return out


def _bar(items, label: str):
    return bar(items, desc=label, unit="q", leave=False)


def _percent(count: int, n: int) -> float:
    return round(100 * count / n, 1)


def _row(name: str, scores: list[Score]) -> Row:
    n = len(scores)
    counts = [sum(s.format for s in scores), sum(s.fact for s in scores), sum(s.format and s.fact for s in scores)]
    return Row(name, *[_percent(c, n) for c in counts], n)


def _fmt(row: Row) -> str:
    return f"format {row.format:5.1f}%  facts {row.facts:5.1f}%  both {row.both:5.1f}%  (n={row.n})"
