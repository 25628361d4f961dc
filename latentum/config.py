"""Typed configs for every model component. Imports nothing heavy (no torch), so the CLI and tests parse fast.

Every dataclass validates itself in ``__post_init__``; ``from_dict`` checks keys and types first, so a bad
field is a one-line error that names it. A recipe's ``model:`` and ``decoder:`` map onto ``ModelConfig`` and
``DecoderConfig``; its legs onto the stage configs of ``train.config``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


ENCODER_KINDS = ("vit", "siglip", "internvit")


@dataclass
class EncoderConfig:
    """Vision encoder (the "VLM" tower): ``kind`` "vit" is our timm ViT over the square canvas, trained from
    scratch; "siglip" and "internvit" are the ``transformers`` towers of pretrained VLMs (``model.towers``)."""

    image_size: int = 128
    """Side of the square input in pixels (content may sit top-left on it, ``data.canvas``)."""
    patch_size: int = 16
    """ViT patch size; the input gives (image_size // patch_size) ** 2 patches."""
    width: int = 128
    depth: int = 2
    heads: int = 4
    kind: str = "vit"
    """"vit" (ours, timm), "siglip" (``SiglipVisionModel``) or "internvit" (``InternVLVisionModel``)."""
    ffn_hidden: int = 0
    """Hidden width of each layer's MLP; 0: 4 * width (the "vit" kind always uses 4 * width)."""
    pixel_shuffle: float = 1.0
    """InternVL's downsample ratio: 0.5 folds each 2 x 2 patch block into one token of 4 * width features
    (448 px / patch 14 -> 32 x 32 patches -> 16 x 16 tokens of 4096). 1.0: one token per patch."""
    norm_eps: float = 1e-6
    """LayerNorm eps of the pretrained towers."""
    qkv_bias: bool = True
    """Biases on the tower's q/k/v projections (InternViT-300M and SigLIP have them)."""
    qk_norm: bool = False
    """Per-head q/k norms in the tower (InternViT-6B has them; InternViT-300M does not)."""

    def __post_init__(self):
        _check(self.kind in ENCODER_KINDS, f"encoder.kind must be one of {ENCODER_KINDS}, got {self.kind!r}")
        _check(self.image_size > 0 and self.image_size % self.patch_size == 0,
               f"encoder.image_size must be a positive multiple of patch_size={self.patch_size}, "
               f"got {self.image_size}")
        _check(self.width % self.heads == 0, f"encoder.width={self.width} must divide by heads={self.heads}")
        _check(self.ffn_hidden >= 0, f"encoder.ffn_hidden must be >= 0 (0: 4 * width), got {self.ffn_hidden}")
        patches = self.image_size // self.patch_size
        _check(self.pixel_shuffle in (1.0, 0.5) and (patches * self.pixel_shuffle).is_integer(),
               f"encoder.pixel_shuffle must be 1.0 or 0.5 with an even patch grid, got {self.pixel_shuffle} "
               f"over {patches} x {patches} patches")
        _check(self.kind != "vit" or self.pixel_shuffle == 1.0,
               "encoder.pixel_shuffle needs a pretrained tower (kind internvit or siglip)")

    @property
    def grid(self) -> int:
        """Side of the token grid: patches per side, times ``pixel_shuffle``."""
        return int(self.image_size // self.patch_size * self.pixel_shuffle)

    @property
    def feature_dim(self) -> int:
        """F: features per token, ``width / pixel_shuffle ** 2``."""
        return int(self.width / self.pixel_shuffle**2)

    @property
    def mlp_hidden(self) -> int:
        return self.ffn_hidden or 4 * self.width

    @property
    def num_tokens(self) -> int:
        return self.grid**2


@dataclass
class QuantizerConfig:
    """MBAQ: down-projection, product VQ with ``codebooks`` separate codebooks per token, up-projection."""

    codebooks: int = 2
    """G: codebook ids per image token (product VQ, one codebook per chunk)."""
    codebook_size: int = 64
    """K: entries per codebook."""
    code_dim: int = 16
    """Dimension of each codebook chunk; a token's code vector z_q has codebooks * code_dim dims."""
    hidden_dim: int = 256
    """Hidden width of the down-projection MLP (and of the up-projection and visual projector unless set)."""
    up_hidden_dim: int = 0
    """Hidden width of the up-projection MLP; 0: ``hidden_dim`` (LatentUM-Base: 16384 down, 10240 up)."""
    projector_hidden_dim: int = 0
    """Hidden width of the model's visual projector (z_q -> backbone); 0: ``hidden_dim``. LatentUM-Base uses the
    backbone width (2560); ours starts the projector as a copy of the up-projection, so it takes that width."""
    commitment_weight: float = 0.25
    entropy_weight: float = 0.1
    """Weight of the codebook-usage entropy bonus (maximised; LatentUM uses 0.1)."""
    dead_code_threshold: float = 0.03
    """A code whose EMA usage falls below this fraction of uniform usage is re-seeded from the batch."""
    norm_latents: bool = False
    """Layer-normalise z (no affine) before the code search, so the down-projection cannot push a token's z far
    out, where it keeps its code whatever the behaviour loss asks (ours; LatentUM searches the raw z)."""
    grown_codebooks: int = 0
    """The last this many of the ``codebooks`` were grown beside trained ones (``model.grow.grow_codebooks``):
    their chunks of z come from the features by a head of their own, outside ``norm_latents``' norm, so the first
    codebooks' ids never depend on them. Code 0 of each is the zero vector, which adds nothing downstream."""

    def __post_init__(self):
        _check(self.codebooks >= 1, f"quantizer.codebooks must be >= 1, got {self.codebooks}")
        _check(self.codebook_size >= 2, f"quantizer.codebook_size must be >= 2, got {self.codebook_size}")
        _check(self.code_dim >= 1, f"quantizer.code_dim must be >= 1, got {self.code_dim}")
        _check(0 <= self.grown_codebooks < self.codebooks, f"quantizer.grown_codebooks must be in [0, codebooks = "
               f"{self.codebooks}), got {self.grown_codebooks}")
        for name in ("hidden_dim", "up_hidden_dim", "projector_hidden_dim"):
            _check(getattr(self, name) >= (1 if name == "hidden_dim" else 0),
                   f"quantizer.{name} must be >= {1 if name == 'hidden_dim' else 0}, got {getattr(self, name)}")

    @property
    def dim(self) -> int:
        return self.codebooks * self.code_dim

    @property
    def base_codebooks(self) -> int:
        """The codebooks read from the down-projection (all but the grown ones)."""
        return self.codebooks - self.grown_codebooks


IMAGE_ROPES = ("1d", "2d")
IMAGE_ATTENTIONS = ("causal", "bidirectional")


@dataclass
class BackboneConfig:
    """MoME decoder-only transformer: shared attention, separate und/gen branches per layer."""

    vocab_size: int = 0
    """Text vocabulary; 0 means "take it from the tokenizer" (the trainer fills it in before building)."""
    dim: int = 128
    depth: int = 4
    heads: int = 4
    kv_heads: int = 4
    ffn_hidden: int = 384
    """SwiGLU hidden size."""
    rope_theta: float = 10000.0
    attn_logit_scale: float = 24.0
    """q/k RMSNorm weights start at sqrt(s / sqrt(head_dim)), so attention logits can reach about s. With unit
    weights and small heads (head_dim 32 caps logits near 5.7) a from-scratch model could not sharpen its
    attention and never learned to read single image cells; pretrained weights overwrite this init."""
    norm_eps: float = 1e-6
    max_seq_len: int = 4096
    image_rope: str = "1d"
    """"1d": image tokens take consecutive RoPE positions in raster order, like text. "2d": the token of cell
    (r, c) of an image whose first token sits at p takes (p + r, p + c), half of the rotary frequencies
    turning with each axis (interleaved), so a cell's neighbours sit at the same relative offset on every map
    size (Qwen2-VL's M-RoPE without time). Text is unchanged: both axes take its 1-D position."""
    image_attention: str = "causal"
    """How the tokens of one image read by the understanding branch (an input image, or a thought read back)
    see each other. "causal": like text, a token sees the tokens before it in raster order. "bidirectional":
    every token sees the whole image (a prefix-LM over each image, as PaliGemma does), so a cell can gather
    all four neighbours in one layer. Generation (the gen branch) is always causal: it is autoregressive."""

    head_size: int = 0
    """Per-head width; 0: dim // heads. Pretrained LMs may set it apart from the width (Qwen3: 128 at 2560 / 32)."""
    attention_bias: bool = False
    """Biases on the q/k/v projections (Qwen2 has them; Qwen3 and Llama do not)."""
    qk_norm: bool = True
    """Per-head RMSNorm of queries and keys before RoPE (Qwen3 and ours; Qwen2 and Llama have none)."""
    tie_embeddings: bool = False
    """The output head shares the token embedding's weights (``tie_word_embeddings`` of an HF config)."""
    rope_scaling: dict[str, Any] | None = None
    """A scaled RoPE as ``transformers`` describes it (``rope_parameters`` with a ``rope_type`` of linear, yarn or
    llama3 and its fields); the frequencies come from ``transformers.modeling_rope_utils``. None: plain RoPE."""

    def __post_init__(self):
        _check(self.head_size >= 0, f"backbone.head_size must be >= 0 (0: dim // heads), got {self.head_size}")
        _check(self.image_rope in IMAGE_ROPES, f"backbone.image_rope must be one of {IMAGE_ROPES}, "
               f"got {self.image_rope!r}")
        _check(self.image_attention in IMAGE_ATTENTIONS, f"backbone.image_attention must be one of "
               f"{IMAGE_ATTENTIONS}, got {self.image_attention!r}")
        _check(self.vocab_size >= 0, f"backbone.vocab_size must be >= 0, got {self.vocab_size}")
        _check(self.head_size > 0 or self.dim % self.heads == 0,
               f"backbone.dim={self.dim} must divide by heads={self.heads} (or set head_size)")
        _check(self.heads % self.kv_heads == 0,
               f"backbone.heads={self.heads} must be a multiple of kv_heads={self.kv_heads}")
        _check(self.head_dim % 2 == 0, "backbone head_dim must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.head_size or self.dim // self.heads


@dataclass
class HeadConfig:
    """Depth-wise AR head: emits the G codebook ids of one image token from the backbone state."""

    depth: int = 1
    heads: int = 4
    mlp_ratio: int = 4
    depth_rope: bool = False
    """Depth positions by 1-D RoPE (theta 1e4) over the depth index, as LatentUM-Base's head; False: a learned
    depth position embedding added to the inputs (ours)."""
    final_norm_eps: float = 1e-6
    """eps of the final RMSNorm before the shared output layer (LatentUM-Base: 1e-5)."""

    def __post_init__(self):
        for name in ("depth", "heads", "mlp_ratio"):
            _check(getattr(self, name) >= 1, f"head.{name} must be >= 1, got {getattr(self, name)}")
        _check(self.final_norm_eps > 0, f"head.final_norm_eps must be > 0, got {self.final_norm_eps}")


@dataclass
class AIAStage:
    """One piecewise-constant stage: layers with relative depth >= ``start`` use this target/delta."""

    start: float
    target: float
    delta: float

    def __post_init__(self):
        _check(0.0 <= self.start < 1.0, f"aia stage start must be in [0, 1), got {self.start}")
        _check(0.0 <= self.target <= 1.0, f"aia stage target must be in [0, 1], got {self.target}")
        _check(self.delta > 0, f"aia stage delta must be > 0, got {self.delta}")


def _default_und_stages() -> list[AIAStage]:
    # Relative-depth mapping of AIA's Janus-Pro understanding table (reference/aia-r3-vsp-geneval.md §1.7a).
    return [AIAStage(0.0, 0.10, 0.05), AIAStage(1 / 3, 0.15, 0.05), AIAStage(2 / 3, 0.30, 0.05)]


def _default_gen_stages() -> list[AIAStage]:
    return [AIAStage(0.0, 0.40, 0.2), AIAStage(1 / 3, 0.40, 0.1), AIAStage(5 / 6, 0.20, 0.05)]


@dataclass
class AIAConfig:
    """Attention Interaction Alignment: Huber pull of per-layer cross-modal attention mass to targets."""

    und_weight: float = 0.1
    gen_weight: float = 0.05
    und_stages: list[AIAStage] = field(default_factory=_default_und_stages)
    gen_stages: list[AIAStage] = field(default_factory=_default_gen_stages)

    def __post_init__(self):
        self.und_stages = [s if isinstance(s, AIAStage) else AIAStage(**s) for s in self.und_stages]
        self.gen_stages = [s if isinstance(s, AIAStage) else AIAStage(**s) for s in self.gen_stages]
        for name in ("und_stages", "gen_stages"):
            stages = getattr(self, name)
            _check(len(stages) > 0 and stages[0].start == 0.0, f"aia.{name} must start with a stage at 0.0")
            starts = [s.start for s in stages]
            _check(starts == sorted(set(starts)), f"aia.{name} starts must increase strictly, got {starts}")
        _check(self.und_weight >= 0 and self.gen_weight >= 0, "aia weights must be >= 0")


@dataclass
class DecoderConfig:
    """Pixel decoder: a diffusers UNet2DModel conditioned on the spatial map of quantized codes, the codes of the
    image each one started from, a style label and a summary of the whole code grid (``model.decoder``)."""

    resolution: int = 64
    """Output side in pixels (the canvas is rendered at this size)."""
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    layers_per_block: int = 1
    cond_channels: int = 16
    """Channels of the projected code map fed next to the noisy image (twice: the codes', the reference's)."""
    train_timesteps: int = 1000
    inference_steps: int = 8
    prediction_type: str = "sample"
    styles: list[str] = field(default_factory=lambda: ["none"])
    """Render styles the decoder is conditioned on, index 0 "none" = unknown style (callers that do not know it).
    Semantic codes keep little of an image's look, so a world with several looks names them here (its samples
    carry ``meta["style"]``) and the decoder draws the one asked for."""
    style_dropout: float = 0.1
    """Training: probability an image's style label is replaced by "none", so the unknown style still renders
    (a blend of the looks) instead of an untrained one."""
    summary: int = 64
    """Width of the summary of the whole code grid (a per-token MLP, max over tokens) added to the timestep
    embedding next to the style's: what no cell's code says alone. Its last layer starts at zero."""

    def __post_init__(self):
        _check(self.prediction_type in ("epsilon", "sample", "v_prediction"),
               f"decoder.prediction_type must be epsilon|sample|v_prediction, got {self.prediction_type!r}")
        _check(len(self.channels) >= 1 and all(c >= 1 for c in self.channels),
               f"decoder.channels must be a non-empty list of ints >= 1, got {self.channels!r}")
        _check(self.resolution % 2 ** (len(self.channels) - 1) == 0,
               f"decoder.resolution={self.resolution} must divide by 2**(len(channels)-1)")
        _check(all(isinstance(s, str) and s for s in self.styles) and len(set(self.styles)) == len(self.styles),
               f"decoder.styles must be distinct non-empty names, got {self.styles!r}")
        _check(bool(self.styles) and self.styles[0] == "none",
               f"decoder.styles must start with \"none\" (index 0, the unknown style), got {self.styles!r}")
        _check(0 <= self.style_dropout <= 1, f"decoder.style_dropout must be in [0, 1], got {self.style_dropout}")
        _check(self.summary >= 1, f"decoder.summary must be an int >= 1, got {self.summary!r}")


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    ground_coordinates: bool = False
    """Coordinates written in a prompt ("row 2 column 3") carry the named cell's position embedding from the
    column number to the end of the text (``canvas.named_cells``), the embedding every image token of that cell
    carries (``CellPositions``), like the location tokens of Kosmos-2 / PaliGemma: a question then finds its
    cell by matching the same vector, not by learning which number word means which row, and the token that
    predicts the answer holds it itself (one attention step, not two). A recipe can switch it on for a model
    it continues."""
    cell_positions: bool = True
    """Image tokens carry their canvas cell's learned 2-D position (``CellPositions``; ours). Pretrained VLMs
    and LatentUM-Base have none: image tokens are placed by 1-D RoPE alone."""

    def __post_init__(self):
        _check(self.cell_positions or not self.ground_coordinates,
               "model.ground_coordinates needs model.cell_positions (it adds the named cell's position)")


def from_dict(cls: type, data: dict[str, Any], where: str = ""):
    """Build dataclass ``cls`` from a plain dict, recursing into nested dataclasses; unknown keys and values of the
    wrong type raise a ValueError naming the field (``where`` prefixes its path, e.g. "model.encoder")."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{where or cls.__name__}: unknown keys {sorted(unknown)}; expected some of {sorted(known)}")
    hints = get_type_hints(cls)
    kwargs = {}
    for k, v in data.items():
        t, name = hints[k], f"{where}.{k}" if where else k
        nested = [a for a in (t, *get_args(t)) if is_dataclass(a)]  # a dataclass, or an optional one
        if nested and isinstance(v, dict):
            kwargs[k] = from_dict(nested[0], v, name)
        elif is_dataclass(t):
            kwargs[k] = v if isinstance(v, t) else from_dict(t, v, name)
        else:
            _check(_is_instance(v, t), f"{name} must be {_type_name(t)}, got {v!r}")
            kwargs[k] = v
    return cls(**kwargs)


def _is_instance(value, hint) -> bool:
    """Whether a YAML/JSON value fits a config field's type hint (int fits float; bool fits only bool)."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, UnionType):
        return any(_is_instance(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_is_instance(x, args[0]) for x in value)
    if origin is dict:
        return isinstance(value, dict) and all(_is_instance(k, args[0]) and _is_instance(x, args[1])
                                               for k, x in value.items())
    if is_dataclass(hint):
        return isinstance(value, (hint, dict))
    return True


def _type_name(hint) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    if origin is dict:
        return f"a mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    return {bool: "true or false", int: "an int", float: "a finite number", str: "a string",
            type(None): "null"}.get(hint, getattr(hint, "__name__", str(hint)))


def to_dict(cfg) -> dict[str, Any]:
    return asdict(cfg)
