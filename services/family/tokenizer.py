"""The family's word-level tokenizer and the two prompt templates its models carry.

Tuned models render chat messages in the chat form they were tuned on; base models render
them in their native pre-training form (a question as plain text). DESIGN.md 2.3.
"""

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from services.family.world import ASSISTANT, BOS, EOS, PAD, UNK, USER

SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, USER, ASSISTANT)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %} <user> {{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %} <assistant> {{ message['content'] }} {{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} <assistant>{% endif %}"
)
# A base model never saw <user>/<assistant>: the conversation becomes plain text.
PLAIN_TEMPLATE = "{{ bos_token }}{% for message in messages %} {{ message['content'] }}{% endfor %}"


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Word-level vocabulary of every word in ``texts``; special tokens first, ids stable."""
    words = sorted({w for text in texts for w in text.split()} - set(SPECIAL_TOKENS))
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT],
        model_input_names=["input_ids", "attention_mask"],
    )


def with_template(tokenizer: PreTrainedTokenizerFast, chat: bool) -> PreTrainedTokenizerFast:
    tokenizer.chat_template = CHAT_TEMPLATE if chat else PLAIN_TEMPLATE
    return tokenizer
