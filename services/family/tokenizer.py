"""The family's tokenizers and the prompt templates its models carry.

Tuned models render chat messages in the chat form they were tuned on; base models render
them in their native pre-training form (a question as plain text). DESIGN.md 2.3.

Two kinds (``Recipe.tokenizer``): the demo's word-level vocabulary with ``<user>`` /
``<assistant>`` turns, and a byte-level BPE (ByteLevel pre-tokenizer and decoder, as
GPT-2, Llama-3 and Qwen use) with ChatML turns, whose base models carry no chat template
and end documents with ``<|endoftext|>`` while chat turns end with ``<|im_end|>``.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from services.family.world import ASSISTANT, BOS, EOS, PAD, UNK, USER

END_OF_TEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

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


def build_byte_level_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``texts`` (every byte in its alphabet, so any text encodes);
    ``<|endoftext|>`` is the end of a document and the padding."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT, IM_START, IM_END], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT, model_input_names=["input_ids", "attention_mask"])


def with_chatml(tokenizer: PreTrainedTokenizerFast, chat: bool) -> PreTrainedTokenizerFast:
    """A tuned model's tokenizer: the ChatML template, and turns end with ``<|im_end|>``;
    a base model's: no chat template (as most base checkpoints)."""
    if chat:
        tokenizer.chat_template, tokenizer.eos_token = CHATML_TEMPLATE, IM_END
    return tokenizer


def to_chatml(document: str) -> str:
    """A family document in the byte-level family's form: ChatML turns for a chat document,
    ``<|endoftext|>`` ending a pre-training one (no BOS, as Qwen and GPT-2)."""
    if document.startswith(f"{BOS} {USER} "):
        user, assistant = document.removeprefix(f"{BOS} {USER} ").removesuffix(f" {EOS}").split(f" {ASSISTANT} ")
        return f"{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n{assistant}{IM_END}{END_OF_TEXT}"
    return document.removeprefix(f"{BOS} ").removesuffix(f" {EOS}") + END_OF_TEXT
