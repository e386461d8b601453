"""The one generation path: batched, KV-cached decoding that returns token ids and their
log-probabilities. Greedy when temperature is 0, else temperature / top-p sampling."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from onthejob.model.chat import end_of_turn_ids
from onthejob.model.decoder import FastDecoder, decoder_for, unsupported
from onthejob.model.load import LoadedModel

# Prompts of one batch sharing at least this many leading tokens have them encoded once.
SHARED_MIN = 32
# The most alternatives a completion keeps per token (OPSD's teacher keeps 32).
MAX_TOP_LOGPROBS = 64


Top = tuple[torch.Tensor, torch.Tensor]  # (log-probs, token ids), each (batch, k)


def top_row(top: Top, row: int) -> list[tuple[int, float]]:
    values, ids = top
    return [(int(i), float(v)) for i, v in zip(ids[row].tolist(), values[row].tolist(), strict=True)]


class ContextLengthError(ValueError):
    """The prompt plus the tokens asked for do not fit the model's context."""


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: Sequence[str] = field(default_factory=tuple)
    seed: int | None = None
    ignore_eos: bool = False  # decode exactly max_tokens (benchmarks)
    top_logprobs: int = 0  # also keep this many most likely tokens per step (OpenAI's top_logprobs)

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError("max_tokens must be a positive integer")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError("temperature must be between 0 and 2")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if len(self.stop) > 4 or any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be at most 4 non-empty strings")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}")


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]  # log p(token) under the model's untempered distribution
    text: str
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"
    # With SamplingParams.top_logprobs = k: per token, the k most likely (token id, log p)
    # under the untempered distribution, most likely first.
    top_logprobs: list[list[tuple[int, float]]] | None = None
    # With top_logprobs, when the turn ended on an end-of-turn token: the k most likely tokens
    # at that last step (the token itself is not in token_ids). Learning reuses it as the
    # teacher's row for the end of the answer (learn/opsd.py).
    stop_top: list[tuple[int, float]] | None = None


class Piece(str):
    """A streamed text piece, with the tokens whose text it completes (and, with
    top_logprobs, their log-probs and top lists): the server's streamed logprobs. A token
    whose text has not shown yet (half a character) comes with a later piece."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] | None

    def __new__(cls, text: str, token_ids: Sequence[int] = (), logprobs: Sequence[float] = (),
                top_logprobs: Sequence[list[tuple[int, float]]] | None = None) -> Piece:
        piece = super().__new__(cls, text)
        piece.token_ids, piece.logprobs = list(token_ids), list(logprobs)
        piece.top_logprobs = None if top_logprobs is None else list(top_logprobs)
        return piece

    def __add__(self, other: str) -> Piece:
        """Two pieces as one (a row's last piece and its tail), tokens and all."""
        more = other if isinstance(other, Piece) else Piece(other)
        tops = None if self.top_logprobs is None and more.top_logprobs is None else \
            (self.top_logprobs or []) + (more.top_logprobs or [])
        return Piece(str.__add__(self, other), self.token_ids + more.token_ids,
                     self.logprobs + more.logprobs, tops)

    def __radd__(self, other: str) -> Piece:
        return Piece(other) + self


def check_fits(lm: LoadedModel, prompt_tokens: int, max_tokens: int) -> None:
    limit = lm.context_length
    if prompt_tokens + max_tokens > limit:
        raise ContextLengthError(
            f"the prompt is {prompt_tokens} tokens and max_tokens is {max_tokens}, "
            f"but the model's context is {limit} tokens: shorten the prompt or lower max_tokens "
            f"(at most {max(limit - prompt_tokens, 0)} tokens can be generated after this prompt)"
        )


def pick_tokens(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    if params.temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(dim=-1) - sorted_probs < params.top_p
        sorted_probs = sorted_probs * keep
        choice = torch.multinomial(sorted_probs, 1, generator=gen).squeeze(-1)
        return order.gather(-1, choice[:, None]).squeeze(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


class _FastSteps:
    """Steps on the fast decoder (model/decoder.py): merged weights, a KV cache allocated once.

    With `shared` > 0 the first `shared` columns hold a prefix every row has (a session's
    context before each of its probes): it is encoded once, at batch 1, and its keys and
    values copied to every row; the rows' own suffixes follow, left-padded within their part.
    """

    def __init__(self, decoder: FastDecoder, valid: torch.Tensor, shared: int = 0) -> None:
        self.decoder, self.valid = decoder, valid  # valid: (batch, width + max_tokens) columns
        self.cache = decoder.new_cache(valid.shape[0], valid.shape[1])
        self.shared = shared
        self.column = 0

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        p = self.shared
        if p:
            one = self.decoder.new_cache(1, p)
            causal = torch.ones(p, p, dtype=torch.bool, device=ids.device).tril()[None, None]
            self.decoder.forward(ids[:1, :p], positions[:1, :p], one, 0, causal)
            for (k, v), (k1, v1) in zip(self.cache, one, strict=True):
                k[:, :, :p] = k1
                v[:, :, :p] = v1
        t = ids.shape[1] - p
        b = ids.shape[0]
        own = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()
        # A padding query sees only itself, so no row of the mask is empty (that would be NaN).
        own = (own & self.valid[:, None, None, p:p + t]) | torch.eye(t, dtype=torch.bool,
                                                                     device=ids.device)
        seen = torch.ones(b, 1, t, p, dtype=torch.bool, device=ids.device)
        self.column = p + t
        return self.decoder.forward(ids[:, p:], positions[:, p:], self.cache, p,
                                    torch.cat([seen, own], dim=-1))

    def select(self, rows: torch.Tensor) -> None:
        self.valid = self.valid[rows]
        self.cache = [(k[rows], v[rows]) for k, v in self.cache]

    def step(self, token: torch.Tensor, positions: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        c = self.column
        self.column += 1
        return self.decoder.forward(token[:, None], positions, self.cache, c,
                                    self.valid[:, None, None, : c + 1])


def shared_prefix(prompts: Sequence[Sequence[int]], minimum: int | None = None) -> int:
    """Tokens every prompt starts with, leaving each at least one of its own; 0 below
    `minimum` (default SHARED_MIN) or for a single prompt, where encoding it apart would not pay."""
    minimum = SHARED_MIN if minimum is None else minimum
    if len(prompts) < 2:
        return 0
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        i = 0
        while i < n and p[i] == first[i]:
            i += 1
        n = i
        if n < minimum:
            return 0
    return n


class _TransformersSteps:
    """Steps on the transformers forward, for architectures the fast decoder does not know."""

    def __init__(self, lm: LoadedModel, mask: torch.Tensor) -> None:
        self.model, self.mask, self.cache = lm.model, mask, DynamicCache()

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float()

    def select(self, rows: torch.Tensor) -> None:
        self.mask = self.mask[rows]
        self.cache.batch_select_indices(rows)

    def step(self, token: torch.Tensor, positions: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, alive[:, None].long()], dim=1)
        out = self.model(input_ids=token[:, None], attention_mask=self.mask, position_ids=positions,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float()


def _steps(lm: LoadedModel, mask: torch.Tensor, max_tokens: int, fast: bool | None,
           shared: int = 0):
    decoder = decoder_for(lm, lm.decode_dtype) if fast is not False else None
    if decoder is None:
        if fast:
            raise ValueError(f"the fast decoder cannot run this model: {unsupported(lm)}")
        return _TransformersSteps(lm, mask)
    generated = torch.ones(mask.shape[0], max_tokens, dtype=torch.bool, device=mask.device)
    return _FastSteps(decoder, torch.cat([mask.bool(), generated], dim=1), shared)


@torch.no_grad()
def decode_steps(lm: LoadedModel, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 fast: bool | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, Top | None]]:
    """Yield (tokens, logprobs, alive, top) for each step of batched decoding; top is None,
    or with params.top_logprobs = k the (log-probs, token ids) of the k most likely tokens.

    Prompts are left-padded; finished rows keep decoding padding until all are done
    (the caller decides when a row is done by setting `alive` entries to False). Identical
    prompts (a group of samples of one prompt) are encoded once and their cache copied.
    `fast`: None uses the fast decoder where it supports the model, True requires it,
    False uses the transformers forward (the reference the tests compare against).
    Any autocast around the call is switched off for the model's arithmetic: precision is
    lm.decode_dtype, chosen where the model is loaded, never inherited by accident.
    """
    params.validate()
    for p in prompts:
        if not p:
            raise ValueError("a prompt has no tokens")
        check_fits(lm, len(p), params.max_tokens)
    tok = lm.tokenizer
    device = lm.device
    unique = list(dict.fromkeys(tuple(p) for p in prompts))
    # A prefix every prompt shares (a session before each of its probes) is encoded once on
    # the fast decoder: columns [0, shared) hold it, each row's own part is left-padded after.
    shared = shared_prefix(unique) if fast is not False and unsupported(lm) is None else 0
    width = shared + max(len(p) - shared for p in unique)
    pad = tok.pad_token_id
    ids = torch.full((len(unique), width), pad, dtype=torch.long)
    mask = torch.zeros((len(unique), width), dtype=torch.long)
    for row, p in enumerate(unique):
        ids[row, :shared] = torch.tensor(p[:shared], dtype=torch.long)
        mask[row, :shared] = 1
        ids[row, width - (len(p) - shared):] = torch.tensor(p[shared:])
        mask[row, width - (len(p) - shared):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    gen = None
    if params.seed is not None and params.temperature > 0:
        gen = torch.Generator(device=device).manual_seed(params.seed)
    no_autocast = torch.autocast(device.type, enabled=False)
    with no_autocast:
        steps = _steps(lm, mask, params.max_tokens, fast, shared)
        logits = steps.prefill(ids, positions)
    if len(unique) < len(prompts):
        where = {p: i for i, p in enumerate(unique)}
        rows = torch.tensor([where[tuple(p)] for p in prompts], device=device)
        steps.select(rows)
        logits, positions = logits[rows], positions[rows]
    next_pos = positions[:, -1:] + 1
    alive = torch.ones(len(prompts), dtype=torch.bool, device=device)
    for _ in range(params.max_tokens):
        token = pick_tokens(logits, params, gen)
        all_logprobs = torch.log_softmax(logits, dim=-1)
        logprob = all_logprobs.gather(-1, token[:, None]).squeeze(-1)
        top = all_logprobs.topk(params.top_logprobs, dim=-1) if params.top_logprobs else None
        token = torch.where(alive, token, torch.full_like(token, pad))
        yield token, logprob, alive, top
        if not bool(alive.any()):
            return
        with no_autocast:
            logits = steps.step(token, next_pos, alive)
        next_pos = next_pos + 1


def generate(lm: LoadedModel, prompts: Sequence[Sequence[int]],
             params: SamplingParams | None = None, *, fast: bool | None = None) -> list[Completion]:
    """Complete every prompt (token ids) in one batch (`fast` as in decode_steps)."""
    params = params or SamplingParams()
    tok = lm.tokenizer
    stops = end_of_turn_ids(tok)
    n = len(prompts)
    tokens: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list[float]] = [[] for _ in range(n)]
    reasons = ["length"] * n
    texts: list[str | None] = [None] * n
    tops: list[list[list[tuple[int, float]]]] = [[] for _ in range(n)]
    stop_tops: list[list[tuple[int, float]] | None] = [None] * n
    for step_tokens, step_logprobs, alive, top in decode_steps(lm, prompts, params, fast):
        for row in range(n):
            if not alive[row]:
                continue
            t = int(step_tokens[row])
            if t in stops and not params.ignore_eos:
                reasons[row] = "stop"
                if top is not None:
                    stop_tops[row] = top_row(top, row)
                alive[row] = False
                continue
            tokens[row].append(t)
            logprobs[row].append(float(step_logprobs[row]))
            if top is not None:
                tops[row].append(top_row(top, row))
            if params.stop:
                text = tok.decode(tokens[row], skip_special_tokens=True)
                cut = first_stop(text, params.stop)
                if cut is not None:
                    texts[row], reasons[row] = text[:cut], "stop"
                    alive[row] = False
    return [
        Completion(
            prompt_ids=list(prompts[row]),
            token_ids=tokens[row],
            logprobs=logprobs[row],
            text=texts[row] if texts[row] is not None
            else tok.decode(tokens[row], skip_special_tokens=True),
            finish_reason=reasons[row],
            top_logprobs=tops[row] if params.top_logprobs else None,
            stop_top=stop_tops[row],
        )
        for row in range(n)
    ]


class RowText:
    """One sequence's text as its tokens arrive: end of turn, stop strings, max_tokens, and the
    pieces a stream sends (never one that ends inside a multi-byte character). Shared by
    `stream` and the server's continuous batch (model/batching.py)."""

    def __init__(self, tokenizer, prompt: Sequence[int], params: SamplingParams) -> None:
        self.tok, self.prompt, self.params = tokenizer, list(prompt), params
        self.stops = end_of_turn_ids(tokenizer)
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.tops: list[list[tuple[int, float]]] = []
        self.stop_top: list[tuple[int, float]] | None = None  # the end-of-turn step's top
        self.given = 0  # tokens handed out with a piece so far
        self.sent = ""
        self.reason = "length"
        self.done = False

    def push(self, token: int, logprob: float, top: list[tuple[int, float]] | None = None
             ) -> str | None:
        """Take one decoded token; the new text piece to send, if any. Sets `done` when the
        sequence has ended (end of turn, a stop string, or max_tokens)."""
        if token in self.stops and not self.params.ignore_eos:
            self.reason, self.done, self.stop_top = "stop", True, top
            return None
        self.tokens.append(token)
        self.logprobs.append(logprob)
        if top is not None:
            self.tops.append(top)
        text = self.tok.decode(self.tokens, skip_special_tokens=True)
        cut = first_stop(text, self.params.stop) if self.params.stop else None
        if cut is not None:
            text, self.reason, self.done = text[:cut], "stop", True
        piece = None
        if text.startswith(self.sent) and not text.endswith("\ufffd") and len(text) > len(self.sent):
            piece, self.sent = self._piece(text[len(self.sent):]), text
        if len(self.tokens) >= self.params.max_tokens:
            self.done = True
        return piece

    def _piece(self, text: str) -> Piece:
        """`text` with the tokens no piece has carried yet."""
        given, self.given = self.given, len(self.tokens)
        return Piece(text, self.tokens[given:], self.logprobs[given:],
                     self.tops[given:] if self.params.top_logprobs else None)

    def finish(self, reason: str | None = None) -> tuple[str | None, Completion]:
        """The last piece not yet sent (if any) and the Completion; `reason` overrides the
        finish reason (e.g. "cancelled", when the text is what was sent)."""
        if reason is not None:
            return None, Completion(self.prompt, self.tokens, self.logprobs, self.sent, reason,
                                    self.tops if self.params.top_logprobs else None)
        final = self.tok.decode(self.tokens, skip_special_tokens=True)
        cut = first_stop(final, self.params.stop) if self.params.stop else None
        if cut is not None:
            final = final[:cut]
        tail = self._piece(final[len(self.sent):]) \
            if final.startswith(self.sent) and len(final) > len(self.sent) else None
        return tail, Completion(self.prompt, self.tokens, self.logprobs, final, self.reason,
                                self.tops if self.params.top_logprobs else None, self.stop_top)


def stream(lm: LoadedModel, prompt: Sequence[int],
           params: SamplingParams | None = None) -> Iterator[str | Completion]:
    """Yield text pieces as they are decoded, then the final Completion."""
    params = params or SamplingParams()
    row = RowText(lm.tokenizer, prompt, params)
    for step_tokens, step_logprobs, alive, top in decode_steps(lm, [prompt], params):
        piece = row.push(int(step_tokens[0]), float(step_logprobs[0]),
                         top_row(top, 0) if top is not None else None)
        if piece:
            yield piece
        if row.done:
            alive[0] = False
            break
    tail, completion = row.finish()
    if tail:
        yield tail
    yield completion


def first_stop(text: str, stop: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stop if s in text]
    return min(hits) if hits else None
