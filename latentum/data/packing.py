"""Pack samples into the tensors the MoME backbone trains on (LatentUM's "dual sequence", §3 of the reference).

Each sample becomes one row: the understanding sequence U followed by up to ``max_gen_images`` generation
blocks G. In U every item is read by the understanding branch: text tokens, input images (continuous
features) and assistant images (latent codes, "read back"). Each G block is ``<img>`` plus the image's N
latent tokens, routed to the generation branch; it sees U strictly before that image's ``<img>`` and itself,
and re-uses U's positions, exactly what inference sees after forking the cache.

Images are canvases whose content sits top-left (``latentum.data.canvas``): an image with an active g x g
grid contributes g * g tokens. ``ImageSlots`` map those tokens between the packed rows and the full
``canvas_grid ** 2`` token grid of the encoder.

Legend: B rows, T packed length, I images, C = canvas_grid ** 2 canvas tokens, G codebooks per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from latentum.data.canvas import active_grid, active_index, named_cells, rope_offsets
from latentum.data.sample import Attempt, LatentView, Sample
from latentum.data.tokenizer import TextTokenizer

IGNORE = -100
UND, GEN = 0, 1


@dataclass
class ImageSlots:
    """Where image tokens go: packed row ``rows[m]`` (flat into B*T) takes canvas token ``src[m]`` (flat into
    I*C) of ``pixels``. G blocks share the pixels of ``Packed.latents`` (their ``pixels`` is empty)."""

    pixels: np.ndarray  # (I, H, W, 3) uint8
    rows: torch.Tensor  # (M,) flat index into B*T
    src: torch.Tensor  # (M,) flat index into I*C


@dataclass
class Packed:
    """A training batch. Every (B, T) tensor is documented; all are on CPU until ``.to(device)``."""

    ids: torch.Tensor  # (B, T) token ids; image tokens hold the <image> placeholder id
    positions: torch.Tensor  # (B, T) RoPE positions; G blocks repeat their U positions
    rope_offsets: torch.Tensor  # (B, T, 2) image tokens' (row, col) offsets for 2-D RoPE (canvas.rope_offsets)
    gen_mask: torch.Tensor  # (B, T) bool, True = generation branch
    gen_cells: torch.Tensor  # (B, T) canvas cell each G-block token predicts (its position query), else -1
    text_cells: torch.Tensor  # (B, T) cell a prompt's "row R column C" names, on the C token, else -1
    valid: torch.Tensor  # (B, T) bool, False = padding
    attn_mask: torch.Tensor  # (B, T, T) bool, True = query may attend to key
    image_span: torch.Tensor  # (B, T) id of the U-read image a token belongs to, -1 elsewhere (see same_image)
    text_targets: torch.Tensor  # (B, T) next text token id or IGNORE
    inputs: ImageSlots  # user images: continuous encoder features
    latents: ImageSlots  # assistant images read back through the und branch (one per image)
    gen_blocks: ImageSlots  # the chosen latents again, as G blocks (``src`` indexes the latents' tokens)
    code_query: torch.Tensor  # (M,) flat indices into B*T whose hidden state predicts an image token's codes
    code_src: torch.Tensor  # (M,) flat index into the latents' I*C canvas tokens: the predicted token
    code_changed: torch.Tensor  # (M,) bool: the token's pixels differ from the previous image's (or no previous)
    task: torch.Tensor  # (B,) AIA task per row: UND or GEN
    aia_valid: torch.Tensor  # (B,) bool, False for rows whose prompt was dropped (CFG)
    aia_query: torch.Tensor  # (B, T) bool, the task's query span
    aia_key: torch.Tensor  # (B, T) bool, the other modality's key span
    tasks: list[str]

    def to(self, device) -> Packed:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        for k in ("inputs", "latents", "gen_blocks"):
            s = moved[k]
            moved[k] = ImageSlots(s.pixels, s.rows.to(device), s.src.to(device))
        return Packed(**moved)


@dataclass
class _Row:
    ids: list[int]
    labels: list[int]
    is_image: list[bool]
    cells: list[int]  # named_cells of user text, -1 elsewhere
    inputs: list[tuple[np.ndarray, int, int]]  # (pixels, start of its tokens in U, active grid g)
    latents: list[tuple[np.ndarray, int, int]]
    opens: list[int | None]  # U index of each latent's <img>; None for a user's LatentView (never generated)


def _tokenize_row(sample: Sample, tok: TextTokenizer, canvas_grid: int, drop_prompt: bool) -> _Row:
    first = [] if tok.bos_id is None else [tok.bos_id]  # a pretrained chat model has no BOS
    r = _Row(first, [IGNORE] * len(first), [False] * len(first), [-1] * len(first), [], [], [])
    # Understanding and interleaved rows read the user's turn in the tokenizer's chat format; text-to-image rows
    # are the raw caption (LatentUM §4), so a dropped caption leaves nothing of the prompt behind.
    user = sample.user if sample.is_text_to_image else tok.user_turn(sample.user)
    for turn, items in (("user", user), ("assistant", sample.assistant)):
        for item in items:
            supervised = turn == "assistant"
            if isinstance(item, str):
                supervised = supervised and not isinstance(item, Attempt)
                ids = tok.encode(item)
                if drop_prompt and turn == "user":
                    ids = [tok.pad_id] * len(ids)
                _extend(r, ids, supervised, False, named_cells(ids, tok, canvas_grid) if turn == "user" else None)
            else:
                latent = supervised or isinstance(item, LatentView)
                if latent:
                    r.opens.append(len(r.ids) if supervised else None)
                _extend(r, [tok.img_start_id], supervised, False)
                g = active_grid(item, canvas_grid)
                (r.latents if latent else r.inputs).append((np.asarray(item), len(r.ids), g))
                _extend(r, [tok.image_id] * g * g, False, True)
                _extend(r, [tok.img_end_id], False, False)
    _extend(r, [tok.eos_id], True, False)
    return r


def _extend(r: _Row, ids: list[int], supervised: bool, image: bool, cells: list[int] | None = None) -> None:
    # labels[t] is the label of token t as a *target*: it is predicted from position t - 1.
    r.ids += ids
    r.labels += ids if supervised else [IGNORE] * len(ids)
    r.is_image += [image] * len(ids)
    r.cells += cells or [-1] * len(ids)


def pack(samples: list[Sample], tok: TextTokenizer, canvas_grid: int = 8, *, max_gen_images: int = 4,
         drop_prompt: list[bool] | None = None, rng: np.random.Generator | None = None,
         aia_queries: int | None = None) -> Packed:
    """Pack ``samples`` into one batch. ``max_gen_images`` caps G blocks per row (a random subset);
    ``aia_queries`` keeps at most that many random rows of each AIA query span."""
    rng = rng or np.random.default_rng(0)
    drop_prompt = drop_prompt or [False] * len(samples)
    rows = [_tokenize_row(s, tok, canvas_grid, d) for s, d in zip(samples, drop_prompt)]
    chosen = [_choose_generated(r, max_gen_images, rng) for r in rows]
    lengths = [len(r.ids) + sum(r.latents[i][2] ** 2 + 1 for i in c) for r, c in zip(rows, chosen)]
    B, T = len(rows), max(lengths)
    out = _Builder(B, T, tok.pad_id, canvas_grid)
    for b, (r, c) in enumerate(zip(rows, chosen)):
        out.add_row(b, r, c, tok, samples[b].task, drop_prompt[b])
    packed = out.finish(samples)
    if aia_queries:
        packed.aia_query = subsample_rows(packed.aia_query, aia_queries, rng)
    return packed


def _choose_generated(r: _Row, k: int, rng: np.random.Generator) -> list[int]:
    """Up to ``k`` random latents of the row that get a G block (a user's ``LatentView`` never does)."""
    gen = [i for i, o in enumerate(r.opens) if o is not None]
    return sorted(rng.choice(gen, min(len(gen), k), replace=False).tolist()) if gen else []


def subsample_rows(mask: torch.Tensor, k: int, rng: np.random.Generator) -> torch.Tensor:
    """Keep at most k random True entries per row of a (B, T) bool mask."""
    scores = torch.from_numpy(rng.random(mask.shape)).masked_fill(~mask, 2.0)  # unchosen sort last
    keep = torch.zeros_like(mask)
    top = scores.topk(min(k, mask.size(1)), dim=1, largest=False).indices
    keep.scatter_(1, top, True)
    return keep & mask


def approx_length(sample: Sample, canvas_grid: int = 8) -> int:
    """Cheap estimate of a sample's packed length (for length bucketing)."""
    n = 0
    for item in sample.user + sample.assistant:
        n += len(item.split()) if isinstance(item, str) else active_grid(item, canvas_grid) ** 2 + 2
    return n


class _Builder:
    """Fills the (B, T) tensors row by row; the (B, T, T) mask is built once, vectorised, in ``finish``."""

    def __init__(self, B: int, T: int, pad_id: int, canvas_grid: int):
        self.B, self.T, self.grid = B, T, canvas_grid
        self.ids = torch.full((B, T), pad_id, dtype=torch.long)
        self.positions = torch.zeros(B, T, dtype=torch.long)
        self.rope_offsets = torch.zeros(B, T, 2, dtype=torch.long)
        self.block = torch.full((B, T), -1, dtype=torch.long)  # 0 = U, k > 0 = G block k, -1 = pad
        self.anchor = torch.zeros(B, T, dtype=torch.long)  # G tokens see U keys < anchor
        self.gen_cells = torch.full((B, T), -1, dtype=torch.long)
        self.text_cells = torch.full((B, T), -1, dtype=torch.long)
        self.image_span = torch.full((B, T), -1, dtype=torch.long)  # U-read images only
        self.labels = torch.full((B, T), IGNORE, dtype=torch.long)
        self.is_image = torch.zeros(B, T, dtype=torch.bool)
        self.slots = {"inputs": ([], [], []), "latents": ([], [], []), "gen": ([], [], [])}  # pixels, rows, src
        self.code_query, self.code_src, self.code_changed = [], [], []
        self.task, self.aia_valid = [], []

    def _place(self, kind: str, b: int, start: int, g: int, image: int, pixels=None) -> list[int]:
        """Record the g*g active tokens of canvas image ``image`` at U/G index ``start`` of row b."""
        pix, rows, src = self.slots[kind]
        if pixels is not None:  # a U-read image (G blocks pass none)
            pix.append(pixels)
            self.image_span[b, start:start + g * g] = int(self.image_span.max()) + 1
        C = self.grid**2
        canvas = [image * C + i for i in active_index(g, self.grid)]
        rows += range(b * self.T + start, b * self.T + start + g * g)
        self.rope_offsets[b, start:start + g * g] = torch.tensor(rope_offsets(g))
        src += canvas
        return canvas

    def add_row(self, b: int, r: _Row, chosen: list[int], tok: TextTokenizer, task: str, dropped: bool) -> None:
        L = len(r.ids)
        self.ids[b, :L] = torch.tensor(r.ids)
        self.positions[b, :L] = torch.arange(L)
        self.block[b, :L] = 0
        self.labels[b, :L] = torch.tensor(r.labels)
        self.is_image[b, :L] = torch.tensor(r.is_image)
        self.text_cells[b, :L] = torch.tensor(r.cells)
        for px, start, g in r.inputs:
            self._place("inputs", b, start, g, len(self.slots["inputs"][0]), px)
        first = len(self.slots["latents"][0])
        canvas_tokens = [self._place("latents", b, start, g, first + i, px)
                         for i, (px, start, g) in enumerate(r.latents)]
        at = L
        for k, li in enumerate(chosen, start=1):
            p, g = r.opens[li], r.latents[li][2]  # U index of this image's <img>, its active grid
            n = g * g
            self.ids[b, at] = tok.img_start_id
            self.ids[b, at + 1:at + n + 1] = tok.image_id
            self.positions[b, at:at + n + 1] = torch.arange(p, p + n + 1)
            self.block[b, at:at + n + 1], self.anchor[b, at:at + n + 1] = k, p
            self.is_image[b, at + 1:at + n + 1] = True
            self._place("gen", b, at + 1, g, first + li)
            self.gen_cells[b, at:at + n] = torch.tensor(active_index(g, self.grid))  # <img> + tokens 0..n-2
            # <img> and the image's tokens 0..n-2 predict its tokens 0..n-1.
            self.code_query += range(b * self.T + at, b * self.T + at + n)
            self.code_src += canvas_tokens[li]
            self.code_changed += changed_tokens(_previous_image(r, li), r.latents[li][0], g, self.grid)
            at += n + 1
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
            ids=self.ids, positions=self.positions, rope_offsets=self.rope_offsets, gen_mask=gen_mask,
            gen_cells=self.gen_cells, text_cells=self.text_cells, valid=valid,
            attn_mask=block_mask(self.block, self.anchor), image_span=self.image_span, text_targets=labels_next,
            inputs=_slots(*self.slots["inputs"]), latents=_slots(*self.slots["latents"]),
            gen_blocks=_slots(*self.slots["gen"]), code_query=code_query,
            code_src=torch.tensor(self.code_src, dtype=torch.long),
            code_changed=torch.tensor(self.code_changed, dtype=torch.bool), task=task,
            aia_valid=torch.tensor(self.aia_valid), aia_query=torch.where(is_gen, gen_q, und_q),
            aia_key=torch.where(is_gen, text_keys, image_keys), tasks=[s.task for s in samples])


def _previous_image(r: _Row, li: int) -> np.ndarray | None:
    """The image right before latent ``li`` in the row (input or latent), or None if it is the first."""
    start = r.latents[li][1]
    before = [(s, px) for px, s, _ in r.inputs + r.latents if s < start]
    return max(before, key=lambda x: x[0])[1] if before else None


def changed_tokens(prev: np.ndarray | None, cur: np.ndarray, g: int, grid: int) -> list[bool]:
    """Per active token of ``cur`` (raster over its g x g grid): do its pixels differ from ``prev``'s?
    With no previous image (or a different size) every token counts as changed. In a planning trajectory
    only the cells the player left and entered change, so these are the tokens a move has to get right."""
    if prev is None or prev.shape != cur.shape:
        return [True] * g * g
    P = cur.shape[0] // grid
    diff = (prev != cur).any(-1).reshape(grid, P, grid, P).any((1, 3))  # (grid, grid)
    return diff.reshape(-1)[list(active_index(g, grid))].tolist()


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


def same_image(span: torch.Tensor, key_span: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) query image ids (+ (B, S) key ids, default the same) -> (B, T, S) bool: both tokens belong to
    the same U-read image. OR-ed into the causal mask it makes each image bidirectional
    (``BackboneConfig.image_attention``); -1 (text, G blocks, padding) matches nothing."""
    key_span = span if key_span is None else key_span
    return (span[:, :, None] == key_span[:, None, :]) & (span[:, :, None] >= 0)


def _slots(pixels: list[np.ndarray], rows: list[int], src: list[int]) -> ImageSlots:
    shapes = {px.shape for px in pixels}
    if len(shapes) > 1:
        raise ValueError(f"all images in a batch must share the canvas size, got {sorted(shapes)}")
    stacked = np.stack(pixels) if pixels else np.zeros((0, 1, 1, 3), np.uint8)
    return ImageSlots(stacked, torch.tensor(rows, dtype=torch.long), torch.tensor(src, dtype=torch.long))
