"""Decoding loops behind the API: answers, text-to-latent images with CFG, free interleaved generation."""

from __future__ import annotations

import numpy as np
import torch

from latentum.data.canvas import active_grid
from latentum.generation.engine import Decoder, new_decoder
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


BATCH = 16
"""Rows decoded at once by ``interleaved``: a finished row goes to the next waiting prompt (continuous batching)."""


def interleaved(model, tok, prompts: list[list], max_images: int, max_new_tokens: int, params: SamplingParams,
                generator, cfg_scale: float = 1.0, batch: int = BATCH) -> list[list]:
    """Free interleaved decoding of many prompts: per row, text until ``<img>`` -> a latent thought (fork, generate,
    replay) -> text ... until ``<eos>``, ``max_images`` images or ``max_new_tokens`` tokens. Continuously batched:
    ``batch`` rows decode together, and when a row ends its place goes to the next waiting prompt
    (``Decoder.replace_rows``). A row's image is read back by that row alone (``think(rows=...)``), so greedy rows
    come out as they would one at a time. With ``cfg_scale`` != 1 every image's codes are guided against a second
    stream whose prompt words are dropped (the same generated text and images fed to both, LatentUM §4); the text
    itself is sampled from the prompted stream. A thought keeps the layout of its row's last input image (a 4x4
    input imagines 4x4 images; else the full canvas); rows of every layout share the batch."""
    run = _Interleaving(model, tok, prompts, max_images, max_new_tokens, params, generator, cfg_scale)
    queue = list(range(len(prompts)))
    run.admit(queue[:batch])
    queue = queue[batch:]
    while len(run.held):
        ended = run.step()
        take, queue = queue[:len(ended)], queue[len(ended):]
        run.refill(ended, take)
    return run.out


class _Interleaving:
    """The rows of one ``interleaved`` call: the prompt each row holds, what it has said and imagined so far."""

    def __init__(self, model, tok, prompts, max_images, max_new_tokens, params, generator, cfg_scale):
        self.model, self.tok, self.prompts = model, tok, prompts
        self.max_images, self.max_new_tokens = max_images, max_new_tokens
        self.params, self.generator, self.cfg_scale = params, generator, cfg_scale
        canvas = model.cfg.encoder.grid
        self.grids = []  # per prompt: the layout of its last input image, else the whole canvas
        for items in prompts:
            images = [x for x in items if isinstance(x, np.ndarray)]
            self.grids.append(active_grid(images[-1], canvas) if images else canvas)
        self.image_tokens = canvas ** 2 + 2
        self.out: list[list] = [[] for _ in prompts]
        self.streams: tuple[Decoder, ...] = ()
        self.held: list[int] = []  # per row: the prompt it decodes
        self.text: list[list[int]] = []  # per row: words since its last image
        self.images: list[int] = []
        self.said: list[int] = []  # per row: tokens sampled

    def admit(self, idx: list[int], slots: list[int] | None = None) -> None:
        """Start prompts ``idx``: they fill new decoders, or replace the rows ``slots``."""
        prompts = [self.prompts[i] for i in idx]
        drops = (False, True) if self.cfg_scale != 1.0 else (False,)
        if slots is None:
            self.streams = tuple(prefill_rows(self.model, self.tok, prompts, drop_text=d) for d in drops)
            self.held, self.text = list(idx), [[] for _ in idx]
            self.images, self.said = [0] * len(idx), [0] * len(idx)
            return
        for d, drop in zip(self.streams, drops):
            d.replace_rows(torch.tensor(slots), prompts, drop_text=drop)
        for b, i in zip(slots, idx):
            self.held[b], self.text[b], self.images[b], self.said[b] = i, [], 0, 0

    def step(self) -> list[int]:
        """Sample one token per row and act on it (a word is fed, ``<img>`` thinks an image); -> the rows that
        ended, their results written to ``out``."""
        dec, tok, device = self.streams[0], self.tok, self.model.device
        for d in self.streams:
            d.make_room(self.image_tokens + 1)
        nxt = dec.sample_text(self.params, self.generator).cpu()  # (B,)
        said = nxt.tolist()  # one conversion; the per-row tests below are on Python values
        B = len(self.held)
        stop = [said[b] == tok.eos_id or (said[b] == tok.img_start_id and self.images[b] >= self.max_images)
                for b in range(B)]
        wants = [said[b] == tok.img_start_id and not stop[b] for b in range(B)]
        words = [not (stop[b] or wants[b]) for b in range(B)]
        for b in range(B):
            self.said[b] += 1
            if wants[b] and self.text[b]:
                self.out[self.held[b]].append(tok.decode(self.text[b]))
                self.text[b] = []
            elif words[b]:
                self.text[b].append(said[b])
        if any(words):
            valid = torch.tensor(words, device=device)[:, None]  # (B, 1)
            for d in self.streams:
                d.feed_ids(nxt[:, None].to(device), valid=valid)
        if any(wants):
            grids = [self.grids[i] for i in self.held]
            ids = dec.think(self.params, self.generator, grid=grids, uncond=self.streams[-1] if self.cfg_scale != 1.0
                            else None, cfg_scale=self.cfg_scale, rows=torch.tensor(wants)).cpu()
            for b in [b for b, w in enumerate(wants) if w]:
                g = grids[b]
                self.out[self.held[b]].append(LatentImage(ids[b, :g * g]))
                self.images[b] += 1
        ended = [b for b in range(B) if stop[b] or self.said[b] >= self.max_new_tokens]
        for b in ended:
            if self.text[b]:
                self.out[self.held[b]].append(tok.decode(self.text[b]))
        return ended

    def refill(self, ended: list[int], take: list[int]) -> None:
        """The waiting prompts ``take`` restart rows that ``ended``; ended rows beyond them leave the batch."""
        slots, gone = ended[:len(take)], ended[len(take):]
        if gone:
            keep = [b for b in range(len(self.held)) if b not in gone]
            index = torch.tensor(keep, dtype=torch.long, device=self.model.device)
            if keep:
                for d in self.streams:
                    d.keep_rows(index)
            slots = [keep.index(s) for s in slots]
            for name in ("held", "text", "images", "said"):
                setattr(self, name, [getattr(self, name)[b] for b in keep])
        if take:
            self.admit(take, slots)


def _chunks(xs: list, n: int):
    for i in range(0, len(xs), n):
        yield xs[i:i + n]

