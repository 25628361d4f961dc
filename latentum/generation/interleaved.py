"""Decoding loops behind the API: answers, text-to-latent images with CFG, free interleaved generation."""

from __future__ import annotations

import numpy as np
import torch

from latentum.data.canvas import active_grid
from latentum.generation.engine import Decoder, new_decoder, prompt_tokens
from latentum.types import GREEDY, LatentImage, SamplingParams


def prefill_rows(model, tok, prompts: list[list], drop_text: bool = False) -> Decoder:
    """Batch prefill of user items (text, images, LatentImage). ``drop_text``: prompt words become <pad> (the
    unconditional stream of classifier-free guidance)."""
    dec = new_decoder(model, tok, len(prompts))
    dec.prefill(prompts, drop_text=drop_text)
    return dec


def sample_text_until_eos(tok, dec: Decoder, max_new_tokens: int, params: SamplingParams, generator,
                          stop_ids: tuple[int, ...] = ()) -> list[list[int]]:
    """Sample up to ``max_new_tokens`` per row; a row stops at <eos> or any of ``stop_ids``."""
    eos = tok.eos_id
    out = [[] for _ in range(dec.batch)]
    live = torch.ones(dec.batch, dtype=torch.bool)
    for _ in range(max_new_tokens):
        nxt = dec.sample_text(params, generator)
        for b in torch.nonzero(live).flatten().tolist():
            out[b].append(int(nxt[b]))
        live &= ~torch.isin(nxt.cpu(), torch.tensor((eos,) + stop_ids))
        if not live.any():
            break
        dec.feed_ids(nxt[:, None])
    return out


def answer_rows(model, tok, prompts: list[list], max_new_tokens: int, params: SamplingParams, generator) -> list[str]:
    rows = []
    for chunk in _chunks(prompts, 64):
        dec = prefill_rows(model, tok, chunk)
        ids = sample_text_until_eos(tok, dec, max_new_tokens, params, generator)
        rows += [tok.decode(r) for r in ids]
    return rows


def option_logprobs(model, tok, prompts: list[list], options: list[list[str]]) -> list[list[float]]:
    """Log-probability of each option as the whole answer to its prompt: its words, then <eos> (the cloze
    form of a multiple-choice question). Each prompt is prefilled once, in chunks, and its cache repeated
    once per option (``Decoder.keep_rows``); options are right-padded and scored by teacher forcing, with no
    sampling."""

    out: list[list[float]] = []
    for chunk in _chunks(list(range(len(prompts))), 16):
        dec = prefill_rows(model, tok, [prompts[i] for i in chunk])
        rows = [(k, j) for k, i in enumerate(chunk) for j in range(len(options[i]))]  # (prompt in chunk, option)
        dec.keep_rows(torch.tensor([k for k, _ in rows], device=model.device))  # a prompt's rows share its cache
        conts = [tok.encode(options[chunk[k]][j]) + [tok.eos_id] for k, j in rows]
        L = max(len(c) for c in conts)
        ids = torch.tensor([c + [tok.pad_id] * (L - len(c)) for c in conts])  # (B, L)
        valid = torch.tensor([[k < len(c) for k in range(L)] for c in conts])  # (B, L)
        logits = dec.text_logits()[:, None]  # (B, 1, V): predicts token 0
        if L > 1:
            hidden = dec.feed_ids(ids[:, :-1], valid=valid[:, :-1].to(model.device))  # (B, L - 1, D)
            later = model.backbone.logits(hidden).float()
            later[..., len(tok):] = float("-inf")  # as text_logits: no row beyond the tokenizer
            logits = torch.cat([logits, later], dim=1)  # (B, L, V)
        logp = logits.log_softmax(-1).gather(-1, ids[..., None].to(logits.device))[..., 0].cpu()  # (B, L)
        scores = [float(lp[v].sum()) for lp, v in zip(logp, valid)]
        for i in chunk:
            n = len(options[i])
            out.append(scores[:n])
            scores = scores[n:]
    return out


def answer_latents(model, tok, ids: torch.Tensor, questions: list[str], max_new_tokens: int = 8,
                   params: SamplingParams | None = None, generator=None) -> list[str]:
    """Answer questions about latent images (I, N, G), read through the und branch: <bos> <img> latents
    </img> question. Rows are batched by question length (no padding inside the sequence)."""
    encoded = [tok.encode(q) for q in questions]
    out = [""] * len(questions)
    by_len: dict[int, list[int]] = {}
    for i, e in enumerate(encoded):
        by_len.setdefault(len(e), []).append(i)
    for idx in by_len.values():
        for chunk in _chunks(idx, 64):
            dec = new_decoder(model, tok, len(chunk))
            if tok.bos_id is not None:
                dec.feed_ids(torch.full((len(chunk), 1), tok.bos_id))
            dec.feed_latents(ids[chunk].to(model.device))
            dec.feed_prompt_ids(torch.tensor([encoded[i] for i in chunk]))
            rows = sample_text_until_eos(tok, dec, max_new_tokens, params or GREEDY, generator)
            for i, r in zip(chunk, rows):
                out[i] = tok.decode(r)
    return out


def text_to_latents(model, tok, prompts: list[str], params: SamplingParams, cfg_scale: float, generator):
    """Prompt + ``<img>`` -> N gen-branch steps. The unconditional rows replace prompt words by <pad> and keep
    the attention mask, as the reference does (§4, CFG)."""
    cond = new_decoder(model, tok, len(prompts))
    cond.prefill([[p] for p in prompts])
    uncond = None
    if cfg_scale != 1.0:
        uncond = new_decoder(model, tok, len(prompts))
        uncond.prefill([[p] for p in prompts], drop_text=True)
    return cond.generate_latent(params, generator, uncond=uncond, cfg_scale=cfg_scale)


def interleaved(model, tok, prompts: list[list], max_images: int, max_new_tokens: int, params: SamplingParams,
                generator, cfg_scale: float = 1.0) -> list[list]:
    """Free interleaved decoding of a batch of prompts: per row, text until ``<img>`` -> a latent thought (fork,
    generate, replay) -> text ... until ``<eos>``, ``max_images`` images or ``max_new_tokens`` text tokens.
    Rows advance in lockstep; a row's image is read back by that row alone (``think(rows=...)``), so greedy rows
    come out as they would one at a time. With ``cfg_scale`` != 1 every image's codes are guided against a second
    stream whose prompt words are dropped (the same generated text and images fed to both, LatentUM §4); the text
    itself is sampled from the prompted stream. A thought keeps the layout of its row's last input image (a 4x4
    input imagines 4x4 images; else the full canvas): rows of different layouts are decoded as separate groups."""
    out: list[list] = [[] for _ in prompts]
    groups: dict[int | None, list[int]] = {}
    for i, items in enumerate(prompts):
        images = [x for x in items if isinstance(x, np.ndarray)]
        groups.setdefault(active_grid(images[-1], model.cfg.encoder.grid) if images else None, []).append(i)
    canvas = model.cfg.encoder.grid
    for grid, idx in groups.items():
        # Every row's cache holds every row's image steps (masked where not its own): rows per chunk so that the
        # worst case fits the model's length.
        image = (grid or canvas) ** 2 + 2
        longest = max(len(prompt_tokens(prompts[i], tok, canvas)[0]) for i in idx) + max_new_tokens + image
        per = max(1, (model.cfg.backbone.max_seq_len - longest) // max(1, max_images * image))
        for chunk in _chunks(idx, per):
            rows = _interleaved_rows(model, tok, [prompts[i] for i in chunk], grid, max_images, max_new_tokens,
                                     params, generator, cfg_scale)
            for i, r in zip(chunk, rows):
                out[i] = r
    return out


def _interleaved_rows(model, tok, prompts: list[list], grid: int | None, max_images: int, max_new_tokens: int,
                      params: SamplingParams, generator, cfg_scale: float) -> list[list]:
    dec = prefill_rows(model, tok, prompts)
    streams = (dec, prefill_rows(model, tok, prompts, drop_text=True)) if cfg_scale != 1.0 else (dec,)
    B = len(prompts)
    out: list[list] = [[] for _ in range(B)]
    text: list[list[int]] = [[] for _ in range(B)]
    images = [0] * B
    live = torch.ones(B, dtype=torch.bool)
    for _ in range(max_new_tokens):
        nxt = dec.sample_text(params, generator).cpu()  # (B,)
        live &= nxt != tok.eos_id
        wants = live & (nxt == tok.img_start_id)
        for b in torch.nonzero(wants).flatten().tolist():
            if text[b]:
                out[b].append(tok.decode(text[b]))
                text[b] = []
            if images[b] >= max_images:
                live[b] = wants[b] = False
        words = live & ~wants
        for b in torch.nonzero(words).flatten().tolist():
            text[b].append(int(nxt[b]))
        if not live.any():
            break
        if words.any():
            for d in streams:
                d.feed_ids(nxt[:, None].to(model.device), valid=words[:, None].to(model.device))
        if wants.any():
            ids = dec.think(params, generator, grid=grid, uncond=streams[-1] if cfg_scale != 1.0 else None,
                            cfg_scale=cfg_scale, rows=wants).cpu()
            for b in torch.nonzero(wants).flatten().tolist():
                out[b].append(LatentImage(ids[b]))
                images[b] += 1
    for b in range(B):
        if text[b]:
            out[b].append(tok.decode(text[b]))
    return out


def _chunks(xs: list, n: int):
    for i in range(0, len(xs), n):
        yield xs[i:i + n]

