"""Next-token choice per request: greedy, or temperature / top-k / top-p sampling drawn from the
request's own generator (seeded by its ``seed``), so no request's draws depend on another's."""

from __future__ import annotations

import secrets

import torch

from .request import Request, SamplingParams, TokenLogprob

SCORE_BLOCK_ROWS = 256  # log-probabilities are taken this many rows at a time


def new_generator(sampling: SamplingParams) -> torch.Generator | None:
    """The request's generator; None for greedy requests (they draw nothing)."""
    if sampling.greedy:
        return None
    g = torch.Generator(device="cpu")
    g.manual_seed(sampling.seed if sampling.seed is not None else secrets.randbits(63))
    return g


def sample(logits: torch.Tensor, requests: tuple[Request, ...]) -> list[int]:
    """``logits`` [n, V] (row i for requests[i]) -> one token id per request, after each request's
    penalties and logit bias (the raw logits stay as they are: log-probabilities report them)."""
    logits = logits.float()
    adjusted = [i for i, r in enumerate(requests) if r.sampling.adjusts_logits]
    if adjusted:
        logits = logits.clone()
        for i in adjusted:
            logits[i] = adjust(logits[i], requests[i].sampling, requests[i].output_ids)
    tokens = logits.argmax(-1).tolist()
    for i, r in enumerate(requests):
        if not r.sampling.greedy:
            tokens[i] = _draw(logits[i].cpu(), r.sampling, r.generator)
    return tokens


def adjust(logits: torch.Tensor, s: SamplingParams, output_ids: list[int]) -> torch.Tensor:
    """One request's logits [V] with OpenAI's presence and frequency penalties over the tokens it
    has generated, and its logit bias."""
    if output_ids and (s.presence_penalty or s.frequency_penalty):
        counts = torch.bincount(torch.tensor(output_ids, device=logits.device), minlength=logits.numel())[: logits.numel()].float()
        logits = logits - s.frequency_penalty * counts - s.presence_penalty * (counts > 0).float()
    if s.logit_bias:
        ids, biases = zip(*s.logit_bias)
        logits = logits.index_add(0, torch.tensor(ids, device=logits.device), torch.tensor(biases, device=logits.device, dtype=logits.dtype))
    return logits


def _draw(logits: torch.Tensor, s: SamplingParams, generator: torch.Generator) -> int:
    logits = logits / s.temperature  # [V]
    if 0 < s.top_k < logits.numel():
        kth = torch.topk(logits, s.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop = probs.cumsum(-1) - probs >= s.top_p
        logits = logits.index_fill(0, order[drop], float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def token_logprobs(logits: torch.Tensor, requests: tuple[Request, ...], tokens: list[int]) -> list[TokenLogprob | None]:
    """Each chosen token's log-probability (and the likeliest tokens') for the requests that ask,
    from the raw logits as vLLM reports them; None for the others."""
    rows = [i for i, r in enumerate(requests) if r.sampling.logprobs is not None]
    entries: list[TokenLogprob | None] = [None] * len(requests)
    found = logprob_entries(logits[rows], [tokens[i] for i in rows], [requests[i].sampling.logprobs for i in rows]) if rows else []
    for i, entry in zip(rows, found):
        entries[i] = entry
    return entries


def logprob_entries(logits: torch.Tensor, targets: list[int], ks: list[int]) -> list[TokenLogprob]:
    """Row i of ``logits`` [n, V]: the log-probability of ``targets[i]`` and the ``ks[i]`` likeliest
    tokens'. In blocks of rows, so a long prompt's scores never hold [n, V] in fp32 at once."""
    entries = []
    for at in range(0, len(targets), SCORE_BLOCK_ROWS):
        block = slice(at, at + SCORE_BLOCK_ROWS)
        logp = logits[block].float().log_softmax(-1)
        chosen = logp.gather(1, torch.tensor(targets[block], device=logp.device)[:, None])[:, 0].tolist()
        k = max(ks[block])
        values, ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
        entries += [TokenLogprob(t, c, tuple(zip(i[:n], v[:n]))) for t, c, i, v, n in
                    zip(targets[block], chosen, ids.tolist(), values.tolist(), ks[block])]
    return entries
