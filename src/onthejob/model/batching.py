"""Continuous batching on the fast decoder: sequences join and leave between decode steps, so
concurrent requests share every step instead of waiting for each other's whole answers.

Layout: every row's keys and values sit in one cache per layer, (rows, kv heads, columns,
dim), aligned on the right: the next token of every row is written at the same column, each
row's prompt ends just before it, and `valid` says which columns a row may attend to. A row
that joins is prefilled alone (batch 1) and its cache copied in; when its prompt is longer
than the columns before the write position, every row is padded on the left. Rotary positions
are each row's own, so padding changes nothing it computes; masked columns get exactly zero
attention weight. Columns no live row uses any more are trimmed from the left.

One DecodeBatch serves one adapter state (its decoder's merged weights): rows with different
adapters go to different batches, which the server's worker steps in turn. Each row has its
own sampling parameters and seeded generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from onthejob.model.decoder import FastDecoder
from onthejob.model.generate import (
    Completion,
    RowText,
    SamplingParams,
    check_fits,
    pick_tokens,
    top_row,
)
from onthejob.model.load import LoadedModel

GROW = 64  # columns added (or trimmed) at a time


@dataclass
class _Live:
    tag: Any
    text: RowText
    gen: torch.Generator | None
    position: int  # rotary position of the row's next token
    logits: torch.Tensor  # (vocab,) distribution of the row's next token


@dataclass
class Event:
    """What one step did for one row: the text piece it decoded (may be None) and, when the row
    ended, its Completion (the row has then left the batch)."""

    tag: Any
    piece: str | None
    completion: Completion | None


class DecodeBatch:
    """Rows that join (`add`) and leave between decode steps (`step`, `drop`)."""

    def __init__(self, lm: LoadedModel, decoder: FastDecoder) -> None:
        self.lm, self.decoder = lm, decoder
        self.rows: list[_Live] = []
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.valid = torch.zeros(0, 0, dtype=torch.bool)
        self.column = 0  # where every row's next token is written

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        return self.valid.shape[1]

    @torch.no_grad()
    def add(self, prompt: Sequence[int], params: SamplingParams, tag: Any) -> None:
        """Prefill `prompt` alone and seat it; its first token is sampled at the next step.
        Raises ValueError (ContextLengthError) for a prompt that does not fit, changing nothing."""
        params.validate()
        if not prompt:
            raise ValueError("a prompt has no tokens")
        check_fits(self.lm, len(prompt), params.max_tokens)
        n = len(prompt)
        d = self.decoder
        device = d.embed.device
        one = d.new_cache(1, n)
        causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()[None, None]
        ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
        with torch.autocast(device.type, enabled=False):
            logits = d.forward(ids, torch.arange(n, device=device)[None], one, 0, causal)[0]
        if not self.rows:
            self.cache = [(k[:0, :, :0], v[:0, :, :0]) for k, v in one]
            self.valid = torch.zeros(0, 0, dtype=torch.bool, device=device)
            self.column = n
        if self.column < n:
            self._pad_left(n - self.column)
        self._ensure(self.column + 1)
        c, w = self.column, self.width
        row_valid = torch.zeros(1, w, dtype=torch.bool, device=device)
        row_valid[0, c - n:c] = True
        merged = []
        for (k, v), (k1, v1) in zip(self.cache, one, strict=True):
            kr = k1.new_zeros(1, k1.shape[1], w, k1.shape[3])
            vr = torch.zeros_like(kr)
            kr[:, :, c - n:c], vr[:, :, c - n:c] = k1, v1
            merged.append((torch.cat([k, kr]), torch.cat([v, vr])))
        self.cache = merged
        self.valid = torch.cat([self.valid, row_valid])
        gen = None
        if params.seed is not None and params.temperature > 0:
            gen = torch.Generator(device=device).manual_seed(params.seed)
        self.rows.append(_Live(tag, RowText(self.lm.tokenizer, prompt, params), gen, n, logits))

    def drop(self, tag: Any, reason: str = "cancelled") -> Completion | None:
        """Take the row tagged `tag` out; its Completion (text: what it had sent) or None."""
        for i, row in enumerate(self.rows):
            if row.tag is tag:
                self._keep([j for j in range(len(self.rows)) if j != i])
                return row.text.finish(reason)[1]
        return None

    @torch.no_grad()
    def step(self) -> list[Event]:
        """Sample every row's next token, let ended rows leave, and run one decode step for the
        rest (a single forward pass over all of them)."""
        events, tokens, ended = [], [], []
        for i, row in enumerate(self.rows):
            params = row.text.params
            logits = row.logits[None]
            token = pick_tokens(logits, params, row.gen)
            all_logprobs = torch.log_softmax(logits, dim=-1)
            top = top_row(all_logprobs.topk(params.top_logprobs, dim=-1), 0) \
                if params.top_logprobs else None
            t = int(token[0])
            piece = row.text.push(t, float(all_logprobs[0, t]), top)
            completion = None
            if row.text.done:
                tail, completion = row.text.finish()
                piece = (piece or "") + (tail or "") or None
                ended.append(i)
            events.append(Event(row.tag, piece, completion))
            tokens.append(t)
        if ended:
            keep = [i for i in range(len(self.rows)) if i not in ended]
            tokens = [tokens[i] for i in keep]
            self._keep(keep)
        if self.rows:
            self._forward(tokens)
        return events

    # -- the cache ---------------------------------------------------------------------------
    def _forward(self, tokens: list[int]) -> None:
        device = self.decoder.embed.device
        self._ensure(self.column + 1)
        c = self.column
        self.valid[:, c] = True
        ids = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]
        positions = torch.tensor([r.position for r in self.rows], device=device)[:, None]
        with torch.autocast(device.type, enabled=False):
            logits = self.decoder.forward(ids, positions, self.cache, c,
                                          self.valid[:, None, None, : c + 1])
        for row, row_logits in zip(self.rows, logits, strict=True):
            row.logits = row_logits
            row.position += 1
        self.column += 1

    def _keep(self, keep: list[int]) -> None:
        if not keep:
            self.rows, self.cache = [], []
            self.valid = torch.zeros(0, 0, dtype=torch.bool)
            self.column = 0
            return
        index = torch.tensor(keep, dtype=torch.long)
        self.rows = [self.rows[i] for i in keep]
        self.cache = [(k[index], v[index]) for k, v in self.cache]
        self.valid = self.valid[index]
        used = self.valid[:, : self.column].any(0)
        first = int(used.nonzero()[0]) if bool(used.any()) else self.column
        if first >= GROW:  # columns no live row attends to any more
            self.cache = [(k[:, :, first:].clone(), v[:, :, first:].clone()) for k, v in self.cache]
            self.valid = self.valid[:, first:].clone()
            self.column -= first

    def _ensure(self, columns: int) -> None:
        if self.width >= columns:
            return
        extra = max(GROW, columns - self.width)
        self.cache = [(torch.cat([k, k.new_zeros(*k.shape[:2], extra, k.shape[3])], 2),
                       torch.cat([v, v.new_zeros(*v.shape[:2], extra, v.shape[3])], 2))
                      for k, v in self.cache]
        self.valid = torch.cat([self.valid, self.valid.new_zeros(self.valid.shape[0], extra)], 1)

    def _pad_left(self, n: int) -> None:
        self.cache = [(torch.cat([k.new_zeros(*k.shape[:2], n, k.shape[3]), k], 2),
                       torch.cat([v.new_zeros(*v.shape[:2], n, v.shape[3]), v], 2))
                      for k, v in self.cache]
        self.valid = torch.cat([self.valid.new_zeros(self.valid.shape[0], n), self.valid], 1)
        self.column += n
