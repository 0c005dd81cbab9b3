"""Generated tokens to streamed text: the one place text is assembled (gRPC stream, unary,
HTTP stream and non-stream all use it).

Terms, used in every name below:

- **committed** text: decoded from ``tokens[:read]`` and final. Two offsets into the token
  list keep decoding incremental (TGI's ``decode_token``): each new token decodes
  ``tokens[prefix:]`` and the text past ``decode(tokens[prefix:read])`` is new. A window
  that ends in U+FFFD ends in half a character (byte-level BPE splits characters over
  tokens), so nothing is committed until a later token completes it.
- **pending** text: the complete characters of an uncommitted window (its trailing U+FFFD
  stripped). Stop strings are looked for in unsent committed + pending text, so a token that
  completes a stop ends the text even when it also starts a half character.
- **held** text: committed but not sent, because it could be the start of a stop string
  (its longest suffix that is a prefix of one); sent once it cannot be, or at the end.

Invariant (tests/services/gateway/test_text.py): what a client concatenates equals
``tokenizer.decode(tokens, skip_special_tokens=True)`` of the kept tokens, cut right before
the first occurrence of any stop string; the kept tokens end with the one that completed
the stop (those after it are dropped, and not counted). Stop strings match complete
characters only: one holding U+FFFD never matches a half character.
"""

from collections.abc import Sequence

REPLACEMENT = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence


class TextStream:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.tokens: list[int] = []  # the kept tokens
        self.prefix = self.read = 0  # token offsets (module docstring)
        self.prefix_text = ""  # decode(tokens[prefix:read])
        self.held = ""  # committed text not returned yet (only this is kept: sent text is gone)
        self.stopped = False  # a stop string ended the text

    def add(self, tokens: Sequence[int]) -> tuple[str, int]:
        """Feed generated tokens; returns the text to send now and how many of ``tokens``
        are kept (all, unless a stop string ended among them)."""
        kept = 0
        for token in tokens:
            if self.stopped:
                break
            self.tokens.append(token)
            kept += 1
            self._cut_at_stop(self._decode(final=False))
        return self._release(), kept

    def finish(self) -> str:
        """At the end of generation: the rest of the text (what was held, and a trailing
        half character as the decoder renders it)."""
        if not self.stopped:
            self._cut_at_stop(self._decode(final=True))
        return self._release(everything=True)

    def _decode(self, final: bool) -> str:
        """Commit what the new tokens complete; returns the pending text."""
        window = self._text_of(self.tokens[self.prefix :])
        new = window[len(self.prefix_text) :] if len(window) > len(self.prefix_text) else ""
        if not new or (new.endswith(REPLACEMENT) and not final):
            return new.rstrip(REPLACEMENT)
        self.held += new
        self.prefix, self.read = self.read, len(self.tokens)
        self.prefix_text = self._text_of(self.tokens[self.prefix : self.read])
        return ""

    def _cut_at_stop(self, pending: str) -> None:
        """End the text before the first stop string in held + pending text. No stop can
        start in text already sent: text that could start one is held."""
        if not self.stop:
            return
        visible = self.held + pending
        found = [i for i in (visible.find(s) for s in self.stop) if i >= 0]
        if found:
            self.held, self.stopped = visible[: min(found)], True

    def _release(self, everything: bool = False) -> str:
        end = len(self.held) - (0 if everything or self.stopped else self._stop_prefix_length())
        text, self.held = self.held[:end], self.held[end:]
        return text

    def _stop_prefix_length(self) -> int:
        """Length of the longest suffix of held text that is a proper prefix of a stop string."""
        for n in range(min(len(self.held), max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            tail = self.held[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def _text_of(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)
