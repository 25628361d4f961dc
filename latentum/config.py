"""Typed configs for every component. Imports nothing heavy (no torch), so the CLI and tests parse fast.

Every dataclass validates itself in ``__post_init__``; the YAML files in ``configs/`` map onto these
(``ModelConfig`` under ``model:``, ``TrainConfig`` per stage under ``stages:``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, get_type_hints


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass
class EncoderConfig:
    """Vision encoder: a timm ViT over the square image canvas (the "VLM" side of stage 0)."""

    image_size: int = 128
    """Side of the square canvas in pixels (FrozenLake maps are fitted onto it, one patch per cell)."""
    patch_size: int = 16
    """ViT patch size; the canvas gives (image_size // patch_size) ** 2 image tokens."""
    width: int = 128
    depth: int = 2
    heads: int = 4

    def __post_init__(self):
        _check(self.image_size > 0 and self.image_size % self.patch_size == 0,
               f"encoder.image_size must be a positive multiple of patch_size={self.patch_size}, "
               f"got {self.image_size}")
        _check(self.width % self.heads == 0, f"encoder.width={self.width} must divide by heads={self.heads}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

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
    """Hidden width of the down/up projection MLPs."""
    commitment_weight: float = 0.25
    entropy_weight: float = 0.1
    """Weight of the codebook-usage entropy bonus (maximised; LatentUM uses 0.1)."""
    dead_code_threshold: float = 0.03
    """A code whose EMA usage falls below this fraction of uniform usage is re-seeded from the batch."""
    norm_latents: bool = False
    """Layer-normalise z (no affine) before the code search, so the down-projection cannot push a token's z far
    out, where it keeps its code whatever the behaviour loss asks (ours; LatentUM searches the raw z)."""

    def __post_init__(self):
        _check(self.codebooks >= 1, f"quantizer.codebooks must be >= 1, got {self.codebooks}")
        _check(self.codebook_size >= 2, f"quantizer.codebook_size must be >= 2, got {self.codebook_size}")
        _check(self.code_dim >= 1, f"quantizer.code_dim must be >= 1, got {self.code_dim}")

    @property
    def dim(self) -> int:
        return self.codebooks * self.code_dim


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

    def __post_init__(self):
        _check(self.image_rope in IMAGE_ROPES, f"backbone.image_rope must be one of {IMAGE_ROPES}, "
               f"got {self.image_rope!r}")
        _check(self.image_attention in IMAGE_ATTENTIONS, f"backbone.image_attention must be one of "
               f"{IMAGE_ATTENTIONS}, got {self.image_attention!r}")
        _check(self.vocab_size >= 0, f"backbone.vocab_size must be >= 0, got {self.vocab_size}")
        _check(self.dim % self.heads == 0, f"backbone.dim={self.dim} must divide by heads={self.heads}")
        _check(self.heads % self.kv_heads == 0,
               f"backbone.heads={self.heads} must be a multiple of kv_heads={self.kv_heads}")
        _check((self.dim // self.heads) % 2 == 0, "backbone head_dim must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


@dataclass
class HeadConfig:
    """Depth-wise AR head: emits the G codebook ids of one image token from the backbone state."""

    depth: int = 1
    heads: int = 4
    mlp_ratio: int = 4

    def __post_init__(self):
        for name in ("depth", "heads", "mlp_ratio"):
            _check(getattr(self, name) >= 1, f"head.{name} must be >= 1, got {getattr(self, name)}")


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
    """Pixel decoder: a diffusers UNet2DModel conditioned on the spatial map of quantized codes."""

    resolution: int = 64
    """Output side in pixels (the canvas is rendered at this size)."""
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    layers_per_block: int = 1
    cond_channels: int = 16
    """Channels of the projected code map fed next to the noisy image."""
    train_timesteps: int = 1000
    inference_steps: int = 8
    prediction_type: str = "sample"
    styles: list[str] = field(default_factory=lambda: ["none", "gymnasium", "classic"])
    """Render styles the decoder is conditioned on (a diffusers class embedding), index 0 "none" = unknown style
    (Shapes images, callers that do not know it). MBAQ codes are style-agnostic, so without a label the decoder
    draws a blend of the FrozenLake looks. Empty: no style conditioning (decoders saved before it existed)."""
    style_dropout: float = 0.1
    """Training: probability a FrozenLake image's style label is replaced by "none", so an unknown style still
    renders a board (the blend an unconditioned decoder draws) instead of an untrained one."""
    reference: bool = False
    """Also condition on a reference image's codes: the map a thought started from (an input map, the player on
    its start cell). MBAQ codes alias the player and the start stool (a board with the two swapped has the same
    code grid), so from a thought's codes alone no decoder can tell which of two such cells is the player; the
    reference shows which one is the stool. An image without one (an input map, a Shapes image) is its own
    reference. False: codes only, as every decoder saved before this existed."""
    summary: int = 0
    """Width of a summary of the whole code grid (a per-token MLP, max over tokens) added to the timestep
    embedding next to the style's: what no cell's code says alone, e.g. that no cell holds the player (the
    classic player on the goal, whose cell MBAQ codes as the goal alone). Its last layer starts at zero, so a
    decoder grown from one without it renders exactly as before. 0: none, as every decoder saved before it."""

    def __post_init__(self):
        _check(self.prediction_type in ("epsilon", "sample", "v_prediction"),
               f"decoder.prediction_type must be epsilon|sample|v_prediction, got {self.prediction_type!r}")
        _check(self.resolution % 2 ** (len(self.channels) - 1) == 0,
               f"decoder.resolution={self.resolution} must divide by 2**(len(channels)-1)")
        _check(all(isinstance(s, str) and s for s in self.styles) and len(set(self.styles)) == len(self.styles),
               f"decoder.styles must be distinct non-empty names, got {self.styles!r}")
        _check(not self.styles or self.styles[0] == "none",
               f"decoder.styles must start with \"none\" (index 0, the unknown style) or be empty, got {self.styles!r}")
        _check(0 <= self.style_dropout <= 1, f"decoder.style_dropout must be in [0, 1], got {self.style_dropout}")
        _check(isinstance(self.reference, bool), f"decoder.reference must be true or false, got {self.reference!r}")
        _check(isinstance(self.summary, int) and not isinstance(self.summary, bool) and self.summary >= 0,
               f"decoder.summary must be an int >= 0 (0: no summary), got {self.summary!r}")


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


@dataclass
class TrainConfig:
    """One training stage (a LightningModule + its data) as the YAML writes it."""

    steps: int = 100
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    grad_clip: float = 1.0
    precision: str = "bf16-mixed"
    """Lightning precision; bf16 autocast is several times faster on CPUs with AMX."""
    strategy: str = "auto"
    """Lightning strategy: auto | ddp | ddp_spawn | fsdp."""
    devices: int = 1
    log_every: int = 10
    checkpoint_every: int = 100
    seed: int = 0
    init_from: str | None = None
    """Start from this exported model folder instead of the previous stage's export (e.g. a baseline that
    shares another recipe's stages 0-1)."""
    init_generation: bool = True
    """Stage 2: start the generation branch as a copy of the understanding branch and the visual projector as
    MBAQ's up-projection (LatentUM). False keeps them as loaded, to continue a trained stage-2 model
    (``init_from`` its export) with a new mixture or schedule."""
    init_projector: bool | None = None
    """Stage 2: start the visual projector as a copy of MBAQ's up-projection; None follows ``init_generation``.
    True with ``init_generation: false`` continues a stage-2 model whose quantizer was retrained since, so
    its thoughts are read the way the new codes were aligned from the first step."""
    init_decoder: str | None = None
    """Stage 3: start the pixel decoder from this decoder folder (``PixelDecoder.save_pretrained``, e.g.
    ``checkpoints/tiny/decoder``) instead of random weights, to train it further; its config must equal the
    recipe's ``decoder``."""
    fresh_quantizer: bool = False
    """Stage 1 from a trained model (``init_from``): start the quantizer from random weights instead of the
    loaded one, e.g. to align it again on a new task mixture with a stage-2 model as the teacher."""
    tasks: dict[str, float] = field(default_factory=dict)
    """Task name -> sampling weight for this stage's data mixture."""
    map_sizes: list[int] = field(default_factory=lambda: [3, 4, 5, 6, 7, 8])
    train_understanding: bool = True
    """Stage 2 only: also train the understanding branch (text loss on trajectories)."""
    aia: AIAConfig = field(default_factory=AIAConfig)
    changed_weight: float = 1.0
    """Stage 2: loss weight of latent tokens whose pixels differ from the previous image's (the cells a
    planning move changes) relative to unchanged ones; 1 = uniform. Without it copying scores ~98% on 8x8.
    Stage 3: the same for the decoder's pixels in cells that differ from the image's reference (where the
    player went and came from; an input map is its own reference, so it trains uniformly)."""
    code_noise: float = 0.15
    """Stage 2: probability of replacing each code of a read-back latent by a random one (LatentUM §8)."""
    aia_queries: int = 16
    """AIA intensity per sample is estimated from at most this many random rows of its query span (an
    unbiased estimate of the span mean; the full span costs Q x S logits per head and layer)."""
    bucket: int = 4
    """Draw ``bucket`` batches of samples at once and batch them by length, so rows pad less."""
    cfg_dropout: float = 0.1
    """Stage 2: probability of dropping the prompt of a text-to-image sample (classifier-free guidance)."""
    latent_inputs: float = 0.0
    """Stage 2: probability that a question's input image is read as its latent codes, the way the model reads
    its own visual thoughts back, instead of as continuous features (``LatentView``). Questions (samples with
    no assistant image) only; teaches answering about a thought (``answer_latents``, ``fidelity_read``)."""

    def __post_init__(self):
        if isinstance(self.aia, dict):
            self.aia = AIAConfig(**self.aia)
        _check(self.steps > 0, f"steps must be > 0, got {self.steps}")
        _check(self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(all(w >= 0 for w in self.tasks.values()), f"task weights must be >= 0, got {self.tasks}")
        _check(all(3 <= s <= 8 for s in self.map_sizes), f"map_sizes must be within 3..8, got {self.map_sizes}")
        _check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(self.log_every > 0 and self.checkpoint_every > 0, "log_every and checkpoint_every must be > 0")
        _check(self.devices >= 1, f"devices must be >= 1, got {self.devices}")
        _check(self.changed_weight >= 1, f"changed_weight must be >= 1, got {self.changed_weight}")
        for name in ("code_noise", "cfg_dropout", "latent_inputs"):
            _check(0 <= getattr(self, name) <= 1, f"{name} must be in [0, 1], got {getattr(self, name)}")


STAGES = ("vlm", "mbaq", "mome", "decoder")


@dataclass
class RecipeConfig:
    """A whole recipe: the model, the pixel decoder and one TrainConfig per stage."""

    model: ModelConfig = field(default_factory=ModelConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    stages: dict[str, TrainConfig] = field(default_factory=dict)
    name: str = "recipe"

    def __post_init__(self):
        if isinstance(self.model, dict):
            self.model = from_dict(ModelConfig, self.model)
        if isinstance(self.decoder, dict):
            self.decoder = from_dict(DecoderConfig, self.decoder)
        self.stages = {k: v if isinstance(v, TrainConfig) else from_dict(TrainConfig, v)
                       for k, v in self.stages.items()}
        unknown = set(self.stages) - set(STAGES)
        _check(not unknown, f"unknown stages {sorted(unknown)}; expected a subset of {STAGES}")


def from_dict(cls: type, data: dict[str, Any]):
    """Build dataclass ``cls`` from a plain dict, recursing into nested dataclasses; unknown keys raise."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__} expects a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}; expected some of {sorted(known)}")
    hints = get_type_hints(cls)
    kwargs = {}
    for k, v in data.items():
        t = hints[k]
        kwargs[k] = from_dict(t, v) if is_dataclass(t) and isinstance(v, dict) else v
    return cls(**kwargs)


def to_dict(cfg) -> dict[str, Any]:
    return asdict(cfg)


def load_recipe(path: str) -> RecipeConfig:
    """Parse a recipe YAML (``configs/*.yaml``) into a validated RecipeConfig."""
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping at the top level")
    return from_dict(RecipeConfig, data)
