"""Teacher-forced scoring: logits of given response tokens after given prompts, batched.

The teacher's long context (the session) is encoded once into a KV cache (`Prefix`) and
reused for every scoring pass; each pass only runs the short probe turn and the response.
With the gradient, responses to one shared prompt (a GRPO group's first turn) run that prompt
once (`shared_prompt_logprobs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from onthejob.model import LoadedModel


@dataclass
class Prefix:
    """A context encoded once: its ids and, per layer, keys and values of shape [1, H, T, D]."""

    ids: list[int]
    layers: list[tuple[torch.Tensor, torch.Tensor]]

    def cache_for(self, batch: int) -> DynamicCache:
        return DynamicCache([(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
                             for k, v in self.layers])


@torch.no_grad()
def encode_prefix(lm: LoadedModel, ids: Sequence[int]) -> Prefix:
    cache = DynamicCache()
    lm.model(input_ids=torch.tensor([list(ids)], device=lm.device), past_key_values=cache,
             use_cache=True)
    layers = [(layer.keys.detach(), layer.values.detach()) for layer in cache.layers]
    return Prefix(ids=list(ids), layers=layers)


def _pad_right(rows: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r))
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def response_logits(lm: LoadedModel, prompts: Sequence[Sequence[int]],
                    responses: Sequence[Sequence[int]], prefix: Prefix | None = None) -> torch.Tensor:
    """Logits [sum(len(response)), V] predicting each response token after its prompt
    (and after `prefix`, when given). Grad flows if enabled by the caller."""
    if len(prompts) != len(responses):
        raise ValueError("prompts and responses differ in number")
    rows = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
    ids, mask = _pad_right(rows, lm.tokenizer.pad_token_id, lm.device)
    kwargs = {}
    if prefix is not None:
        n = len(prefix.ids)
        mask = torch.cat([torch.ones((len(rows), n), dtype=mask.dtype, device=mask.device), mask], 1)
        positions = torch.arange(n, n + ids.shape[1], device=ids.device).expand(len(rows), -1)
        kwargs = {"past_key_values": prefix.cache_for(len(rows)), "position_ids": positions,
                  "use_cache": True}
    # Only the positions that predict response tokens need the (large) vocabulary projection.
    select = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        select[i, len(p) - 1: len(p) - 1 + len(r)] = True
    hidden = _body(lm)(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state
    return _head(lm)(hidden[select])


def _inner(lm: LoadedModel):
    model = lm.model
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _body(lm: LoadedModel):
    # The decoder stack of a causal LM (PEFT's LoRA layers live inside it).
    return _inner(lm).model


def _head(lm: LoadedModel):
    return _inner(lm).lm_head


def token_logprobs(lm: LoadedModel, prompts: Sequence[Sequence[int]],
                   responses: Sequence[Sequence[int]]) -> torch.Tensor:
    """log p(response token) for every response token, flattened in order: [sum(len(r))]."""
    logits = response_logits(lm, prompts, responses)
    targets = torch.tensor([t for r in responses for t in r], device=logits.device)
    return torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)


def shared_prompt_logprobs(lm: LoadedModel, prompts: Sequence[Sequence[int]],
                           responses: Sequence[Sequence[int]]) -> torch.Tensor:
    """`token_logprobs`, exact, with the gradient; when every prompt is the same, the prompt
    runs once and its keys and values are shared by all the responses (the gradient of the
    shared prompt sums over them)."""
    if len(prompts) < 2 or any(list(p) != list(prompts[0]) for p in prompts):
        return token_logprobs(lm, prompts, responses)
    prompt = list(prompts[0])
    cache = DynamicCache()
    _body(lm)(input_ids=torch.tensor([prompt[:-1]], device=lm.device), past_key_values=cache,
              use_cache=True)
    prefix = Prefix(ids=prompt[:-1], layers=[(layer.keys, layer.values) for layer in cache.layers])
    logits = response_logits(lm, [prompt[-1:]] * len(responses), responses, prefix=prefix)
    targets = torch.tensor([t for r in responses for t in r], device=logits.device)
    return torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)
