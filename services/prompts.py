"""Prompts per model (DESIGN.md 2.3): each model renders chat messages with its own
template; a plain text prompt is tokenised the same for every model. Generated tokens are
then appended to every model's prefix alike.

Also the tokenizer fingerprint: models of one composition must share one token-to-id map.
"""

import hashlib
import json
from collections.abc import Mapping, Sequence

from eft_core.errors import InvalidArgumentError, require

ROLES = ("system", "user", "assistant")
Prompt = str | Sequence[Mapping[str, str]]  # plain text, or chat messages {"role", "content"}


def render_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of ``prompt`` for the model whose tokenizer (and template) this is."""
    if isinstance(prompt, str):
        require(prompt != "", "prompt", "must not be empty")
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        return bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    messages = validate_messages(prompt)
    require(tokenizer.chat_template is not None, "messages", "this model has no chat template: send a plain text prompt")
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(rendered["input_ids"] if isinstance(rendered, Mapping) else rendered)


def validate_messages(messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    require(len(messages) > 0, "messages", "must hold at least one message")
    out = []
    for i, message in enumerate(messages):
        require(isinstance(message, Mapping), f"messages[{i}]", "must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        require(role in ROLES, f"messages[{i}].role", f"must be one of {ROLES}, got {role!r}")
        require(isinstance(content, str), f"messages[{i}].content", "must be a string")
        out.append({"role": role, "content": content})
    return out


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the token-to-id map: equal fingerprints, same tokenizer for EFT's purposes."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def check_shared_tokenizer(tokenizers: Mapping[str, object]) -> int:
    """Refuse models whose token-to-id maps differ; returns the shared vocabulary size."""
    fingerprints = {name: tokenizer_fingerprint(t) for name, t in tokenizers.items()}
    first = next(iter(fingerprints))
    for name, fingerprint in fingerprints.items():
        if fingerprint != fingerprints[first]:
            raise InvalidArgumentError(
                f"tokenizer of {name!r} differs from that of {first!r} (fingerprints {fingerprint} vs {fingerprints[first]}): "
                "all models of a composition must share one tokenizer",
                field=f"models[{name!r}].tokenizer",
            )
    return len(tokenizers[first])
