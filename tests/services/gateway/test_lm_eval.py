"""lm-evaluation-harness, unmodified, against the served OpenAI API: its ``local-completions``
model runs a multiple-choice task (loglikelihood: echo + logprobs over token-id prompts) and a
``generate_until`` task on ``upscaled``, both built from the quick family's world in the
test's temp folder (JSON datasets, task YAMLs, nothing from a hub). Every loglikelihood it
got is the oracle's own scoring of the same tokens, its accuracy the oracle's, and every
generation the served greedy output, which is the oracle's."""

import glob
import json
import os
import subprocess
import sys

import pytest
import requests

from eft_core import SamplingParams
from services.coordinator.engine import Engine, pools_of
from services.coordinator.scheduler import Scheduler
from services.family.compositions import family_compositions
from services.family.world import COLORS
from services.gateway.gateway import Gateway
from services.gateway.openai_api import create_app, start_http_server
from services.prompts import TokenPrompt
from services.worker.client import model_contexts
from tests.services.coordinator.helpers import scored_prompt, start_workers

COLOR_ITEMS, CAPITAL_ITEMS, MAX_GEN_TOKS = 8, 6, 6


@pytest.fixture(scope="module")
def served(quick_family, oracle, tokenizers):
    placement, _, stop_workers = start_workers(quick_family, "grpc")
    scheduler = Scheduler(Engine(pools_of(placement), oracle.vocab_sizes), max_running=8, max_waiting=64)
    gateway = Gateway(family_compositions(), tokenizers, model_contexts(placement.values()), scheduler, "upscaled")
    http, port = start_http_server(create_app(gateway), "127.0.0.1", 0)
    yield f"http://127.0.0.1:{port}"
    http.should_exit = True
    scheduler.close()
    stop_workers()


def write_tasks(folder, world) -> None:
    """A 4-way multiple choice of each entity's color (the truth at a varying index) and the
    capital of each entity to generate, as JSON lines and lm-eval task YAMLs (JSON is YAML)."""
    colors = []
    for i, entity in enumerate(world.entities[:COLOR_ITEMS]):
        truth = world.facts[entity, "color"]
        others = [c for c in COLORS if c != truth][i % 4 : i % 4 + 3]
        choices = others[: i % 4] + [truth] + others[i % 4 :]
        colors.append({"question": f"the color of {entity} is", "choices": choices, "answer": i % 4})
    capitals = [{"question": f"the capital of {e} is", "answer": world.facts[e, "capital"]} for e in world.entities[:CAPITAL_ITEMS]]
    tasks = {
        "eft_colors": (colors, {"output_type": "multiple_choice", "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}]}),
        "eft_capitals": (capitals, {"output_type": "generate_until", "doc_to_target": "{{answer}}", "generation_kwargs": {"until": ["."], "max_gen_toks": MAX_GEN_TOKS, "do_sample": False}, "metric_list": [{"metric": "exact_match", "regexes_to_ignore": [" "]}]}),  # word-level text: "reke " answers "reke"
    }
    for name, (rows, config) in tasks.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test", "doc_to_text": "{{question}}", **config}
        (folder / f"{name}.yaml").write_text(json.dumps(task))


def run_lm_eval(url: str, tokenizer_path, folder) -> tuple[dict, dict[str, list[dict]]]:
    """``lm-eval run`` with local-completions, 4 prompts a request; its results and its
    logged samples per task."""
    model_args = f"model=upscaled,base_url={url}/v1/completions,tokenizer={tokenizer_path},tokenized_requests=True,num_concurrent=1,max_retries=1,max_length=512"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(folder / "datasets"), "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", model_args, "--include_path", str(folder), "--tasks", "eft_colors,eft_capitals", "--output_path", str(folder / "out"), "--log_samples", "--seed", "1234", "--batch_size", "4"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    (results,) = glob.glob(str(folder / "out" / "**" / "results_*.json"), recursive=True)
    samples = {task: [json.loads(line) for path in glob.glob(str(folder / "out" / "**" / f"samples_{task}_*.jsonl"), recursive=True) for line in open(path)] for task in ("eft_colors", "eft_capitals")}
    return json.load(open(results)), samples


def oracle_loglikelihood(oracle, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """The oracle's scoring of the continuation's tokens after the context's, split as
    lm-eval splits them (the whole's tokens past the context's), and whether greedy
    decoding would have produced them."""
    ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    _, logprobs, scores = scored_prompt(oracle, "upscaled", TokenPrompt(tuple(whole)))
    positions = range(len(ids) - 1, len(whole) - 1)  # logprobs[i] is token i + 1's
    return sum(logprobs[i] for i in positions), all(int(scores[i].argmax()) == whole[i + 1] for i in positions)


@pytest.mark.timeout(900)
def test_lm_eval_local_completions_scores_and_generates_as_the_oracle(served, oracle, tokenizers, quick_family, tmp_path):
    write_tasks(tmp_path, quick_family.world())
    results, samples = run_lm_eval(served, quick_family.model_path("large-base"), tmp_path)
    tokenizer = tokenizers["large-base"]
    assert len(samples["eft_colors"]) == COLOR_ITEMS and len(samples["eft_capitals"]) == CAPITAL_ITEMS
    correct, largest = [], 0.0
    for sample in samples["eft_colors"]:
        served_scores = [(float(score), str(greedy) == "True") for score, greedy in sample["filtered_resps"]]  # per choice; the log holds them as text
        expected = [oracle_loglikelihood(oracle, tokenizer, context, continuation) for context, continuation in _arguments(sample)]
        assert [g for _, g in served_scores] == [g for _, g in expected], sample
        assert [s for s, _ in served_scores] == pytest.approx([s for s, _ in expected], abs=1e-4), sample
        largest = max([largest] + [abs(a[0] - b[0]) for a, b in zip(served_scores, expected)])
        correct.append(max(range(len(expected)), key=lambda i: expected[i][0]) == sample["doc"]["answer"])
    accuracy = results["results"]["eft_colors"]["acc,none"]
    assert accuracy == pytest.approx(sum(correct) / len(correct))
    matches = []
    for sample in samples["eft_capitals"]:
        context = _arguments(sample)[0][0]
        ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        reply = requests.post(f"{served}/v1/completions", json={"model": "upscaled", "prompt": [ids], "max_tokens": MAX_GEN_TOKS, "temperature": 0, "stop": ["."]}, timeout=60).json()
        want = oracle.generate("upscaled", TokenPrompt(tuple(ids)), SamplingParams(temperature=0, max_tokens=MAX_GEN_TOKS)).text.split(".")[0]
        assert sample["filtered_resps"][0] == reply["choices"][0]["text"] == want, sample
        matches.append(want.replace(" ", "") == sample["doc"]["answer"])
    assert results["results"]["eft_capitals"]["exact_match,none"] == pytest.approx(sum(matches) / len(matches))
    print(f"lm-eval on upscaled: eft_colors acc {accuracy:.3f} (oracle {sum(correct) / len(correct):.3f}, largest loglikelihood difference {largest:.2e}); eft_capitals exact_match {results['results']['eft_capitals']['exact_match,none']:.3f} (oracle {sum(matches) / len(matches):.3f})")


def _arguments(sample: dict) -> list[tuple]:
    """A logged sample's request arguments, one tuple per request (lm-eval logs them as
    {"gen_args_i": {"arg_0": ..., "arg_1": ...}} or as lists)."""
    arguments = sample["arguments"]
    if isinstance(arguments, dict):
        return [tuple(a.values()) for a in arguments.values()]
    return [tuple(a) for a in arguments]
