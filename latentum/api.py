"""The user-facing API: ``from latentum import LatentUM`` (DESIGN.md, "Python API").

Everything here validates its input at the boundary and then calls the model parts; decoding loops live in
``latentum.generation``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentum.checkpoint import decoder_folder, load_decoder_folder, load_model_folder, save_model_folder
from latentum.config import ModelConfig
from latentum.data.canvas import active_grid, active_index
from latentum.data.hf_tokenizer import AnyTokenizer
from latentum.data.refine import words as refine_words
from latentum.generation import interleaved, refine
from latentum.generation.engine import Decoder, new_decoder
from latentum.generation.render import render_ids
from latentum.generation.sampling import seeded_generator
from latentum.model.decoder import PixelDecoder
from latentum.model.latentum import LatentUMModel
from latentum.types import GREEDY, Judged, LatentImage, SamplingParams

INTERLEAVED_SAMPLING = SamplingParams(temperature=0.7, top_k=50, top_p=0.95)
"""LatentUM's interleaved-generation defaults (reference §6)."""


def read_image(image, argument: str = "image") -> np.ndarray:
    """PIL image, array, tensor or path -> uint8 (H, W, 3); RGBA loses its alpha; anything else is an error
    naming ``argument``."""
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
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8 or 0 in image.shape:
        raise ValueError(f"{argument} must be a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image[..., :3])


def load_image(image, canvas: int, argument: str = "image") -> np.ndarray:
    """PIL image, array or path -> uint8 (canvas, canvas, 3). An image of the canvas size is taken as it is (a
    laid-out canvas, ``data.canvas``); any other size is resized to the canvas, as a vision tower's
    preprocessing does."""
    image = read_image(image, argument)
    if image.shape[:2] == (canvas, canvas):
        return np.ascontiguousarray(image)
    return np.asarray(Image.fromarray(image).resize((canvas, canvas), Image.BILINEAR))


class LatentUM:
    """A trained latentum model: understanding, latent image generation, rendering on demand and interleaved
    generation. Load with ``LatentUM.from_pretrained(folder)``; applications (``latentum.apps``) build on it."""

    def __init__(self, model: LatentUMModel, tokenizer: AnyTokenizer, decoder_path: Path | None = None):
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
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> LatentUM:
        """Load a model folder (``config.json``, ``model.safetensors``, ``tokenizer.json``, optional ``decoder/``),
        or an official LatentUM folder (``docs/pretrained.md``). ``dtype`` casts every weight (e.g.
        ``torch.bfloat16`` on a GPU); default: as saved."""
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}")
        model, tok = load_model_folder(path, device)
        return cls(model if dtype is None else model.to(dtype), tok, decoder_folder(path))

    def save_pretrained(self, path: str | Path) -> None:
        """Write a model folder (atomically), with the pixel decoder if this model has one."""
        dec = self.decoder if self.decoder_path is not None or self._decoder is not None else None
        save_model_folder(self.model, self.tokenizer, path, decoder=dec)

    # --- understanding ----------------------------------------------------------------------------------
    def compile_decode(self, enabled: bool = True) -> LatentUM:
        """Decode one token per step through a fixed-shape step built by ``torch.compile`` (gpt-fast style;
        ``MoMEBackbone.compile_decode``): faster per token once built, at a compile of tens of seconds per
        (batch, cache size, branch) met. Off by default; ``enabled=False`` switches back. Returns self."""
        self.model.backbone.compile_decode(enabled)
        return self

    @torch.inference_mode()
    def answer(self, image, question: str, *, max_new_tokens: int = 16,
               sampling: SamplingParams = GREEDY, seed: int = 0) -> str:
        """Answer ``question`` about ``image`` (or a LatentImage, read through the und branch)."""
        self._check_text(question, "question")
        return self.answer_batch([image], [question], max_new_tokens=max_new_tokens, sampling=sampling,
                                 seed=seed)[0]

    @torch.inference_mode()
    def answer_batch(self, images: list, questions: list[str], *, max_new_tokens: int = 16,
                     sampling: SamplingParams = GREEDY, seed: int = 0) -> list[str]:
        """``answer`` for several (image, question) pairs, batched."""
        _check_list(images, "images")
        _check_list(questions, "questions")
        if len(images) != len(questions):
            raise ValueError(f"images and questions must have the same length, got {len(images)} and "
                             f"{len(questions)}")
        for i, q in enumerate(questions):
            self._check_text(q, f"questions[{i}]")
        _check_count(max_new_tokens, "max_new_tokens")
        prompts = [self.tokenizer.user_turn([self._image_item(im, f"images[{i}]"), q])
                   for i, (im, q) in enumerate(zip(images, questions))]
        return interleaved.answer_rows(self.model, self.tokenizer, prompts, max_new_tokens, sampling,
                                       seeded_generator(seed))

    @torch.inference_mode()
    def choose(self, image, question: str, options: list[str]) -> str:
        """The option the model finds most likely as the whole answer to ``question`` about ``image`` (the
        cloze form of a multiple-choice question, as lm-eval-harness and OLMES score small models: each
        option's words and <eos> by teacher forcing); ``score_options`` gives the log-probabilities."""
        scores = self.score_options_batch([image], [question], [options])[0]
        return options[int(np.argmax(scores))]

    @torch.inference_mode()
    def score_options(self, image, question: str, options: list[str]) -> list[float]:
        """Log-probability of each option as the whole answer to ``question`` about ``image``."""
        return self.score_options_batch([image], [question], [options])[0]

    @torch.inference_mode()
    def score_options_batch(self, images: list, questions: list[str], options: list[list[str]]) -> list[list[float]]:
        """``score_options`` for several (image, question, options)."""
        for value, name in ((images, "images"), (questions, "questions"), (options, "options")):
            _check_list(value, name)
        if not len(images) == len(questions) == len(options):
            raise ValueError(f"images, questions and options must have the same length, got {len(images)}, "
                             f"{len(questions)} and {len(options)}")
        for i, (q, opts) in enumerate(zip(questions, options)):
            self._check_text(q, f"questions[{i}]")
            if isinstance(opts, str) or not isinstance(opts, (list, tuple)) or not opts:
                raise ValueError(f"options[{i}] must be a non-empty list of non-empty strings, got {opts!r}")
            for j, o in enumerate(opts):
                self._check_text(o, f"options[{i}][{j}]")
        prompts = [self.tokenizer.user_turn([self._image_item(im, f"images[{i}]"), q])
                   for i, (im, q) in enumerate(zip(images, questions))]
        return interleaved.option_logprobs(self.model, self.tokenizer, prompts, [list(o) for o in options])

    def _image_item(self, image, argument: str):
        if isinstance(image, LatentImage):
            self._check_latent(image, argument)
            return image
        return load_image(image, self.canvas, argument)

    def _check_latent(self, latent: LatentImage, argument: str) -> None:
        """A LatentImage of this model: long ids (g*g, G), g <= the canvas grid, each id inside its codebook."""
        ids, q, grid = latent.ids, self.config.quantizer, self.config.encoder.grid
        n = ids.size(0) if ids.dim() == 2 else -1
        if ids.dim() != 2 or ids.size(1) != q.codebooks or not 1 <= n <= grid * grid or round(n**0.5) ** 2 != n:
            raise ValueError(f"{argument}: a LatentImage of this model holds g*g tokens (g <= {grid}) of "
                             f"{q.codebooks} codebooks, got {tuple(ids.shape)[0] if ids.dim() else 0} tokens of "
                             f"{ids.size(1) if ids.dim() == 2 else '?'} codebooks")
        if ids.dtype != torch.long:
            raise ValueError(f"{argument}: LatentImage ids must be long, got {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= q.codebook_size):
            raise ValueError(f"{argument}: LatentImage ids must be ids in [0, {q.codebook_size}), got "
                             f"[{int(ids.min())}, {int(ids.max())}]")

    def _check_text(self, text, argument: str) -> None:
        """A non-empty string in words the tokenizer knows (an unknown word would be read as <unk>, and the
        model would answer a question nobody asked)."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{argument} must be a non-empty string, got {text!r}")
        unknown = self.tokenizer.unknown_words(text)
        if unknown:
            raise ValueError(f"{argument} has words outside the model's vocabulary: {', '.join(map(repr, unknown))}")

    @torch.inference_mode()
    def image_latent(self, image) -> LatentImage:
        """An image's own latent: the MBAQ codes of its active tokens (encoder -> quantizer), as a thought would
        hold them; e.g. the ``reference`` of ``render``."""
        canvas = load_image(image, self.canvas, "image")
        grid = self.config.encoder.grid
        index = torch.tensor(active_index(active_grid(canvas, grid), grid), device=self.model.device)
        return LatentImage(self.model.image_ids(canvas[None])[0, index].cpu())

    # --- generation -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate_images(self, prompts: list[str] | str, *, cfg_scale: float = 3.0, seed: int = 0,
                        temperature: float = 0.9, top_k: int = 50, top_p: float = 0.95) -> list[LatentImage]:
        """Text -> latent images (batched, classifier-free guidance on the AR-head logits)."""
        prompts = self._prompts(prompts)[0]
        _check_cfg_scale(cfg_scale)
        ids = interleaved.text_to_latents(self.model, self.tokenizer, prompts,
                                          SamplingParams(temperature, top_k, top_p), cfg_scale, seeded_generator(seed))
        return [LatentImage(x) for x in ids.cpu()]

    @torch.inference_mode()
    def refine(self, prompts: list[str] | str, *, rounds: int = 3, cfg_scale: float = 3.0, seed: int = 0,
               temperature: float = 0.9, top_k: int = 50, top_p: float = 0.95) -> Judged | list[Judged]:
        """Reason, reflect, refine: generate a latent image, read it back and say what should change against the
        prompt, regenerate from the prompt, that image and the instruction; up to ``rounds`` times, stopping
        early once the model says no further edit. ``Judged.image`` is the round the model judges best (never
        one it judges worse than round 0); ``images`` / ``reflections`` / ``scores`` hold every round."""
        prompts, single = self._prompts(prompts)
        _check_count(rounds, "rounds", minimum=0)
        self._check_protocol("refine")
        _check_cfg_scale(cfg_scale)
        out = refine.refine(self.model, self.tokenizer, prompts, rounds, SamplingParams(temperature, top_k, top_p),
                            cfg_scale, seeded_generator(seed))
        return out[0] if single else out

    @torch.inference_mode()
    def best_of(self, prompts: list[str] | str, *, k: int = 4, cfg_scale: float = 3.0, seed: int = 0,
                temperature: float = 0.9, top_k: int = 50, top_p: float = 0.95) -> Judged | list[Judged]:
        """``k`` sampled latent images per prompt; ``Judged.image`` is the one the model, reading each back,
        judges to need no further edit most (LatentUM's self-reflection). Same compute as ``refine`` with
        ``rounds = k - 1``, at most."""
        prompts, single = self._prompts(prompts)
        _check_count(k, "k")
        self._check_protocol("best_of")
        _check_cfg_scale(cfg_scale)
        out = refine.best_of(self.model, self.tokenizer, prompts, k, SamplingParams(temperature, top_k, top_p),
                             cfg_scale, seeded_generator(seed))
        return out[0] if single else out

    def _prompts(self, prompts) -> tuple[list[str], bool]:
        single = isinstance(prompts, str)
        prompts = [prompts] if single else prompts
        _check_list(prompts, "prompts")
        if not prompts:
            raise ValueError("prompts must be a non-empty list of strings")
        for i, p in enumerate(prompts):
            self._check_text(p, f"prompts[{i}]")
        return list(prompts), single

    def _check_protocol(self, method: str) -> None:
        """The model can say the reflection protocol's words (``data.refine``): it was trained for it."""
        missing = sorted(w for w in refine_words() if self.tokenizer.unknown_words(w))
        if missing:
            raise ValueError(f"{method}: this model was not trained to reflect on its images (its vocabulary lacks "
                             f"{', '.join(map(repr, missing))}); train it on reflection and refine samples "
                             f"(latentum.data.refine)")

    @torch.inference_mode()
    def generate(self, inputs: list, *, max_images: int = 16, max_new_tokens: int = 256,
                 sampling: SamplingParams = INTERLEAVED_SAMPLING, seed: int = 0, cfg_scale: float = 1.0,
                 batch: int = interleaved.BATCH) -> list:
        """Interleaved generation: ``inputs`` is a list of str / images and the result a list of str / LatentImage;
        or a batch, a list of such lists, decoded together (one result list per input list). ``cfg_scale`` > 1
        guides each generated image against the inputs with their words dropped (as ``generate_images``); 1 (the
        default) samples images from the prompted stream alone. ``batch`` rows decode at once; when a row ends, the
        next waiting input list takes its place (continuous batching), and greedy rows equal each decoded alone."""
        _check_cfg_scale(cfg_scale)
        _check_count(batch, "batch")
        if not isinstance(inputs, list) or not inputs:
            raise ValueError("inputs must be a non-empty list of strings and images, or a list of such lists")
        many = all(isinstance(x, list) for x in inputs)
        rows = inputs if many else [inputs]
        _check_count(max_images, "max_images", minimum=0)
        _check_count(max_new_tokens, "max_new_tokens")
        prompts = []
        for r, row in enumerate(rows):
            where = f"inputs[{r}]" if many else "inputs"
            if not isinstance(row, list) or not row:
                raise ValueError(f"{where} must be a non-empty list of strings and images")
            items = []
            for i, x in enumerate(row):
                if isinstance(x, str):
                    self._check_text(x, f"{where}[{i}]")
                    items.append(x)
                else:
                    items.append(self._image_item(x, f"{where}[{i}]"))
            prompts.append(self.tokenizer.user_turn(items))
        out = interleaved.interleaved(self.model, self.tokenizer, prompts, max_images, max_new_tokens, sampling,
                                      seeded_generator(seed), cfg_scale, batch)
        return out if many else out[0]

    # --- rendering --------------------------------------------------------------------------------------
    @property
    def decoder(self) -> PixelDecoder:
        """The pixel decoder, loaded from ``decoder/`` on first use."""
        if self._decoder is None:
            if self.decoder_path is None:
                raise RuntimeError("this model folder has no pixel decoder (decoder/); train stage 'decoder'")
            self._decoder = load_decoder_folder(self.decoder_path, self.model.device)
        return self._decoder

    @torch.inference_mode()
    def render(self, latent: LatentImage | list[LatentImage], *, style: str | list[str | None] | None = None,
               reference: LatentImage | list[LatentImage | None] | None = None, seed: int = 0,
               steps: int | None = None):
        """Latent image(s) -> PIL image(s) through the pixel decoder (lazy-loaded on first use). ``style``: a name
        from the decoder's styles (``decoder.cfg.styles``) for all images, or one per image; None = unknown.
        ``reference``: the image each latent started from, of the same grid (e.g. the input of a chain of
        thoughts), one for all or one per image; None = the image itself."""
        single = isinstance(latent, LatentImage)
        if not single and not isinstance(latent, (list, tuple)):
            raise TypeError(f"latent must be a LatentImage or a list of LatentImage, got {type(latent).__name__}")
        latents = [latent] if single else list(latent)
        if not latents or not all(isinstance(x, LatentImage) for x in latents):
            raise TypeError("latent must be a LatentImage or a non-empty list of LatentImage")
        for i, x in enumerate(latents):
            self._check_latent(x, "latent" if single else f"latent[{i}]")
        if len({tuple(x.ids.shape) for x in latents}) > 1:
            raise ValueError("latent: every LatentImage rendered together must have the same grid")
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
        """Active-grid ids (B, g*g, G) -> uint8 pixels (B, R, R, 3) (``generation.render.render_ids``)."""
        if steps is not None:
            _check_count(steps, "steps")
        return render_ids(self.model, self.decoder, ids, style=style, reference=reference, steps=steps,
                          generator=seeded_generator(seed))

    def new_decoder(self, batch: int, max_len: int | None = None) -> Decoder:
        """An empty incremental decoder over this model (``generation.engine.Decoder``), for applications."""
        return new_decoder(self.model, self.tokenizer, batch, max_len)


def _check_cfg_scale(cfg_scale) -> None:
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) or not math.isfinite(cfg_scale) \
            or cfg_scale < 1:
        raise ValueError(f"cfg_scale must be a finite number >= 1, got {cfg_scale!r}")


def _check_list(value, argument: str) -> None:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{argument} must be a list, got {type(value).__name__}")


def _check_count(value, argument: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{argument} must be an int >= {minimum}, got {value!r}")
