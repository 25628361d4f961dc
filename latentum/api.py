"""The user-facing API: ``from latentum import LatentUM`` (DESIGN.md, "Python API").

Everything here validates its input at the boundary and then calls the model parts; decoding loops live in
``latentum.generation``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentum.config import ModelConfig, from_dict, to_dict
from latentum.data.canvas import active_grid, active_index
from latentum.data.tokenizer import TextTokenizer
from latentum.generation.engine import Decoder
from latentum.generation.sampling import GREEDY, SamplingParams
from latentum.model.latentum import LatentUMModel

FORMAT_VERSION = 1
INTERLEAVED_SAMPLING = SamplingParams(temperature=0.7, top_k=50, top_p=0.95)
"""LatentUM's planner defaults (reference §6)."""


@dataclass
class LatentImage:
    """A generated image as discrete semantic tokens: ``ids`` (N, G), N = grid * grid in raster order (the
    active top-left grid of the canvas; a FrozenLake thought of an N x N map has grid N)."""

    ids: torch.Tensor

    @property
    def grid(self) -> int:
        return int(round(self.ids.size(0) ** 0.5))

    def __repr__(self) -> str:
        return f"LatentImage(tokens={self.ids.size(0)}, codebooks={self.ids.size(1)})"


def load_image(image, canvas: int, argument: str = "image") -> np.ndarray:
    """PIL image, array or path -> uint8 (canvas, canvas, 3). FrozenLake renders (square, 64 px per cell,
    3..8 cells) are fitted cell-aligned; other square images are resized; anything else is an error."""
    from latentum.data import frozenlake

    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"{argument}: no such file: {str(path)!r}")
        try:
            image = Image.open(path)
            image.load()
        except Exception as e:  # PIL raises several types for unreadable files
            raise ValueError(f"{argument}: cannot read {str(path)!r} as an image ({e})") from e
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{argument} must be a PIL image, a numpy array or a path, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
        raise ValueError(f"{argument} must be a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    image = image[..., :3]
    h, w = image.shape[:2]
    if (h, w) == (canvas, canvas):
        return np.ascontiguousarray(image)
    if h == w and h % 64 == 0 and 3 <= h // 64 <= 8:
        return frozenlake.to_canvas(image, canvas=canvas)[0]
    if h != w:
        raise ValueError(f"{argument} must be square (a FrozenLake map or a {canvas}px canvas), got {w}x{h}")
    return np.asarray(Image.fromarray(image).resize((canvas, canvas), Image.BILINEAR))


class LatentUM:
    """A trained latentum model: understanding, latent image generation, rendering, interleaved generation
    and visual spatial planning. Load with ``LatentUM.from_pretrained(folder)``."""

    def __init__(self, model: LatentUMModel, tokenizer: TextTokenizer, decoder_path: Path | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.decoder_path = decoder_path
        self._decoder = None

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg

    @property
    def canvas(self) -> int:
        return self.config.encoder.image_size

    # --- persistence ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> LatentUM:
        from safetensors.torch import load_model

        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ValueError(f"path: {str(path)!r} is not a latentum model folder (no config.json)")
        meta = json.loads(cfg_file.read_text())
        if not isinstance(meta, dict) or "model" not in meta:
            raise ValueError(f"path: {str(cfg_file)!r} is not a latentum config (no 'model' section)")
        cfg = from_dict(ModelConfig, meta["model"])
        model = LatentUMModel(cfg)
        load_model(model, str(path / "model.safetensors"), device=str(device))
        tok = TextTokenizer.load(path)
        if tok.vocab_size != cfg.backbone.vocab_size:
            raise ValueError(f"tokenizer has {tok.vocab_size} tokens but the model expects "
                             f"{cfg.backbone.vocab_size}")
        dec = path / "decoder"
        return cls(model.to(device), tok, dec if (dec / "config.json").is_file() else None)

    def save_pretrained(self, path: str | Path) -> None:
        save_model_folder(self.model, self.tokenizer, path)
        if self._decoder is not None:
            self._decoder.save_pretrained(Path(path) / "decoder")

    # --- understanding ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def answer(self, image, question: str, *, max_new_tokens: int = 16,
               sampling: SamplingParams = GREEDY, seed: int = 0) -> str:
        """Answer ``question`` about ``image`` (or a LatentImage, read through the und branch)."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"question must be a non-empty string, got {question!r}")
        return self.answer_batch([image], [question], max_new_tokens=max_new_tokens, sampling=sampling,
                                 seed=seed)[0]

    @torch.inference_mode()
    def answer_batch(self, images: list, questions: list[str], *, max_new_tokens: int = 16,
                     sampling: SamplingParams = GREEDY, seed: int = 0) -> list[str]:
        if len(images) != len(questions):
            raise ValueError(f"images and questions must have the same length, got {len(images)} and "
                             f"{len(questions)}")
        from latentum.generation.interleaved import answer_rows

        prompts = [[self._image_item(im, "images"), q] for im, q in zip(images, questions)]
        return answer_rows(self, prompts, max_new_tokens, sampling, _generator(seed))

    @torch.inference_mode()
    def choose(self, image, question: str, options: list[str]) -> str:
        """The option the model finds most likely as the whole answer to ``question`` about ``image`` (the
        cloze form of a multiple-choice question, as lm-eval-harness and OLMES score small models: each
        option's words and <eos> by teacher forcing). E.g. ``choose(map, "Write the map as a text grid .",
        grids)``; ``score_options`` gives the log-probabilities."""
        scores = self.score_options_batch([image], [question], [options])[0]
        return options[int(np.argmax(scores))]

    @torch.inference_mode()
    def score_options(self, image, question: str, options: list[str]) -> list[float]:
        """Log-probability of each option as the whole answer to ``question`` about ``image``."""
        return self.score_options_batch([image], [question], [options])[0]

    @torch.inference_mode()
    def score_options_batch(self, images: list, questions: list[str], options: list[list[str]]) -> list[list[float]]:
        """``score_options`` for several (image, question, options)."""
        from latentum.generation.interleaved import option_logprobs

        if not len(images) == len(questions) == len(options):
            raise ValueError(f"images, questions and options must have the same length, got {len(images)}, "
                             f"{len(questions)} and {len(options)}")
        for i, (q, opts) in enumerate(zip(questions, options)):
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"questions[{i}] must be a non-empty string, got {q!r}")
            if isinstance(opts, str) or not opts or not all(isinstance(o, str) and o.strip() for o in opts):
                raise ValueError(f"options[{i}] must be a non-empty list of non-empty strings, got {opts!r}")
        prompts = [[self._image_item(im, f"images[{i}]"), q] for i, (im, q) in enumerate(zip(images, questions))]
        return option_logprobs(self, prompts, [list(o) for o in options])

    def _image_item(self, image, argument: str):
        return image if isinstance(image, LatentImage) else load_image(image, self.canvas, argument)

    @torch.inference_mode()
    def image_latent(self, image) -> LatentImage:
        """An image's own latent: the MBAQ codes of its active tokens (encoder -> quantizer), as a thought would
        hold them; e.g. the ``reference`` of ``render`` for a plan's thoughts."""
        canvas = load_image(image, self.canvas, "image")
        grid = self.config.encoder.grid
        index = torch.tensor(active_index(active_grid(canvas, grid), grid), device=self.model.device)
        return LatentImage(self.model.image_ids(canvas[None])[0, index].cpu())

    # --- generation -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate_images(self, prompts: list[str] | str, *, cfg_scale: float = 3.0, seed: int = 0,
                        temperature: float = 0.9, top_k: int = 50, top_p: float = 0.95) -> list[LatentImage]:
        """Text -> latent images (batched, classifier-free guidance on the AR-head logits)."""
        from latentum.generation.interleaved import text_to_latents

        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError(f"prompts must be a non-empty list of non-empty strings, got {prompts!r}")
        if cfg_scale < 1:
            raise ValueError(f"cfg_scale must be >= 1, got {cfg_scale}")
        ids = text_to_latents(self, prompts, SamplingParams(temperature, top_k, top_p), cfg_scale,
                              _generator(seed))
        return [LatentImage(x) for x in ids.cpu()]

    @torch.inference_mode()
    def generate(self, inputs: list, *, max_images: int = 16, max_new_tokens: int = 256,
                 sampling: SamplingParams = INTERLEAVED_SAMPLING, seed: int = 0) -> list:
        """Interleaved generation: ``inputs`` is a list of str / images; returns list[str | LatentImage]."""
        from latentum.generation.interleaved import interleaved

        if not isinstance(inputs, list) or not inputs:
            raise ValueError("inputs must be a non-empty list of strings and images")
        items = [x if isinstance(x, str) else self._image_item(x, f"inputs[{i}]") for i, x in enumerate(inputs)]
        return interleaved(self, items, max_images, max_new_tokens, sampling, _generator(seed))

    # --- rendering --------------------------------------------------------------------------------------
    @property
    def decoder(self):
        if self._decoder is None:
            if self.decoder_path is None:
                raise RuntimeError("this model folder has no pixel decoder (decoder/); train stage 'decoder'")
            from latentum.model.decoder import PixelDecoder

            self._decoder = PixelDecoder.from_pretrained(self.decoder_path).to(self.model.device).eval()
        return self._decoder

    @torch.inference_mode()
    def render(self, latent: LatentImage | list[LatentImage], *, style: str | list[str | None] | None = None,
               reference: LatentImage | list[LatentImage | None] | None = None, seed: int = 0,
               steps: int | None = None):
        """Latent image(s) -> PIL image(s) through the pixel decoder (lazy-loaded on first use). ``style``: a name
        from the decoder's styles (``decoder.cfg.styles``, e.g. "gymnasium" or "classic") for all images, or one
        per image; None = unknown (Shapes images; a FrozenLake board then comes out a blend of the looks).
        ``reference``: the image each latent started from, of the same grid (a visual thought's plan input map,
        the player on its start cell: MBAQ codes alias the player and the start stool, the reference tells them
        apart), one for all or one per image; None = the image itself. A decoder trained without references
        (``decoder.cfg.reference`` false) checks it and ignores it."""
        single = isinstance(latent, LatentImage)
        latents = [latent] if single else list(latent)
        if not latents or not all(isinstance(x, LatentImage) for x in latents):
            raise TypeError("latent must be a LatentImage or a list of LatentImage")
        if isinstance(reference, (list, tuple)):
            bad = [i for i, r in enumerate(reference) if r is not None and not isinstance(r, LatentImage)]
            if bad:
                raise TypeError(f"reference[{bad[0]}] must be a LatentImage or None, got "
                                f"{type(reference[bad[0]]).__name__}")
            ref_ids = [None if r is None else r.ids for r in reference]
        elif reference is None or isinstance(reference, LatentImage):
            ref_ids = None if reference is None else reference.ids
        else:
            raise TypeError(f"reference must be a LatentImage, a list of them or None, got {type(reference).__name__}")
        pixels = self.render_ids(torch.stack([x.ids for x in latents]), style=style, reference=ref_ids, seed=seed,
                                 steps=steps)
        images = [Image.fromarray(p) for p in pixels]
        return images[0] if single else images

    def render_ids(self, ids: torch.Tensor, *, style: str | list[str | None] | None = None,
                   reference: torch.Tensor | list[torch.Tensor | None] | None = None, seed: int = 0,
                   steps: int | None = None) -> np.ndarray:
        """Active-grid ids (B, g*g, G) -> uint8 pixels (B, R, R, 3); tokens outside the grid are background.
        ``style`` as in ``render``; a decoder saved before style conditioning checks it and draws as it did.
        ``reference``: ids of the image each started from (as in ``render``): (g*g, G) for all, (B, g*g, G), or a
        list of B (g*g, G) / None; None = the image itself. A decoder without ``reference`` checks it, ignores it."""
        labels = self.decoder.style_labels(style, ids.size(0))  # (B,) or None; checked before any work
        refs = self._reference_ids(reference, ids)  # (B, g*g, G) or None
        ids = self.model.full_canvas_ids(ids.to(self.model.device))
        codes = self.model.quantizer.codes_from_ids(ids)
        ref_codes = None
        if refs is not None and self.decoder.cfg.reference:
            ref_codes = self.model.quantizer.codes_from_ids(self.model.full_canvas_ids(refs.to(self.model.device)))
        return self.decoder.render(codes, labels, ref_codes, steps=steps, generator=_generator(seed))

    @staticmethod
    def _reference_ids(reference, ids: torch.Tensor) -> torch.Tensor | None:
        """``render_ids``' reference -> ids (B, g*g, G) like ``ids`` (a None entry: that image's own), or None."""
        if reference is None:
            return None
        B, shape = ids.size(0), tuple(ids.shape[1:])
        if isinstance(reference, torch.Tensor):
            reference = [reference] * B if reference.dim() == 2 else list(reference)
        if not isinstance(reference, (list, tuple)):
            raise TypeError(f"reference must be a tensor of ids, a list of them or None, got "
                            f"{type(reference).__name__}")
        if len(reference) != B:
            raise ValueError(f"reference: expected one reference or {B} (one per image), got {len(reference)}")
        out = []
        for i, r in enumerate(reference):
            if r is None:
                r = ids[i]
            elif not isinstance(r, torch.Tensor):
                raise TypeError(f"reference[{i}] must be a tensor of ids or None, got {type(r).__name__}")
            elif tuple(r.shape) != shape or r.dtype != ids.dtype:
                raise ValueError(f"reference[{i}] must be ids of the same grid as the image, {ids.dtype} {shape}, "
                                 f"got {r.dtype} {tuple(r.shape)}")
            out.append(r.to(ids.device))
        return torch.stack(out)

    # --- planning ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def plan(self, image, *, max_steps: int | None = None, seed: int = 0, sampling: SamplingParams = GREEDY,
             heed_looks: bool = True, avoid_revisits: bool = False):
        """Plan a FrozenLake map: returns a Plan with ``actions`` (L/D/R/U) and ``thoughts`` (LatentImage), at
        most ``max_steps`` moves (None: 4 per cell of the map's side, ``planner.STEPS_PER_SIDE``).
        ``heed_looks`` (default): never move where the model's own look just named a hole or the edge (when it
        looks and another move is left; ``generation.planner``); False lets the model choose freely.
        ``avoid_revisits``: never move back to a cell the plan already stood on (counted from the moves alone)
        while a move to a new cell is left (off by default: it did not help on the whole, README)."""
        return self.plan_batch([image], max_steps=max_steps, seed=seed, sampling=sampling,
                               heed_looks=heed_looks, avoid_revisits=avoid_revisits)[0]

    @torch.inference_mode()
    def plan_batch(self, images: list, *, max_steps: int | None = None, seed: int = 0,
                   sampling: SamplingParams = GREEDY, thoughts: str = "latent", heed_looks: bool = True,
                   draft_thoughts: bool = True, avoid_revisits: bool = False):
        """Plan several maps (batched by size). ``thoughts``: "latent" (ours), "pixel" (each thought rendered and
        re-encoded before it is read) or "none" (text only). ``draft_thoughts``: check each greedy thought
        against the board before it, several tokens per forward (the same thoughts, a few times faster)."""
        from latentum.generation.planner import plan_rows

        if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
            raise ValueError(f"max_steps must be None (4 moves per cell of the map's side) or an int >= 1, "
                             f"got {max_steps!r}")
        canvases = [load_image(im, self.canvas, f"images[{i}]") for i, im in enumerate(images)]
        return plan_rows(self, canvases, max_steps, sampling, _generator(seed), thoughts, heed_looks=heed_looks,
                         draft_thoughts=draft_thoughts, avoid_revisits=avoid_revisits)

    def imagine(self, image, actions: list[str] | str, *, seed: int = 0, sampling: SamplingParams = GREEDY):
        """Follow the given moves on a FrozenLake map (e.g. "R D D" or ["R", "D", "D"]): the model looks before
        each move and imagines the board after it. Returns a Plan; ``generation.planner.falls_at(plan)`` is the
        first move into a cell its own look named a hole (None: the sequence is safe by its looks)."""
        return self.imagine_batch([image], [actions], seed=seed, sampling=sampling)[0]

    @torch.inference_mode()
    def imagine_batch(self, images: list, actions: list, *, seed: int = 0, sampling: SamplingParams = GREEDY):
        """``imagine`` for several maps, one move sequence each (batched by size)."""
        from latentum.generation.planner import imagine_rows

        moves = [a.split() if isinstance(a, str) else list(a) for a in actions]
        canvases = [load_image(im, self.canvas, f"images[{i}]") for i, im in enumerate(images)]
        return imagine_rows(self, canvases, moves, sampling, _generator(seed))

    def new_decoder(self, batch: int, max_len: int | None = None) -> Decoder:
        return Decoder(self.model, self.tokenizer, batch, max_len or self.config.backbone.max_seq_len)


def _generator(seed: int) -> torch.Generator:
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return torch.Generator().manual_seed(seed)


def save_model_folder(model: LatentUMModel, tokenizer: TextTokenizer, path: str | Path) -> None:
    """Write a self-describing folder: config.json, model.safetensors, tokenizer.json."""
    from safetensors.torch import save_model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": FORMAT_VERSION, "model": to_dict(model.cfg)}
    (path / "config.json").write_text(json.dumps(meta, indent=2))
    save_model(model, str(path / "model.safetensors"))
    tokenizer.save(path)

