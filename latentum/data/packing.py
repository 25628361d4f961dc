"""Pack samples into the tensors the MoME backbone trains on (LatentUM's "dual sequence", §3 of the reference).

Each sample becomes one row: the understanding sequence U followed by up to ``max_gen_images`` generation
blocks G. In U every item is read by the understanding branch: text tokens, input images (continuous
features) and assistant images (latent codes, "read back"). Each G block is ``<img>`` plus the image's N
latent tokens, routed to the generation branch; it sees U strictly before that image's ``<img>`` and itself,
and re-uses U's positions, exactly what inference sees after forking the cache.

Legend: B rows, T packed length, N tokens per image, G codebooks per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from latentum.data.sample import Sample
from latentum.data.tokenizer import TextTokenizer

IGNORE = -100
UND, GEN = 0, 1


@dataclass
class ImageSlots:
    """Where images go: ``pixels[i]`` fills the N placeholder rows starting at flat index ``start[i]``."""

    pixels: np.ndarray  # (I, H, W, 3) uint8
    start: torch.Tensor  # (I,) flat index into B*T of the first image token
    owner: torch.Tensor  # (I,) index of the image in the batch's latent list (G blocks) or -1


@dataclass
class Packed:
    """A training batch. Every (B, T) tensor is documented; all are on CPU until ``.to(device)``."""

    ids: torch.Tensor  # (B, T) token ids; image tokens hold the <image> placeholder id
    positions: torch.Tensor  # (B, T) RoPE positions; G blocks repeat their U positions
    gen_mask: torch.Tensor  # (B, T) bool, True = generation branch
    valid: torch.Tensor  # (B, T) bool, False = padding
    attn_mask: torch.Tensor  # (B, T, T) bool, True = query may attend to key
    text_targets: torch.Tensor  # (B, T) next text token id or IGNORE
    inputs: ImageSlots  # user images: continuous encoder features
    latents: ImageSlots  # assistant images read back through the und branch (one per image)
    gen_blocks: ImageSlots  # the same images as G blocks (owner = index into ``latents``)
    code_query: torch.Tensor  # (M,) flat indices whose hidden state predicts the next image token's codes
    code_owner: torch.Tensor  # (M,) index into ``latents`` of the predicted token's image
    code_token: torch.Tensor  # (M,) which of the image's N tokens is predicted
    task: torch.Tensor  # (B,) AIA task per row: UND or GEN
    aia_valid: torch.Tensor  # (B,) bool, False for rows whose prompt was dropped (CFG)
    aia_query: torch.Tensor  # (B, T) bool, the task's query span
    aia_key: torch.Tensor  # (B, T) bool, the other modality's key span
    tasks: list[str]

    def to(self, device) -> Packed:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        for k in ("inputs", "latents", "gen_blocks"):
            s = moved[k]
            moved[k] = ImageSlots(s.pixels, s.start.to(device), s.owner.to(device))
        return Packed(**moved)


@dataclass
class _Row:
    ids: list[int]
    labels: list[int]
    is_image: list[bool]
    inputs: list[tuple[np.ndarray, int]]
    latents: list[tuple[np.ndarray, int]]  # (pixels, start of its N tokens in U)
    opens: list[int]  # U index of each latent's <img>


def _tokenize_row(sample: Sample, tok: TextTokenizer, n_tokens: int, drop_prompt: bool) -> _Row:
    r = _Row([tok.bos_id], [IGNORE], [False], [], [], [])
    for turn, items in (("user", sample.user), ("assistant", sample.assistant)):
        for item in items:
            supervised = turn == "assistant"
            if isinstance(item, str):
                ids = tok.encode(item)
                if drop_prompt and turn == "user":
                    ids = [tok.pad_id] * len(ids)
                _extend(r, ids, supervised, False)
            else:
                if supervised:
                    r.opens.append(len(r.ids))
                _extend(r, [tok.img_start_id], supervised, False)
                (r.latents if supervised else r.inputs).append((item, len(r.ids)))
                _extend(r, [tok.image_id] * n_tokens, False, True)
                _extend(r, [tok.img_end_id], False, False)
    _extend(r, [tok.eos_id], True, False)
    return r


def _extend(r: _Row, ids: list[int], supervised: bool, image: bool) -> None:
    # labels[t] is the label of token t as a *target*: it is predicted from position t - 1.
    r.ids += ids
    r.labels += ids if supervised else [IGNORE] * len(ids)
    r.is_image += [image] * len(ids)


def pack(samples: list[Sample], tok: TextTokenizer, n_tokens: int, *, max_gen_images: int = 4,
         drop_prompt: list[bool] | None = None, rng: np.random.Generator | None = None) -> Packed:
    """Pack ``samples`` into one batch. ``max_gen_images`` caps G blocks per row (a random subset)."""
    rng = rng or np.random.default_rng(0)
    drop_prompt = drop_prompt or [False] * len(samples)
    rows = [_tokenize_row(s, tok, n_tokens, d) for s, d in zip(samples, drop_prompt)]
    chosen = [sorted(rng.choice(len(r.latents), min(len(r.latents), max_gen_images), replace=False).tolist())
              if r.latents else [] for r in rows]
    lengths = [len(r.ids) + len(c) * (n_tokens + 1) for r, c in zip(rows, chosen)]
    B, T = len(rows), max(lengths)
    out = _Builder(B, T, tok.pad_id)
    for b, (r, c) in enumerate(zip(rows, chosen)):
        out.add_row(b, r, c, n_tokens, tok, samples[b].task, drop_prompt[b])
    return out.finish(samples)


class _Builder:
    """Fills the (B, T) tensors row by row; the (B, T, T) mask is built once, vectorised, in ``finish``."""

    def __init__(self, B: int, T: int, pad_id: int):
        self.B, self.T = B, T
        self.ids = torch.full((B, T), pad_id, dtype=torch.long)
        self.positions = torch.zeros(B, T, dtype=torch.long)
        self.block = torch.full((B, T), -1, dtype=torch.long)  # 0 = U, k > 0 = G block k, -1 = pad
        self.anchor = torch.zeros(B, T, dtype=torch.long)  # G tokens see U keys < anchor
        self.labels = torch.full((B, T), IGNORE, dtype=torch.long)
        self.is_image = torch.zeros(B, T, dtype=torch.bool)
        self.inputs, self.latents, self.gen = [], [], []  # (pixels, flat start, owner)
        self.code_query, self.code_owner, self.code_token = [], [], []
        self.task, self.aia_valid = [], []

    def add_row(self, b: int, r: _Row, chosen: list[int], N: int, tok: TextTokenizer, task: str,
                dropped: bool) -> None:
        L, T = len(r.ids), self.T
        self.ids[b, :L] = torch.tensor(r.ids)
        self.positions[b, :L] = torch.arange(L)
        self.block[b, :L] = 0
        self.labels[b, :L] = torch.tensor(r.labels)
        self.is_image[b, :L] = torch.tensor(r.is_image)
        self.inputs += [(px, b * T + s, -1) for px, s in r.inputs]
        first_latent = len(self.latents)
        self.latents += [(px, b * T + s, -1) for px, s in r.latents]
        at = L
        for k, li in enumerate(chosen, start=1):
            p = r.opens[li]  # U index of this image's <img>
            sl = slice(at, at + N + 1)
            self.ids[b, at] = tok.img_start_id
            self.ids[b, at + 1:at + N + 1] = tok.image_id
            self.positions[b, sl] = torch.arange(p, p + N + 1)
            self.block[b, sl], self.anchor[b, sl] = k, p
            self.is_image[b, at + 1:at + N + 1] = True
            owner = first_latent + li
            self.gen.append((r.latents[li][0], b * T + at + 1, owner))
            # <img> and latents 0..N-2 predict latents 0..N-1.
            self.code_query += range(b * T + at, b * T + at + N)
            self.code_owner += [owner] * N
            self.code_token += range(N)
            at += N + 1
        # Rows with G blocks regularise generation attention (AIA is single-task per sample, as in AIA's code).
        self.task.append(GEN if chosen else UND)
        self.aia_valid.append(not dropped)

    def finish(self, samples: list[Sample]) -> Packed:
        valid = self.block >= 0
        labels_next = torch.full_like(self.labels, IGNORE)
        labels_next[:, :-1] = self.labels[:, 1:]
        labels_next[self.block != 0] = IGNORE
        labels_next[:, :-1][self.block[:, 1:] != 0] = IGNORE  # last U token predicts nothing across blocks
        gen_mask = self.block > 0
        task = torch.tensor(self.task)
        code_query = torch.tensor(self.code_query, dtype=torch.long)
        und_q = labels_next != IGNORE
        gen_q = torch.zeros_like(valid).view(-1).index_fill(0, code_query, True).view_as(valid)
        text_keys = (self.block == 0) & ~self.is_image
        image_keys = (self.block == 0) & self.is_image
        is_gen = (task == GEN)[:, None]
        return Packed(
            ids=self.ids, positions=self.positions, gen_mask=gen_mask, valid=valid,
            attn_mask=block_mask(self.block, self.anchor), text_targets=labels_next,
            inputs=_slots(self.inputs), latents=_slots(self.latents), gen_blocks=_slots(self.gen),
            code_query=code_query, code_owner=torch.tensor(self.code_owner, dtype=torch.long),
            code_token=torch.tensor(self.code_token, dtype=torch.long), task=task,
            aia_valid=torch.tensor(self.aia_valid), aia_query=torch.where(is_gen, gen_q, und_q),
            aia_key=torch.where(is_gen, text_keys, image_keys), tasks=[s.task for s in samples])


def block_mask(block: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """(B, T) block ids + anchors -> (B, T, T) bool mask. U is causal; G block k is causal within itself and
    sees U keys before its anchor; padding keys are never seen; padding queries see themselves (no NaN)."""
    T = block.size(1)
    i = torch.arange(T, device=block.device)
    causal = i[None, :, None] >= i[None, None, :]  # (1, T, T)
    bq, bk = block[:, :, None], block[:, None, :]
    same = (bq == bk) & (bq >= 0) & causal
    prefix = (bq > 0) & (bk == 0) & (i[None, None, :] < anchor[:, :, None])
    eye = torch.eye(T, dtype=torch.bool, device=block.device)[None] & (bq < 0)
    return same | prefix | eye


def _slots(items: list[tuple[np.ndarray, int, int]]) -> ImageSlots:
    if not items:
        return ImageSlots(np.zeros((0, 1, 1, 3), np.uint8), torch.zeros(0, dtype=torch.long),
                          torch.zeros(0, dtype=torch.long))
    shapes = {px.shape for px, _, _ in items}
    if len(shapes) != 1:
        raise ValueError(f"all images in a batch must share the canvas size, got {sorted(shapes)}")
    return ImageSlots(np.stack([px for px, _, _ in items]), torch.tensor([s for _, s, _ in items]),
                      torch.tensor([o for _, _, o in items]))
