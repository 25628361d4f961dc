"""Training recipes: one typed config per stage, and a recipe of ordered legs (``configs/``).

A recipe gives the model, the pixel decoder and its legs in order. A leg runs one stage (``vlm``, ``mbaq``,
``mome`` or ``decoder``) and is configured by that stage's dataclass below; unknown keys and wrong types are
errors naming the field. ``stages:`` (one leg per stage, named after it) is the short form of ``legs:``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from latentum.config import AIAConfig, DecoderConfig, ModelConfig, QuantizerConfig, _check, from_dict
from latentum.worlds.registry import check_mixture

STRATEGIES = ("auto", "ddp", "ddp_spawn", "fsdp")


@dataclass
class StageConfig:
    """What every stage shares: its length, optimiser, precision, parallelism, checkpoints and data."""

    steps: int = 100
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    grad_clip: float = 1.0
    precision: str = "auto"
    """Lightning precision (e.g. bf16-mixed, 32-true); auto: bf16 autocast where bf16 is fast (CUDA with bf16, a
    CPU with AMX, or where a probe measures it faster), else fp32 (``train.precision``)."""
    strategy: str = "auto"
    """Lightning strategy: auto | ddp | ddp_spawn | fsdp (``train.run.strategy``: fsdp shards each backbone
    layer, checkpoints sharded, exports a full state dict gathered on rank 0)."""
    activation_checkpointing: bool = False
    """With fsdp: recompute each backbone layer's activations in the backward pass instead of keeping them."""
    devices: int = 1
    collective_timeout: float = 300.0
    """Seconds a multi-process collective (a gradient all-reduce, the export barrier) may wait for the other
    ranks before the run stops with an error, instead of hanging when a rank died or stalled."""
    log_every: int = 10
    checkpoint_every: int = 100
    seed: int = 0
    grow_vocabulary: bool = False
    """Add the built-in worlds' words that the loaded model's word-level tokenizer lacks (new tasks' words), after
    its own ids; the new embedding rows start at the mean (``TextTokenizer.extended``)."""
    init_from: str | None = None
    """Start from this leg's export (a leg name) or exported model folder (a path) instead of the default: the
    previous leg that exports a model."""
    ground_coordinates: bool | None = None
    """Switch ``ModelConfig.ground_coordinates`` on (or off) for the model this leg continues; None keeps the
    loaded model's (or, with the recipe's ``model.ground_coordinates: true``, switches it on)."""
    tasks: dict[str, float] = field(default_factory=dict)
    """Task name -> sampling weight for this leg's data mixture (``worlds.registry.TASKS``)."""
    worlds: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Options per world for its tasks, e.g. ``{frozenlake: {map_sizes: [3, 4]}}`` (``worlds.registry``)."""
    bucket: int = 4
    """Draw ``bucket`` batches of samples at once and batch them by length, so rows pad less."""

    def __post_init__(self):
        _check(self.steps > 0, f"steps must be > 0, got {self.steps}")
        _check(self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(self.log_every > 0 and self.checkpoint_every > 0, "log_every and checkpoint_every must be > 0")
        _check(self.devices >= 1, f"devices must be >= 1, got {self.devices}")
        _check(self.strategy in STRATEGIES, f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        _check(self.collective_timeout > 0, f"collective_timeout must be > 0, got {self.collective_timeout}")
        _check(self.bucket >= 1, f"bucket must be >= 1, got {self.bucket}")
        check_mixture(self.tasks, self.worlds)


@dataclass
class PackedStageConfig(StageConfig):
    """Stages that train the backbone side on packed sequences (``data.packing``)."""

    aia_queries: int = 16
    """AIA intensity per sample is estimated from at most this many random rows of its query span (an unbiased
    estimate of the span mean; the full span costs Q x S logits per head and layer)."""
    cfg_dropout: float = 0.1
    """Probability of dropping the prompt of a text-to-image sample (classifier-free guidance)."""
    latent_inputs: float = 0.0
    """Probability that a question's input image is read as its latent codes, the way the model reads its own
    generated images back, instead of as continuous features (``LatentView``). Questions (samples with no
    assistant image) only; teaches answering about a generated image (``answer_latents``)."""
    text_weighting: str = "token"
    """How the text loss averages: ``token`` (every supervised token weighs the same, so a 40-token answer
    outweighs a one-word answer 40:1 in a mixed batch) or ``sample`` (every sample's answer weighs the same)."""

    def __post_init__(self):
        super().__post_init__()
        for name in ("cfg_dropout", "latent_inputs"):
            _check(0 <= getattr(self, name) <= 1, f"{name} must be in [0, 1], got {getattr(self, name)}")
        _check(self.text_weighting in ("token", "sample"),
               f"text_weighting must be 'token' or 'sample', got {self.text_weighting!r}")


@dataclass
class KeepFeaturesConfig:
    """An encoder taught new images without moving its features of old ones: MSE to the features as loaded."""

    tasks: dict[str, float] = field(default_factory=dict)
    """The tasks whose images keep their features (every image of a sample)."""
    images: int = 16
    """Images drawn per step."""
    weight: float = 10.0

    def __post_init__(self):
        _check(bool(self.tasks), "keep_features.tasks must name at least one task")
        check_mixture(self.tasks)
        _check(self.images >= 1, f"keep_features.images must be >= 1, got {self.images}")
        _check(self.weight >= 0, f"keep_features.weight must be >= 0, got {self.weight}")


@dataclass
class VLMConfig(PackedStageConfig):
    """Stage 0 (the tiny model only): the base VLM learns understanding with continuous image features."""

    train_encoder: bool = True
    """Also train the vision encoder. False keeps it (and so every image's features and codes) as loaded, e.g.
    to teach a trained model a new world as the teacher a quantizer is aligned on (``MBAQConfig.teacher``)."""
    keep_features: KeepFeaturesConfig | None = None
    """With ``train_encoder``: keep the encoder's features of some tasks' images where they were when the leg
    started (MSE), so a model that reads them keeps reading them the same."""

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.keep_features, dict):
            self.keep_features = from_dict(KeepFeaturesConfig, self.keep_features, "keep_features")
        _check(self.keep_features is None or self.train_encoder, "keep_features needs train_encoder: true")
        _check(self.strategy != "fsdp" or self.keep_features is None,
               "keep_features is not supported with strategy: fsdp (the encoder is sharded)")


@dataclass
class KeepCodesConfig:
    """A quantizer aligned on new images without changing the codes of old ones: the codebook rows the old images
    use stay exactly as loaded, and their latents are pulled to where they were (MSE, ``weight``)."""

    tasks: dict[str, float] = field(default_factory=dict)
    """The tasks whose images keep their codes (every image of a sample: inputs and targets)."""
    images: int = 16
    """Images of those tasks drawn per step for the latent loss."""
    weight: float = 10.0
    margin: float = 0.25
    """Every code the kept images do not use must stay at least this much (squared distance) farther from a kept
    latent than its own code."""
    probe_images: int = 512
    """Images drawn when the leg starts to find the codebook rows they use (those rows are frozen)."""
    zero_ball: float = 0.0
    """For a quantizer with grown codebooks: every code of a grown codebook but code 0 (the zero vector, where the
    kept images go) is kept at least this far from zero (squared norm) after each step, so a kept latent nearer
    zero than half that radius keeps code 0 whatever other codes the leg revives or moves (0: no ball)."""

    def __post_init__(self):
        _check(bool(self.tasks), "keep_codes.tasks must name at least one task")
        check_mixture(self.tasks)
        _check(self.images >= 1 and self.probe_images >= 1, "keep_codes.images and probe_images must be >= 1")
        _check(self.weight >= 0, f"keep_codes.weight must be >= 0, got {self.weight}")
        _check(self.margin >= 0, f"keep_codes.margin must be >= 0, got {self.margin}")
        _check(self.zero_ball >= 0, f"keep_codes.zero_ball must be >= 0, got {self.zero_ball}")


@dataclass
class MBAQConfig(PackedStageConfig):
    """Stage 1: the quantizer learns to make the frozen VLM behave the same on its codes."""

    fresh_quantizer: bool = False
    """Start the quantizer from random weights instead of the loaded one, e.g. to align it again on a new task
    mixture with a trained model as the teacher."""
    quantizer: QuantizerConfig | None = None
    """The fresh quantizer's config (same code shapes as the model's); None: the recipe's ``model.quantizer``."""
    teacher: str | None = None
    """Align on this model's behaviour (a leg name or a model folder) instead of the trained model's own: the
    teacher sees the input images through its own encoder and feature projector, and its backbone reads both that
    view and the trained model's codes. The trained model keeps its backbone and its encoder; only its quantizer
    changes (e.g. to a teacher taught a new world)."""
    teacher_encoder: bool = False
    """The trained model takes the teacher's vision encoder (one taught a new world with ``keep_features``);
    ``keep_codes`` then keeps the codes the old encoder and quantizer gave."""
    grow_codebooks: int = 0
    """Grow the loaded quantizer by this many codebooks before the leg (``model.grow.grow_codebooks``). A quantizer
    with grown codebooks trains only them (their head, their codebooks but code 0, the up-projection's columns for
    them): every image keeps its old ids, and ``keep_codes`` pulls the kept tasks' images to code 0 of the new ones."""
    keep_codes: KeepCodesConfig | None = None
    """Keep the codes of some tasks' images as they were when the leg started (None: no constraint)."""

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.keep_codes, dict):
            self.keep_codes = from_dict(KeepCodesConfig, self.keep_codes, "keep_codes")
        _check(not (self.fresh_quantizer and self.keep_codes), "keep_codes needs the loaded quantizer, not "
               "fresh_quantizer: true")
        _check(self.teacher is not None or not self.teacher_encoder, "teacher_encoder needs a teacher")
        _check(self.grow_codebooks >= 0, f"grow_codebooks must be >= 0, got {self.grow_codebooks}")
        _check(not (self.grow_codebooks and (self.fresh_quantizer or self.teacher_encoder)), "grow_codebooks keeps "
               "the loaded quantizer and encoder: not with fresh_quantizer or teacher_encoder")
        _check(self.strategy != "fsdp" or (self.teacher is None and self.keep_codes is None
                                            and not self.grow_codebooks),
               "teacher, keep_codes and grow_codebooks are not supported with strategy: fsdp (the quantizer is "
               "sharded)")


@dataclass
class LoRAConfig:
    """Low-memory fine-tuning of one backbone branch: rank-r adapters (``peft``) on its projections and FFN
    train instead of its weights; saved on their own and merged into the weights on export."""

    branch: str = "gen"
    """"gen" or "und"."""
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "ffn.gate",
                                                        "ffn.up", "ffn.down"])

    def __post_init__(self):
        _check(self.branch in ("und", "gen"), f"lora.branch must be und or gen, got {self.branch!r}")
        _check(self.rank >= 1, f"lora.rank must be >= 1, got {self.rank}")
        _check(self.alpha > 0, f"lora.alpha must be > 0, got {self.alpha}")
        _check(0 <= self.dropout < 1, f"lora.dropout must be in [0, 1), got {self.dropout}")
        _check(bool(self.targets), "lora.targets must name at least one layer")


@dataclass
class MoMEConfig(PackedStageConfig):
    """Stage 2: the generation branch, AR head and visual projector (and optionally the und branch)."""

    init_generation: bool = True
    """Start the generation branch as a copy of the understanding branch and the visual projector as MBAQ's
    up-projection (LatentUM). False keeps them as loaded, to continue a trained stage-2 model."""
    init_projector: bool | None = None
    """Start the visual projector as a copy of MBAQ's up-projection; None follows ``init_generation``. True with
    ``init_generation: false`` continues a stage-2 model whose quantizer was retrained since."""
    train_understanding: bool = True
    """Also train the understanding branch (text loss on trajectories)."""
    aia: AIAConfig = field(default_factory=AIAConfig)
    changed_weight: float = 1.0
    """Loss weight of latent tokens whose pixels differ from the previous image's relative to unchanged ones
    (1 = uniform): a generated image that mostly copies the one before scores well without it."""
    code_noise: float = 0.15
    """Probability of replacing each code of a read-back latent by a random one (LatentUM §8)."""
    lora: LoRAConfig | None = None
    """Train LoRA adapters on one branch instead of its weights (None: full fine-tuning)."""

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.aia, dict):
            self.aia = from_dict(AIAConfig, self.aia, "aia")
        if isinstance(self.lora, dict):
            self.lora = from_dict(LoRAConfig, self.lora, "lora")
        _check(self.changed_weight >= 1, f"changed_weight must be >= 1, got {self.changed_weight}")
        _check(0 <= self.code_noise <= 1, f"code_noise must be in [0, 1], got {self.code_noise}")


@dataclass
class DecoderStageConfig(StageConfig):
    """Stage 3: the pixel decoder learns codes -> pixels from the frozen encoder and quantizer."""

    init_decoder: str | None = None
    """Start the pixel decoder from this leg's decoder (a leg name) or decoder folder (a path) instead of random
    weights, to train it further; its config must equal the recipe's ``decoder`` but for what it predicts and its
    sampling steps (``systems.RETARGETABLE``), which it takes from the recipe."""
    changed_weight: float = 1.0
    """Loss weight of the pixels in cells where an image differs from its reference (the image it started from)
    relative to the others; 1 = uniform."""
    edge_weight: float = 1.0
    """Loss weight of the pixels on or next to an edge (where the image's colour changes) relative to the others,
    multiplying ``changed_weight``'s; 1 = uniform. Flat areas fill most pixels, so under a plain MSE a shape's
    corners weigh little next to the background around them."""

    def __post_init__(self):
        super().__post_init__()
        _check(self.changed_weight >= 1, f"changed_weight must be >= 1, got {self.changed_weight}")
        _check(self.edge_weight >= 1, f"edge_weight must be >= 1, got {self.edge_weight}")


STAGE_CONFIGS: dict[str, type[StageConfig]] = {"vlm": VLMConfig, "mbaq": MBAQConfig, "mome": MoMEConfig,
                                               "decoder": DecoderStageConfig}
"""Stage name -> its config, in the order the short ``stages:`` form runs them."""


@dataclass
class Leg:
    """One run of one stage within a recipe; its files go to ``<run>/<name>/``."""

    name: str
    stage: str
    config: StageConfig


@dataclass
class RecipeConfig:
    """A whole recipe: the model, the pixel decoder and the legs, in the order they run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    legs: list[Leg] = field(default_factory=list)
    name: str = "recipe"

    def leg(self, name: str) -> Leg:
        for leg in self.legs:
            if leg.name == name:
                return leg
        raise ValueError(f"recipe {self.name!r} has no leg {name!r}; it has {[x.name for x in self.legs]}")


def parse_recipe(data: dict) -> RecipeConfig:
    """A recipe mapping (a parsed YAML) -> RecipeConfig; every problem is a ValueError naming the field."""
    if not isinstance(data, dict):
        raise ValueError(f"a recipe must be a mapping at the top level, got {type(data).__name__}")
    unknown = set(data) - {"model", "decoder", "legs", "stages", "name"}
    _check(not unknown, f"recipe: unknown keys {sorted(unknown)}; expected some of "
           f"['decoder', 'legs', 'model', 'name', 'stages']")
    _check(not ("legs" in data and "stages" in data), "recipe: give either legs: or stages:, not both")
    name = data.get("name", "recipe")
    _check(isinstance(name, str) and name, f"name must be a non-empty string, got {name!r}")
    if "stages" in data:
        stages = data["stages"]
        _check(isinstance(stages, dict), f"stages must be a mapping of stage name to its config, got {stages!r}")
        unknown = set(stages) - set(STAGE_CONFIGS)
        _check(not unknown, f"stages: unknown stages {sorted(unknown)}; expected some of {list(STAGE_CONFIGS)}")
        raw = [{"name": s, "stage": s, **(stages[s] or {})} for s in STAGE_CONFIGS if s in stages]
    else:
        raw = data.get("legs") or []
        _check(isinstance(raw, list), f"legs must be a list of mappings, got {raw!r}")
    return RecipeConfig(model=from_dict(ModelConfig, data.get("model") or {}, "model"),
                        decoder=from_dict(DecoderConfig, data.get("decoder") or {}, "decoder"),
                        legs=_legs(raw, "stages" if "stages" in data else "legs"), name=name)


def recipe_to_data(recipe: RecipeConfig) -> dict:
    """The recipe as plain data in the ``legs:`` form (``parse_recipe`` rebuilds it): what an export records."""
    return {"name": recipe.name, "model": asdict(recipe.model), "decoder": asdict(recipe.decoder),
            "legs": [{"name": x.name, "stage": x.stage, **asdict(x.config)} for x in recipe.legs]}


def _legs(raw: list, key: str) -> list[Leg]:
    legs: list[Leg] = []
    for i, item in enumerate(raw):
        where = f"legs[{i}]"
        _check(isinstance(item, dict), f"{where} must be a mapping, got {item!r}")
        item = dict(item)
        stage, name = item.pop("stage", None), item.pop("name", None)
        _check(stage in STAGE_CONFIGS, f"{where}.stage must be one of {list(STAGE_CONFIGS)}, got {stage!r}")
        _check(isinstance(name, str) and name.replace("_", "").replace("-", "").isalnum(),
               f"{where}.name must be a name of letters, digits, _ and -, got {name!r}")
        _check(name not in {x.name for x in legs} and name != "model", f"{where}.name {name!r} is taken")
        where = f"{key}.{name}"
        legs.append(Leg(name, stage, from_dict(STAGE_CONFIGS[stage], item, where)))
    return legs


def load_recipe(path: str) -> RecipeConfig:
    """Parse a recipe YAML (``configs/*.yaml``) into a validated RecipeConfig; errors name the file and field."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ValueError(f"{path}: cannot read the recipe ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    try:
        return parse_recipe(data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
