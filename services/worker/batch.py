"""Stepping sessions of different lengths in one forward pass.

Technique ("pad and stack"): each session keeps its own keys and values. For a call, the
sessions' caches are left-padded to one length and stacked into one batch cache; new tokens
are right-padded; a 2-D attention mask hides every padding column and explicit position ids
keep each session's own positions (so rotary embeddings are unaffected by padding). After
the call each session takes back exactly its real columns.

Cost: one copy of the participating caches per call (not per decode step: a Draft call
steps the same batch k times). Simple, exact, and independent of the model class; a
slot-based persistent batch cache (vLLM's paged blocks) would avoid the copy.

Memory: a step is fed in chunks of at most ``max_forward_tokens`` positions (rows x width,
padding included), and the LM head runs only on the positions whose logits are kept, so a
long prompt among short rows costs neither rows x prompt activations nor rows x prompt x
vocabulary logits.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.hf_compat import cache_kwargs, full_cache


@dataclass
class SessionKV:
    """One session's cache for one model: per layer keys and values ``[1, heads, length, dim]``."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def truncated(self, length: int) -> "SessionKV":
        return SessionKV([k[:, :, :length] for k in self.keys], [v[:, :, :length] for v in self.values])


class PaddedBatch:
    """Sessions stepped together; see the module docstring."""

    def __init__(self, model: torch.nn.Module, pasts: list[SessionKV | None], max_forward_tokens: int):
        self.model, self.max_forward_tokens = model, max_forward_tokens
        self._stack(pasts)

    def _stack(self, pasts: list[SessionKV | None]) -> None:
        device = self.model.device
        self.lengths = [kv.length if kv else 0 for kv in pasts]  # real tokens per row
        longest = max(self.lengths)
        self.cache = full_cache()
        self.mask = torch.tensor([[0] * (longest - n) + [1] * n for n in self.lengths], dtype=torch.long, device=device)
        if longest:
            like = next(kv for kv in pasts if kv and kv.length)  # shapes for the new sessions' padding
            for layer in range(len(like.keys)):
                keys = torch.cat([_left_pad(kv and kv.keys[layer], n, longest, like.keys[layer]) for kv, n in zip(pasts, self.lengths)])
                values = torch.cat([_left_pad(kv and kv.values[layer], n, longest, like.values[layer]) for kv, n in zip(pasts, self.lengths)])
                self.cache.update(keys, values, layer)

    @torch.inference_mode()
    def step(self, tokens: list[list[int]], keep: list[int]) -> torch.Tensor:  # [rows, max(keep), padded vocab]
        """Append each row's tokens (a row may append none) and return the logits of its last
        ``keep[row]`` new positions, right-aligned: row r's are ``[r, -keep[r]:]``.
        Fed in chunks of ``max_forward_tokens // rows`` positions per row (at least one)."""
        rows, width = len(tokens), max(1, self.max_forward_tokens // len(tokens))
        kept = [range(len(t) - k, len(t)) for t, k in zip(tokens, keep)]  # positions within each row's new tokens
        longest = max(len(t) for t in tokens)
        if longest <= width:  # one forward: its logits are the answer
            return self._forward(tokens, [list(positions) for positions in kept])
        out = None
        for start in range(0, longest, width):
            here = [[p - start for p in positions if start <= p < start + width] for positions in kept]
            logits = self._forward([t[start : start + width] for t in tokens], here)
            if out is None:
                out = logits.new_zeros(rows, max(keep), logits.shape[-1])
            for row, (positions, offsets) in enumerate(zip(kept, here)):
                if offsets:  # slot of the row's first kept position in this chunk, counted from the right
                    first = out.shape[1] - len(positions) + offsets[0] + start - positions.start
                    out[row, first : first + len(offsets)] = logits[row, logits.shape[1] - len(offsets) :]
        return out

    def _forward(self, tokens: list[list[int]], heads: list[list[int]]) -> torch.Tensor:  # [rows, most heads, padded vocab]
        """One forward of each row's tokens; logits only at each row's ``heads`` offsets,
        right-aligned (a row with fewer repeats its first on the left)."""
        width, most = max(len(t) for t in tokens), max(len(h) for h in heads)
        device = self.model.device
        ids = torch.tensor([t + [0] * (width - len(t)) for t in tokens], device=device)
        new_mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in tokens], device=device)
        self.mask = torch.cat([self.mask, new_mask], dim=1)
        positions = torch.tensor([[n + j for j in range(width)] for n in self.lengths], device=device)
        every = list(range(width))
        if all(h == every for h in heads):  # every position of every row (a uniform decode step): nothing to pick
            out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True, **cache_kwargs(self.model, self.cache))
        else:
            index = torch.tensor([[h[0] if h else 0] * (most - len(h)) + h for h in heads], dtype=torch.long, device=device)
            with _head_only_at(self.model, index):
                out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True, **cache_kwargs(self.model, self.cache))
        self.lengths = [n + len(t) for n, t in zip(self.lengths, tokens)]
        return out.logits

    def compact(self) -> None:
        """Stack the rows again without the padding columns a ragged step left between their
        real ones. Padding inside a row is masked and harmless, except to a sliding window:
        transformers measures the window in cache columns, not positions."""
        self._stack([self.session_kv(row) for row in range(len(self.lengths))])

    def session_kv(self, row: int) -> SessionKV:
        """The row's real keys and values, without padding columns."""
        columns = self.mask[row].nonzero().flatten()
        layers = self.cache.layers
        return SessionKV([layer.keys[row : row + 1, :, columns] for layer in layers], [layer.values[row : row + 1, :, columns] for layer in layers])


@contextmanager
def _head_only_at(model: torch.nn.Module, index: torch.Tensor):
    """Within the block, the model's LM head (and what its forward does after it, such as
    soft-capping) sees only the hidden states at ``index`` [rows, n]: the final projection
    to the vocabulary, the largest tensor of a prefill, is computed for those positions only.
    The model class stays untouched: a pre-hook on its output embeddings picks the positions
    (transformers' ``logits_to_keep`` keeps the same positions for every row)."""

    def gather(module, args):
        hidden = args[0]
        return (hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1])), *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def _left_pad(tensor: torch.Tensor | None, length: int, longest: int, like: torch.Tensor) -> torch.Tensor:
    if tensor is None:  # a new session: all padding, shaped like the others
        return like.new_zeros(1, like.shape[1], longest, like.shape[3])
    return F.pad(tensor, (0, 0, longest - length, 0))
