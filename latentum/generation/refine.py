"""Reason, reflect, refine (R3) and best-of-k on latent images: the model judges its own images by reading
them back through the understanding branch, with no pixels in the loop (protocol text: ``data.refine``).

- ``judge``: the log-probability that the model answers ``NO_EDIT`` to the reflection question about an image.
- ``refine``: generate; reflect; while the reflection asks for an edit, regenerate from the prompt, the previous
  image and the model's own instruction; rows that say ``NO_EDIT`` stop early. Every round is kept; the pick is
  the one the model judges best, so refining never ends on an image it judges worse than its first.
- ``best_of``: k independent samples per prompt, the one the model judges best picked (LatentUM's
  self-reflection).

Legend: B prompts, N image tokens, G codebooks.
"""

from __future__ import annotations

import torch

from latentum.data.refine import NO_EDIT, refine_items, reflect_question
from latentum.generation.interleaved import answer_rows, option_logprobs, prefill_rows, text_to_latents
from latentum.types import GREEDY, Judged, LatentImage, SamplingParams


def judge(model, tok, ids: torch.Tensor, prompts: list[str]) -> list[float]:
    """Per image (B, N, G): log p(``NO_EDIT`` | the image read back, the reflection question about its prompt)."""
    turns = [tok.user_turn([LatentImage(x), reflect_question(p)]) for x, p in zip(ids, prompts)]
    return [s[0] for s in option_logprobs(model, tok, turns, [[NO_EDIT]] * len(prompts))]


def reflect(model, tok, ids: torch.Tensor, prompts: list[str], max_new_tokens: int = 16) -> list[str]:
    """Per image (B, N, G): what the model says should change against its prompt (greedy), or ``NO_EDIT``."""
    turns = [tok.user_turn([LatentImage(x), reflect_question(p)]) for x, p in zip(ids, prompts)]
    return answer_rows(model, tok, turns, max_new_tokens, GREEDY, None)


def edit_latents(model, tok, prompts: list[str], previous: torch.Tensor, instructions: list[str],
                 params: SamplingParams, cfg_scale: float, generator) -> torch.Tensor:
    """One refine step for B rows: [prompt, previous image (B, N, G), instruction] -> new images (B, N, G), guided
    against the same turn with its words dropped."""
    turns = [tok.user_turn(refine_items(p, LatentImage(x), i)) for p, x, i in zip(prompts, previous, instructions)]
    cond = prefill_rows(model, tok, turns)
    uncond = prefill_rows(model, tok, turns, drop_text=True) if cfg_scale != 1.0 else None
    return cond.generate_latent(params, generator, uncond=uncond, cfg_scale=cfg_scale)


def refine(model, tok, prompts: list[str], rounds: int, params: SamplingParams, cfg_scale: float,
           generator) -> list[Judged]:
    """Round 0 is plain text-to-image; each of up to ``rounds`` more rounds edits the rows whose reflection on
    their latest image is not ``NO_EDIT``. Returns every row's rounds, reflections and scores."""
    ids = text_to_latents(model, tok, prompts, params, cfg_scale, generator).cpu()  # (B, N, G)
    out = [Judged(p, [], [], []) for p in prompts]
    active = list(range(len(prompts)))
    for r in range(rounds + 1):
        rows = [prompts[i] for i in active]
        said = reflect(model, tok, ids[active], rows)
        scores = judge(model, tok, ids[active], rows)
        for i, s, sc in zip(active, said, scores):
            out[i].images.append(LatentImage(ids[i].clone()))
            out[i].reflections.append(s)
            out[i].scores.append(sc)
        active = [i for i, s in zip(active, said) if tok.normalize(s) != tok.normalize(NO_EDIT)]
        if r == rounds or not active:
            break
        instructions = [out[i].reflections[-1] for i in active]
        ids[active] = edit_latents(model, tok, [prompts[i] for i in active], ids[active], instructions, params,
                                   cfg_scale, generator).cpu()
    return out


def best_of(model, tok, prompts: list[str], k: int, params: SamplingParams, cfg_scale: float,
            generator) -> list[Judged]:
    """``k`` samples per prompt (one batch of B * k rows), each judged by the model reading it back."""
    many = [p for p in prompts for _ in range(k)]
    ids = text_to_latents(model, tok, many, params, cfg_scale, generator).cpu()  # (B * k, N, G)
    scores = judge(model, tok, ids, many)
    return [Judged(p, [LatentImage(x) for x in ids[b * k:(b + 1) * k]], scores[b * k:(b + 1) * k], [])
            for b, p in enumerate(prompts)]
