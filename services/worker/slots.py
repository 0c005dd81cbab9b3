"""Every session's keys and values of one hosted model, kept where a batched forward reads them.

Layout: per layer, one preallocated rectangle ``[rows, kv heads, columns, head dim]``. A
session owns a row; its tokens sit at columns ``[0, length)``, left-aligned, with nothing
before or between them. A forward over n sessions uses rows ``[0, n)``: it writes each
row's new keys and values in place at columns ``[length, length + width)`` and attends
over the first ``max(length) + width`` columns of those rows (views, no copies), under a
mask built here from the rows' lengths: causal by position, the row's real tokens only,
and the layer's sliding window where it has one (columns are positions, so the window is
exact). A step therefore costs the new tokens' work; a rollback only lowers a length.

The model's attention runs through ``_slot_attention`` (registered with transformers'
AttentionInterface) only inside ``SessionSlots.step``; transformers builds no mask for an
implementation it has no mask function for, so the mask is this module's alone.

Costs of the layout, against vLLM's paged blocks (which need an attention kernel that reads
blocks in place; gathering them in PyTorch would copy every session per step):
- memory is a rectangle, rows x the longest session: ``slots_needed`` is what the worker's
  token budget is checked against, and the allocation never exceeds that budget;
- a call's sessions must be rows ``[0, n)``: a session outside them swaps rows with one
  that is not in the call (a copy of those two sessions, not of the batch), and a released
  session's row is filled by the last row's session.
"""

import contextlib
import contextvars
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, Cache

from services.hf_compat import cache_kwargs

ATTENTION = "eft_slots"
GROWTH = 1.5  # capacity grows geometrically: a session's columns are copied O(1) times on average


@dataclass
class _Plan:
    """One forward's geometry over rows ``[0, rows)``: ``lengths`` cached before it, ``new``
    real tokens each appends, padded to ``width``; keys are read up to ``columns``."""

    lengths: torch.Tensor  # [rows]
    new: torch.Tensor  # [rows]
    width: int

    def __post_init__(self):
        self.rows, self.columns = len(self.lengths), int(self.lengths.max()) + self.width
        self.uniform = bool((self.lengths == self.lengths[0]).all())
        self.positions = self.lengths[:, None] + torch.arange(self.width, device=self.lengths.device)  # [rows, width]
        self._masks: dict[int | None, torch.Tensor] = {}

    def write(self, buffer: torch.Tensor, states: torch.Tensor) -> None:
        """Each row's new states [rows, heads, width, dim] into its columns, in place."""
        if self.uniform:
            start = int(self.lengths[0])
            buffer[: self.rows, :, start : start + self.width] = states
        else:
            rows = torch.arange(self.rows, device=states.device)[:, None]
            buffer[rows, :, self.positions] = states.transpose(1, 2)

    def mask(self, window: int | None) -> torch.Tensor:
        """[rows, 1, width, columns], True where a query attends: the row's real tokens up to
        its own position (within ``window`` of it); a padding query also sees itself, so no
        query row is empty (an empty one would be NaN, and NaN keys poison the rows later)."""
        if window not in self._masks:
            column = torch.arange(self.columns, device=self.lengths.device)
            query = self.positions[:, :, None]  # [rows, width, 1]
            real = column < (self.lengths + self.new)[:, None, None]
            seen = real & (column <= query)
            if window is not None:
                seen &= column > query - window
            self._masks[window] = (seen | (column == query))[:, None]
        return self._masks[window]


_PLAN: contextvars.ContextVar[_Plan] = contextvars.ContextVar("eft_slot_plan")


def _slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, softcap=None, **kwargs):
    """Attention over a slot cache's rows (transformers' attention-function signature); the
    mask transformers passes is None for this implementation and the running plan's is used."""
    mask = _PLAN.get().mask(sliding_window)
    if softcap is None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    else:  # Gemma 2 caps the scores before the softmax: SDPA has no such step
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        scores = softcap * torch.tanh(query @ key.transpose(2, 3) * (scaling or query.shape[-1] ** -0.5) / softcap)
        weights = scores.masked_fill(~mask, torch.finfo(scores.dtype).min).softmax(-1, dtype=torch.float32).to(query.dtype)
        out = weights @ value
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, _slot_attention)


class _SlotCache(Cache):
    """transformers' handle on the slots during one forward."""

    def __init__(self, slots: "SessionSlots", plan: _Plan):
        super().__init__(layers=[])
        self.slots, self.plan = slots, plan

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.slots._update(layer_idx, key_states, value_states, self.plan)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.plan.columns - self.plan.width


class SessionSlots:
    """One hosted model's KV cache (see the module docstring). Rows ``[0, len(owners))`` are
    held, row r by session ``owners[r]`` with ``lengths[r]`` tokens."""

    def __init__(self, model: torch.nn.Module, max_forward_tokens: int):
        self.model, self.max_forward_tokens = model, max_forward_tokens
        self.owners: list[str] = []
        self.lengths: list[int] = []
        self.row_of: dict[str, int] = {}
        self.keys: list[torch.Tensor] = []  # per layer; allocated by the first forward
        self.values: list[torch.Tensor] = []
        self.limit = 0  # token slots (rows x columns) the buffers may grow to; set by each step
        self.target = (0, 0)  # rows and columns the running step needs at most: grown to at once, not chunk by chunk

    def length(self, session_id: str) -> int:
        row = self.row_of.get(session_id)
        return 0 if row is None else self.lengths[row]

    def shape(self) -> tuple[int, int]:
        """Sessions held and the longest one's tokens: the rectangle they need."""
        return len(self.owners), max(self.lengths, default=0)

    @property
    def allocated(self) -> int:
        """Token slots allocated now (rows x columns)."""
        return self.keys[0].shape[0] * self.keys[0].shape[2] if self.keys else 0

    def truncate(self, session_id: str, length: int) -> None:
        self.lengths[self.row_of[session_id]] = length

    def release(self, session_ids) -> None:
        """Free these sessions' rows; the last rows' sessions move into the gaps."""
        for session_id in session_ids:
            row = self.row_of.get(session_id)
            if row is None:
                continue
            last = len(self.owners) - 1
            if row != last:
                self._swap(row, last)
            self.owners.pop(), self.lengths.pop()
            del self.row_of[session_id]
        if not self.owners:  # nothing held: give the memory back
            self.keys, self.values = [], []

    @torch.inference_mode()
    def step(self, session_ids: list[str], tokens: list[list[int]], keep: list[int], limit: int) -> torch.Tensor:
        """Append each session's tokens (a session may append none) and return the logits of
        its last ``keep[i]`` new positions, right-aligned: session i's are ``[i, -keep[i]:]``.
        ``limit``: token slots the buffers may grow to. Fed in chunks of
        ``max_forward_tokens // rows`` positions per row (at least one)."""
        width = min(max(len(t) for t in tokens), max(1, self.max_forward_tokens // len(tokens)))
        new = sum(s not in self.row_of for s in session_ids)
        self.limit, self.target = limit, (len(self.owners) + new, max(self.length(s) + len(t) for s, t in zip(session_ids, tokens)) + width)
        with self.undone_on_failure(session_ids):
            rows = self._arrange(session_ids)
            by_row = [None] * len(rows)
            for i, row in enumerate(rows):
                by_row[row] = i
            logits = self._chunked([tokens[i] for i in by_row], [keep[i] for i in by_row])
        return logits if rows == sorted(rows) else logits[torch.tensor(rows, device=logits.device)]

    @contextlib.contextmanager
    def undone_on_failure(self, session_ids: list[str]):
        """Within the block, steps of these sessions; if it raises, each keeps the length it
        had before it, and those it started are gone (their written columns lie past their
        lengths, unread)."""
        before = {s: self.length(s) for s in session_ids if s in self.row_of}
        try:
            yield
        except BaseException:
            for session_id, length in before.items():
                self.truncate(session_id, length)
            self.release([s for s in session_ids if s not in before])
            raise

    def _arrange(self, session_ids: list[str]) -> list[int]:
        """Give new sessions rows and make the call's sessions rows [0, n); their rows."""
        for session_id in session_ids:
            if session_id not in self.row_of:
                self.row_of[session_id] = len(self.owners)
                self.owners.append(session_id)
                self.lengths.append(0)
        n, wanted = len(session_ids), set(session_ids)
        outside = [self.row_of[s] for s in session_ids if self.row_of[s] >= n]
        strangers = [row for row in range(n) if self.owners[row] not in wanted]
        for row, free in zip(outside, strangers):
            self._swap(row, free)
        return [self.row_of[s] for s in session_ids]

    @torch.inference_mode()  # the buffers are inference tensors: changed in that mode only
    def _swap(self, a: int, b: int) -> None:
        """Exchange two rows: their sessions' keys and values move, nobody else's."""
        pair, swapped = [a, b], [b, a]
        if self.keys and max(pair) >= self.keys[0].shape[0]:  # a new session's row, past the buffers
            self.keys = [self._fit(b, max(pair) + 1, b.shape[2]) for b in self.keys]
            self.values = [self._fit(b, max(pair) + 1, b.shape[2]) for b in self.values]
        for buffer in (*self.keys, *self.values):
            buffer[pair] = buffer[swapped]
        self.owners[a], self.owners[b] = self.owners[b], self.owners[a]
        self.lengths[a], self.lengths[b] = self.lengths[b], self.lengths[a]
        self.row_of[self.owners[a]], self.row_of[self.owners[b]] = a, b

    def _chunked(self, tokens: list[list[int]], keep: list[int]) -> torch.Tensor:
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
        """One forward of rows [0, len(tokens)); logits only at each row's ``heads`` offsets,
        right-aligned (a row with fewer repeats its first on the left)."""
        rows, width, most = len(tokens), max(len(t) for t in tokens), max(len(h) for h in heads)
        device = self.model.device
        plan = _Plan(torch.tensor(self.lengths[:rows], device=device), torch.tensor([len(t) for t in tokens], device=device), width)
        ids = torch.tensor([t + [0] * (width - len(t)) for t in tokens], device=device)
        positions = plan.positions.clamp(max=self.model.config.max_position_embeddings - 1)  # only padding goes past the model
        every = list(range(width))
        index = None
        if not all(h == every for h in heads):  # not a uniform decode step: the LM head runs at the kept positions only
            index = torch.tensor([[h[0] if h else 0] * (most - len(h)) + h for h in heads], dtype=torch.long, device=device)
        with _attending(self.model, plan), _head_only_at(self.model, index):
            out = self.model(input_ids=ids, position_ids=positions, use_cache=True, **cache_kwargs(self.model, _SlotCache(self, plan)))
        for row, t in enumerate(tokens):
            self.lengths[row] += len(t)
        return out.logits

    def _update(self, layer: int, keys: torch.Tensor, values: torch.Tensor, plan: _Plan) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.keys) <= layer:
            self.keys.append(keys.new_zeros(0, keys.shape[1], 0, keys.shape[3]))
            self.values.append(values.new_zeros(0, values.shape[1], 0, values.shape[3]))
        self.keys[layer] = self._fit(self.keys[layer], plan.rows, plan.columns)
        self.values[layer] = self._fit(self.values[layer], plan.rows, plan.columns)
        plan.write(self.keys[layer], keys)
        plan.write(self.values[layer], values)
        return self.keys[layer][: plan.rows, :, : plan.columns], self.values[layer][: plan.rows, :, : plan.columns]

    def _fit(self, buffer: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
        """The buffer, grown if ``rows`` x ``columns`` does not fit it, to the running step's
        target: a dimension that is short grows geometrically (or to the target, or to this
        forward's need, where more would pass ``limit`` slots); the other shrinks to the target, since spare rows would be
        carried at every column and spare columns in every row."""
        if rows <= buffer.shape[0] and columns <= buffer.shape[2]:
            return buffer
        need = (max(rows, self.target[0]), max(columns, self.target[1]))
        have = (buffer.shape[0], buffer.shape[2])
        grown = tuple(max(n, int(h * GROWTH)) if n > h else n for n, h in zip(need, have))
        size = next((s for s in (grown, need) if s[0] * s[1] <= self.limit), (rows, columns))
        bigger = buffer.new_zeros(size[0], buffer.shape[1], size[1], buffer.shape[3])
        rows, columns = min(have[0], size[0]), min(have[1], size[1])  # past the target, nothing is held
        bigger[:rows, :, :columns] = buffer[:rows, :, :columns]
        return bigger


@contextlib.contextmanager
def _attending(model: torch.nn.Module, plan: _Plan):
    """Within the block, the model's attention is ``_slot_attention`` under ``plan``."""
    config, token = model.config, _PLAN.set(plan)
    previous = config._attn_implementation
    config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous
        _PLAN.reset(token)


@contextlib.contextmanager
def _head_only_at(model: torch.nn.Module, index: torch.Tensor | None):
    """Within the block, the model's LM head (and what its forward does after it, such as
    soft-capping) sees only the hidden states at ``index`` [rows, n] (None: all of them):
    the final projection to the vocabulary, the largest tensor of a prefill, is computed for
    those positions only. The model class stays untouched: a pre-hook on its output
    embeddings picks the positions (transformers' ``logits_to_keep`` keeps the same
    positions for every row)."""
    if index is None:
        yield
        return

    def gather(module, args):
        hidden = args[0]
        return (hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1])), *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()
