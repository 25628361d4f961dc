"""One save/load module for model folders, used by the API and by training alike.

A model folder is self-describing: ``config.json`` (format version + ``ModelConfig``, and where it came from),
``model.safetensors`` and ``tokenizer.json``, with an optional pixel decoder in ``decoder/``. Folders are
written to a temporary sibling and renamed into place, so a killed export never leaves a half-written folder;
files are world-readable. Every way a folder can be broken is a one-line ``ValueError`` naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_model
from transformers import InternVLForConditionalGeneration

from latentum.config import DecoderConfig, HeadConfig, ModelConfig, QuantizerConfig, from_dict, to_dict
from latentum.data.hf_tokenizer import AnyTokenizer, HFTokenizer, load_tokenizer
from latentum.data.tokenizer import TextTokenizer
from latentum.model.backbone import RotaryEmbedding, rope_frequencies
from latentum.model.decoder import PixelDecoder
from latentum.model.hf import model_from_hf_vlm
from latentum.model.latentum import LatentUMModel
from latentum.model.official import is_official_config, official_model_config, official_state_to_ours

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DECODER_DIR = "decoder"
TOKENIZER_NAME = "tokenizer.json"


def read_config(path: Path) -> dict:
    """``path/config.json`` as a dict; ValueError naming the file if it is missing or not a JSON object."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise ValueError(f"{str(path)!r} is not a latentum model folder (no {CONFIG_NAME})")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(file)!r} is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{str(file)!r} must hold a JSON object, got {type(meta).__name__}")
    return meta


def load_weights(module: torch.nn.Module, file: Path, device: str | torch.device = "cpu") -> None:
    """Load ``file`` (safetensors) into ``module`` strictly; ValueError naming the file on a truncated or
    foreign file, or on missing, unexpected or wrong-shaped tensors."""
    if not Path(file).is_file():
        raise ValueError(f"{str(file)!r} is missing")
    try:
        missing, unexpected = load_model(module, str(file), strict=False, device=str(device))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{str(file)!r} is not a readable safetensors file ({e})") from e
    except RuntimeError as e:  # size mismatches
        first = str(e).strip().splitlines()[-1].strip()
        raise ValueError(f"{str(file)!r} does not fit the model of its config.json ({first})") from e
    if missing or unexpected:
        raise ValueError(f"{str(file)!r} does not fit the model of its config.json (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")


def load_model_folder(path: str | Path, device: str | torch.device = "cpu") -> tuple[LatentUMModel, AnyTokenizer]:
    """A model folder -> (model in eval mode, tokenizer); checks every file before any weight is used. An official
    LatentUM folder (``model.official``) is converted on the way in."""
    path = Path(path)
    meta = read_config(path)
    if is_official_config(meta):
        return load_official_folder(path, meta, device)
    for name in (WEIGHTS_NAME, TOKENIZER_NAME):
        if not (path / name).is_file():
            raise ValueError(f"{str(path)!r} is not a complete model folder (no {name})")
    if "model" not in meta:
        raise ValueError(f"{str(path / CONFIG_NAME)!r} is not a latentum config (no 'model' section)")
    try:
        cfg = from_dict(ModelConfig, meta["model"], "model")
    except (TypeError, ValueError) as e:
        raise ValueError(f"{str(path / CONFIG_NAME)!r}: {e}") from e
    tok = _read_tokenizer(path, cfg)
    model = LatentUMModel(cfg)
    load_weights(model, path / WEIGHTS_NAME, device)
    return model.to(device).eval(), tok


def _read_tokenizer(path: Path, cfg: ModelConfig):
    """The folder's tokenizer (ours, or a ``transformers`` one), checked against the model's vocabulary: ours must
    fill it exactly; a pretrained one may leave padding rows (Qwen's embedding has more rows than tokens)."""
    try:
        tok = load_tokenizer(path)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"{str(path)!r}: {e}") from e
    except Exception as e:  # the tokenizers library raises its own exception types for broken files
        raise ValueError(f"{str(path / TOKENIZER_NAME)!r} is not a readable tokenizer ({e})") from e
    fits = tok.vocab_size == cfg.backbone.vocab_size if isinstance(tok, TextTokenizer) \
        else tok.vocab_size <= cfg.backbone.vocab_size
    if not fits:
        raise ValueError(f"{str(path)!r}: the tokenizer has {tok.vocab_size} tokens but config.json expects "
                         f"{cfg.backbone.vocab_size}")
    return tok


def load_official_folder(path: str | Path, meta: dict | None = None, device: str | torch.device = "cpu"):
    """An official LatentUM folder (reference §7: config.json with ``internvl_config``, one model.safetensors under
    ``internvl.`` / ``quantizer.``, the InternVL tokenizer files) -> (model in eval mode, tokenizer). The model is
    built on the meta device and takes the file's tensors as they are, so nothing is allocated twice."""
    path = Path(path)
    meta = read_config(path) if meta is None else meta
    file = path / WEIGHTS_NAME
    if not file.is_file():
        raise ValueError(f"{str(path)!r} is not a complete official LatentUM folder (no {WEIGHTS_NAME})")
    try:
        state = load_file(str(file), device=str(device))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{str(file)!r} is not a readable safetensors file ({e})") from e
    try:
        cfg = official_model_config(meta, state, str(path / CONFIG_NAME))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{e}" if str(path) in str(e) else f"{str(path / CONFIG_NAME)!r}: {e}") from e
    tok = _read_tokenizer(path, cfg)
    with torch.device("meta"):
        model = LatentUMModel(cfg)
    weights = official_state_to_ours(state, cfg, model.state_dict(), str(file))
    model.load_state_dict(weights, strict=True, assign=True)
    if cfg.backbone.tie_embeddings:
        model.backbone.lm_head.weight = model.backbone.embedding.weight
    _fill_computed_buffers(model, device)
    return model.to(device).eval(), tok


def convert_official(source: str | Path, out: str | Path) -> Path:
    """An official LatentUM folder -> a latentum model folder at ``out`` (``origin`` names the source)."""
    meta = read_config(Path(source))
    if not is_official_config(meta):
        raise ValueError(f"{str(Path(source) / CONFIG_NAME)!r} is not an official LatentUM config "
                         "(expected 'internvl_config' and 'mixture_mode')")
    model, tok = load_official_folder(source, meta)
    return save_model_folder(model, tok, out, origin={"converted_from": str(source)})


def convert_hf_vlm(source: str | Path, out: str | Path, quantizer: QuantizerConfig, head: HeadConfig) -> Path:
    """A local ``transformers`` InternVL folder (``InternVLForConditionalGeneration`` weights, its tokenizer with
    the image tokens) -> a latentum model folder at stage 0 (``model.hf.model_from_hf_vlm``), which a recipe's
    ``mbaq`` leg continues with ``init_from``. Nothing is downloaded."""
    source = Path(source)
    meta = read_config(source)
    if meta.get("model_type") != "internvl":
        raise ValueError(f"{str(source / CONFIG_NAME)!r}: model_type must be 'internvl' (a transformers InternVL "
                         f"folder), got {meta.get('model_type')!r}")
    tok = HFTokenizer.load(source)
    hf_vlm = InternVLForConditionalGeneration.from_pretrained(source, local_files_only=True, dtype=torch.float32)
    model = model_from_hf_vlm(hf_vlm.eval(), quantizer, head)
    return save_model_folder(model, tok, out, origin={"converted_from": str(source)})


def _fill_computed_buffers(model: LatentUMModel, device) -> None:
    """Buffers a state dict does not carry (RoPE frequencies, position ids) are computed, not loaded: a model
    built on the meta device gets them here, as its constructor would have made them."""
    for name, module in model.named_modules():
        for leaf, buf in list(module.named_buffers(recurse=False)):
            if not buf.is_meta:
                continue
            if isinstance(module, RotaryEmbedding):
                value = rope_frequencies(model.cfg.backbone)[0]
            elif leaf == "position_ids":  # transformers vision embeddings: arange over the positions
                value = torch.arange(buf.shape[-1]).expand(buf.shape)
            elif leaf == "zero":  # vector-quantize-pytorch's constant
                value = torch.zeros(buf.shape)
            elif leaf == "last_seen":  # MBAQ's run statistic: no code seen yet
                value = torch.full(buf.shape, -1)
            else:
                raise ValueError(f"official model: buffer {name}.{leaf} has no value to load or compute")
            setattr(module, leaf, value.to(device=device, dtype=buf.dtype))


def decoder_folder(path: str | Path) -> Path | None:
    """The pixel decoder folder of a model folder, or None when it has none."""
    folder = Path(path) / DECODER_DIR
    return folder if (folder / CONFIG_NAME).is_file() else None


def save_decoder_folder(decoder: PixelDecoder, path: str | Path, origin: dict | None = None) -> Path:
    """Write a pixel decoder folder atomically: config.json (DecoderConfig + code_dim + grid, and ``origin``: the
    recipe and commit it came from), model.safetensors."""

    def write(tmp: Path) -> None:
        meta = {"format_version": FORMAT_VERSION, "decoder": to_dict(decoder.cfg), "code_dim": decoder.code_dim,
                "grid": decoder.grid}
        if origin:
            meta["origin"] = origin
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
        save_model(decoder, str(tmp / WEIGHTS_NAME))

    return write_folder_atomically(path, write)


def load_decoder_folder(path: str | Path, device: str | torch.device = "cpu") -> PixelDecoder:
    """A pixel decoder folder (``save_decoder_folder``) -> the decoder in eval mode."""
    path = Path(path)
    meta = read_config(path)
    where = str(path / CONFIG_NAME)
    if "sd3_5_path" in meta:
        raise ValueError(f"{where!r} is an official LatentUM pixel decoder: an SD3.5-Medium MMDiT-X whose "
                         f"model.safetensors holds only the transformer; it needs the SD3.5-Medium VAE and base "
                         f"weights from sd3_5_path={meta['sd3_5_path']!r}, which latentum does not run. Render with a "
                         "latentum decoder trained on this model's codes (stage 'decoder')")
    if "decoder" not in meta or not isinstance(meta.get("code_dim"), int) or not isinstance(meta.get("grid"), int):
        raise ValueError(f"{where!r} is not a pixel decoder config (expected 'decoder', 'code_dim' and 'grid')")
    if meta.get("format_version") != FORMAT_VERSION or not isinstance(meta["decoder"], dict) \
            or "reference" in meta["decoder"] or "summary" not in meta["decoder"]:
        raise ValueError(f"{where!r} was saved in an older decoder format (before every decoder had reference "
                         "conditioning and a code-grid summary); train stage 'decoder' again")
    try:
        cfg = from_dict(DecoderConfig, meta["decoder"], "decoder")
        decoder = PixelDecoder(cfg, code_dim=meta["code_dim"], grid=meta["grid"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where!r}: {e}") from e
    load_weights(decoder, path / WEIGHTS_NAME, device)
    return decoder.to(device).eval()


def save_model_folder(model: LatentUMModel, tokenizer: AnyTokenizer, path: str | Path,
                      origin: dict | None = None, decoder: PixelDecoder | None = None) -> Path:
    """Write a self-describing model folder atomically: config.json (+ ``origin``: the recipe and commit it
    came from), model.safetensors, tokenizer.json, and ``decoder/`` if a decoder is given."""

    def write(tmp: Path) -> None:
        meta = {"format_version": FORMAT_VERSION, "model": to_dict(model.cfg)}
        if origin:
            meta["origin"] = origin
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
        save_model(model, str(tmp / WEIGHTS_NAME))
        tokenizer.save(tmp)
        if decoder is not None:
            save_decoder_folder(decoder, tmp / DECODER_DIR)

    return write_folder_atomically(path, write)


def write_folder_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a fresh temporary sibling of ``path``, make its files world-readable, then put it in
    place of ``path`` (the old folder, if any, is replaced only once the new one is complete)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        for root, _dirs, files in os.walk(tmp):
            os.chmod(root, 0o755)
            for f in files:
                os.chmod(os.path.join(root, f), 0o644)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path
