"""Prompts per model (DESIGN.md 2.3): each model renders chat messages with its own
template; a plain text prompt is tokenised the same for every model, and token ids
(``TokenPrompt``) are given to each as they are. Generated tokens are
then appended to every model's prefix alike.

A model without a chat template (most base checkpoints) sees a chat as plain text: the
messages' contents joined by a blank line (``PLAIN_CHAT_SEPARATOR``), with its BOS token if
it has one, as a plain prompt would be. ``models.<name>.chat_template`` in the serving
config gives it any other rendering.

Also the tokenizer rules: models of one composition must share one token-to-id map
(compositions may differ), and a composition stops at the end-of-sequence token of any of
its models (a chat model ends its turn with its own, e.g. ``<|im_end|>``).
"""

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from eft_core import Composition
from eft_core.errors import InvalidArgumentError, require

ROLES = ("system", "user", "assistant")
@dataclass(frozen=True)
class TokenPrompt:
    """A prompt given as token ids: every model of a composition (one tokenizer) sees them as
    they are, with no template and no BOS added."""

    ids: tuple[int, ...]


Prompt = str | Sequence[Mapping[str, str]] | TokenPrompt  # plain text, chat messages {"role", "content"}, or token ids
PLAIN_CHAT_SEPARATOR = "\n\n"


def render_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of ``prompt`` for the model whose tokenizer (and template) this is."""
    if isinstance(prompt, TokenPrompt):
        require(len(prompt.ids) > 0, "tokens.ids", "must not be empty")
        require_in_vocabulary(tokenizer, prompt.ids, "tokens.ids")
        return list(prompt.ids)
    if isinstance(prompt, str):
        require(prompt != "", "prompt", "must not be empty")
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        return bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    messages = validate_messages(prompt)
    if tokenizer.chat_template is None:
        text = PLAIN_CHAT_SEPARATOR.join(m["content"] for m in messages)
        require(text != "", "messages", "every content is empty, and a model without a chat template sees only the contents")
        return render_prompt(tokenizer, text)
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(rendered["input_ids"] if isinstance(rendered, Mapping) else rendered)


def check_chat_template(tokenizer, field: str) -> None:
    """Refuse, at load, a chat template that cannot render a one-message chat (it compiles
    as transformers compiles it, then renders through ``apply_chat_template``)."""
    if tokenizer.chat_template is None:
        return
    try:
        render_prompt(tokenizer, [{"role": "user", "content": "hello"}])
    except Exception as error:  # jinja2's syntax and render errors, raise_exception() in templates
        raise InvalidArgumentError(f"the chat template does not render a one-message chat: {type(error).__name__}: {error}", field=field) from None


def require_in_vocabulary(tokenizer, token_ids: Sequence[int], field: str) -> None:
    """Each id one of the tokenizer's, else INVALID_ARGUMENT naming ``field[i]``."""
    for i, token in enumerate(token_ids):
        require(0 <= token < len(tokenizer), f"{field}[{i}]", f"{token} is not in the vocabulary (0 to {len(tokenizer) - 1})")


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


def composition_vocab_sizes(compositions: Iterable[Composition], tokenizers: Mapping[str, object]) -> dict[str, int]:
    """The vocabulary each composition's models share (by composition name). A composition
    whose models' token-to-id maps differ is refused naming both models."""
    fingerprints = {name: tokenizer_fingerprint(t) for name, t in tokenizers.items()}
    sizes = {}
    for composition in compositions:
        for model in composition.models:
            if fingerprints[model] != fingerprints[composition.base]:
                raise InvalidArgumentError(
                    f"{model!r} and {composition.base!r} have different tokenizers (fingerprints {fingerprints[model]} vs "
                    f"{fingerprints[composition.base]}): all models of a composition must share one",
                    field=f"compositions[{composition.name!r}]",
                )
        sizes[composition.name] = len(tokenizers[composition.base])
    return sizes


def stop_token_ids(tokenizers: Mapping[str, object], composition: Composition) -> tuple[int, ...]:
    """The end-of-sequence ids of the composition's models (a base ends a document with one,
    a chat model its turn with another)."""
    ids = (tokenizers[m].eos_token_id for m in composition.models)
    return tuple(dict.fromkeys(i for i in ids if i is not None))
