from types import SimpleNamespace

import pytest
import yaml
from pydantic import ValidationError
from transformers import AutoTokenizer

from cluster.config import ServeConfig, demo_config, load_config, load_tokenizers


def demo_dict(family) -> dict:
    return demo_config(family.path).model_dump()


def test_the_demo_config_round_trips_through_yaml(quick_family, tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(demo_dict(quick_family)))
    config = load_config(path)
    assert config == demo_config(quick_family.path)
    assert config.default_composition == "upscaled" and [g.name for g in config.worker_groups] == ["base", "pair"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(grpc_prot=1), "grpc_prot"),  # a typo'd key
        (lambda d: d["limits"].update(max_tokenz=3), "max_tokenz"),
        (lambda d: d["models"]["large-base"].update(dtyp="float16"), "dtyp"),
        (lambda d: d["compositions"][0].update(base="huge-base"), "compositions[0].base: unknown model 'huge-base'"),
        (lambda d: d["compositions"][4]["deltas"][1].update(tuned="small-unsafe"), "compositions[4].deltas[1].tuned: unknown model 'small-unsafe'"),
        (lambda d: d["worker_groups"][1]["models"].remove("small-safe"), "models.small-safe: must be in exactly one worker group, is in 0"),
        (lambda d: d.update(default_composition="nope"), "default_composition: no composition 'nope'"),
        (lambda d: d["compositions"].append(dict(d["compositions"][0])), "compositions[5].name: duplicate 'upscaled'"),
        (lambda d: d["models"]["large-base"].update(dtype="float8"), "dtype"),
        (lambda d: d["worker_groups"][0].update(tp=2), "worker_groups[0].tp: a tensor-parallel group hosts exactly one model"),
        (lambda d: d["worker_groups"][1].update(replicas=0), "worker_groups.1.replicas"),
        (lambda d: d["models"]["small-tuned"].update(chat_template="{% for m in messages %}"), "models.small-tuned.chat_template"),
        (lambda d: d.update(decide_device="cuda"), "decide_device: cuda needs a GPU for the gateway replica: set gateway_num_gpus > 0"),
        (lambda d: d.update(decide_device="gpu"), "decide_device"),
        (lambda d: d["worker_groups"][1].update(autoscaling={"min_replicas": 1, "max_replica": 2}), "worker_groups.1.autoscaling\n  Value error, unknown Ray Serve autoscaling_config keys ['max_replica']"),
        (lambda d: d["worker_groups"][1].update(autoscaling={"min_replicas": 3, "max_replicas": 2}), "worker_groups.1.autoscaling\n  Value error, max_replicas .2. must be greater than or equal to min_replicas"),
        (lambda d: d["worker_groups"][1].update(replicas=2, autoscaling={"max_replicas": 2}), "replicas: set either replicas or autoscaling"),
        (lambda d: d["worker_groups"][1].update(autoscaling={"max_replicas": 2, "policy": {"policy_function": "x:y"}}), "policy: the autoscaling policy is set here, by the sessions replicas report"),
        (lambda d: d.update(gateway_replicas=0), "gateway_replicas"),
        (lambda d: d.update(gateway_autoscaling={"min_replicas": 1, "max_replica": 2}), "gateway_autoscaling\n  Value error, unknown Ray Serve autoscaling_config keys ['max_replica']"),
        (lambda d: d.update(gateway_replicas=2, gateway_autoscaling={"max_replicas": 2}), "gateway_replicas: set either gateway_replicas or gateway_autoscaling"),
        (lambda d: d.update(gateway_autoscaling={"max_replicas": 2, "policy": {"policy_function": "x:y"}}), "policy: the autoscaling policy is set here, by the requests replicas report"),
    ],
)
def test_bad_configs_fail_at_load_with_a_precise_message(quick_family, edit, message):
    data = demo_dict(quick_family)
    edit(data)
    with pytest.raises(ValidationError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        ServeConfig.model_validate(data)


def test_mismatched_tokenizers_are_refused_naming_both_models(quick_family, tmp_path):
    odd = tmp_path / "small-odd"
    tokenizer = AutoTokenizer.from_pretrained(quick_family.model_path("small-tuned"))
    tokenizer.add_tokens(["a-word-the-others-lack"])
    tokenizer.save_pretrained(odd)
    data = demo_dict(quick_family)
    data["models"]["small-tuned"]["path"] = str(odd)
    with pytest.raises(ValueError, match=r"compositions\['upscaled'\]: 'small-tuned' and 'large-base' have different tokenizers"):
        load_tokenizers(ServeConfig.model_validate(data))
    load_tokenizers(demo_config(quick_family.path))  # the real family passes


def test_compositions_of_different_tokenizer_families_are_served_together(quick_family, bpe_family):
    data = demo_dict(quick_family)
    data["models"] |= {f"bpe-{n}": {"path": str(bpe_family.model_path(n))} for n in ("large-base", "small-base", "small-tuned")}
    data["worker_groups"].append({"name": "bpe", "models": ["bpe-large-base", "bpe-small-base", "bpe-small-tuned"]})
    data["compositions"].append({"name": "bpe-upscaled", "base": "bpe-large-base", "deltas": [{"name": "chat", "tuned": "bpe-small-tuned", "reference": "bpe-small-base"}]})
    tokenizers = load_tokenizers(ServeConfig.model_validate(data))  # was refused at start: one tokenizer for the deployment
    assert len(tokenizers["bpe-large-base"]) != len(tokenizers["large-base"])
    data["compositions"][-1]["deltas"][0]["reference"] = "small-base"  # mixing the families inside one composition
    with pytest.raises(ValueError, match=r"compositions\['bpe-upscaled'\]: 'small-base' and 'bpe-large-base' have different tokenizers"):
        load_tokenizers(ServeConfig.model_validate(data))


@pytest.mark.parametrize(
    "template",
    [
        "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}",  # transformers' own extension
        "{% for m in messages %}{{ m['content'] }}{% if loop.index == 1 %}{% break %}{% endif %}{% endfor %}",  # loop controls
    ],
)
def test_chat_templates_that_apply_chat_template_renders_are_accepted(quick_family, template):
    data = demo_dict(quick_family)
    data["models"]["small-tuned"]["chat_template"] = template
    assert "hello" in load_tokenizers(ServeConfig.model_validate(data))["small-tuned"].apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False)


def test_a_chat_template_that_does_not_render_fails_at_load_naming_it(quick_family):
    data = demo_dict(quick_family)
    data["models"]["small-tuned"]["chat_template"] = "{{ raise_exception('system messages only') }}"
    with pytest.raises(ValueError, match=r"models.small-tuned.chat_template: the chat template does not render a one-message chat: .*system messages only"):
        load_tokenizers(ServeConfig.model_validate(data))


def test_a_chat_template_in_the_config_overrides_the_model_folders(quick_family):
    from services.prompts import render_prompt

    messages = [{"role": "user", "content": "what is the color of zeme ?"}]
    plain = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    data = demo_dict(quick_family)
    folder = load_tokenizers(ServeConfig.model_validate(data))["small-tuned"]
    data["models"]["small-tuned"]["chat_template"] = plain
    overridden = load_tokenizers(ServeConfig.model_validate(data))["small-tuned"]
    assert render_prompt(overridden, messages) == overridden(messages[0]["content"], add_special_tokens=False)["input_ids"]
    assert render_prompt(folder, messages) != render_prompt(overridden, messages)


def test_autoscaled_deployments_ask_for_replicas_by_the_load_their_replicas_report(quick_family):
    """Gateways scale by the requests they have admitted, worker groups by the sessions
    they hold: Serve's own request counts see neither (clients and coordinators call over
    gRPC and HTTP). Serve builds the policy from its import path with the kwargs."""
    from ray.serve._private.build_app import build_app as serve_build

    from cluster.app import build_app

    data = demo_dict(quick_family)
    data["gateway_autoscaling"] = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 16}
    data["worker_groups"][1]["autoscaling"] = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 64}
    built = serve_build(build_app(ServeConfig.model_validate(data)), name="eft")
    policies = {d.name: d._deployment_config.autoscaling_config and d._deployment_config.autoscaling_config.policy for d in built.deployments}
    assert policies["worker-base"] is None  # a fixed group
    assert policies["gateway"].policy_kwargs == {"metric": "requests"} and policies["worker-pair"].policy_kwargs == {"metric": "sessions"}
    for name, reported, target, replicas in [("gateway", {"a": 20.0, "b": 13.0}, 16, 3), ("worker-pair", {"a": 64.0}, 64, 1), ("gateway", {}, 16, 0)]:
        policy = policies[name].get_policy()(**policies[name].policy_kwargs)
        context = SimpleNamespace(aggregated_metrics={policies[name].policy_kwargs["metric"]: reported}, config=SimpleNamespace(target_ongoing_requests=target), policy_state={})
        assert policy(context) == (replicas, {})  # (Serve then holds it within min and max)
