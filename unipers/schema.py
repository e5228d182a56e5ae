"""The configuration schema: one dataclass per section (each field with its default and a docstring) and the
checks run when a section is built (ConfigError naming the key); `unipers.config` merges YAML onto it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from unipers.errors import UnipersError


class ConfigError(UnipersError, ValueError):
    """A configuration file or override is invalid; the message names the source and the key."""


@dataclass
class BackboneConfig:
    path: str = "tiny"
    """Local Hugging Face Chameleon/Anole folder, or "tiny" for the embedded preset (built on first use)."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16 or float16."""
    attn_implementation: str = "sdpa"
    """transformers attention backend: sdpa, eager or flash_attention_2."""
    gradient_checkpointing: bool = False
    """Recompute the frozen backbone's activations in the backward pass (saves memory on 7B+)."""
    describe_first: Optional[str] = None
    """Recognition in two turns ("describe, then decide"): the base first answers this question about the
    image with no concept in context ("What is in this photo?", greedy), then is asked about the concept, so
    the concept is compared with the base's own words for the image. null: ask about the image directly.
    Training, validation, `unipers recognize` and `unipers eval` all use the same layout."""
    describe_tokens: int = 16
    """Longest description generated for describe_first."""

    def __post_init__(self) -> None:
        _check_choice("backbone.dtype", self.dtype, DTYPES)
        _check_choice("backbone.attn_implementation", self.attn_implementation, ("sdpa", "eager", "flash_attention_2"))
        if self.describe_first is not None and not self.describe_first.strip():
            raise ConfigError("backbone.describe_first: an empty question; use null to ask directly")
        _check_range("backbone.describe_tokens", self.describe_tokens, 1, 4096)


@dataclass
class DecoderConfig:
    path: str = "tiny"
    """Local Stable-Diffusion-format folder (vae/, unet/, scheduler/), or "tiny" for the embedded preset."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16 or float16."""
    attention: str = "sdpa"
    """UNet attention: sdpa (PyTorch, default) or xformers (GPU only)."""
    gradient_checkpointing: bool = False
    """Recompute the frozen UNet's activations in the backward pass (most of the diffusion loss's memory)."""

    def __post_init__(self) -> None:
        _check_choice("decoder.dtype", self.dtype, DTYPES)
        _check_choice("decoder.attention", self.attention, ("sdpa", "xformers"))


@dataclass
class ConnectorConfig:
    kind: str = "mlp"
    """How AR hidden states become decoder conditioning: linear, mlp or queries."""
    path: Optional[str] = None
    """Aligned connector weights (safetensors, written by the align stage); None starts from random."""
    num_queries: int = 16
    """Learned queries (kind=queries only)."""
    num_layers: int = 2
    """Transformer layers (kind=queries only)."""
    num_heads: int = 4
    """Attention heads (kind=queries only)."""

    def __post_init__(self) -> None:
        _check_choice("connector.kind", self.kind, ("linear", "mlp", "queries"))
        _check_ranges("connector", self, {"num_queries": (1, 4096), "num_layers": (0, 64), "num_heads": (1, 256)})


@dataclass
class BankConfig:
    num_shared: int = 8
    """Latent slots used by both understanding and generation prompts."""
    num_und: int = 4
    """Latent slots used only by understanding prompts."""
    num_gen: int = 4
    """Latent slots used only by generation prompts."""
    init: str = "class_word"
    """Row initialisation: class_word (mean embedding of the class word's tokens) or random (table scale)."""
    init_noise: float = 0.01
    """Noise added to class-word init, relative to the table's std, so slots do not start identical."""
    head_rows: str = "identifier"
    """Trainable lm_head rows: identifier (the model can say <bo>), all (also slots, for self-prompting), none."""

    def __post_init__(self) -> None:
        _check_ranges("bank", self, {"num_shared": (0, 1024), "num_und": (0, 1024), "num_gen": (0, 1024),
                                     "init_noise": (0.0, 100.0)})
        _check_choice("bank.init", self.init, ("class_word", "random"))
        _check_choice("bank.head_rows", self.head_rows, ("identifier", "all", "none"))


@dataclass
class AugmentConfig:
    views: int = 0
    """Extra augmented views (crop + flip) per training image of recognition / caption / VQA; 0 = off."""
    scale: list[float] = field(default_factory=lambda: [0.7, 1.0])
    """Area share of the random crop (resized back to the image's size)."""
    ratio: list[float] = field(default_factory=lambda: [0.9, 1.1])
    """Aspect-ratio range of the crop."""
    flip: bool = True
    """Mirror half of the views left-right (turn off for text, logos, anything not mirror-symmetric)."""

    def __post_init__(self) -> None:
        check_augment(self.views, self.scale, self.ratio)


def check_augment(views: int, scale, ratio) -> None:
    """The rules of ``data.augment`` (also `unipers.data.augment.ViewSpec`'s): ConfigError naming the key."""
    for key, value in (("scale", scale), ("ratio", ratio)):
        if len(value) != 2:
            raise ConfigError(f"data.augment.{key} must be [lo, hi], got {list(value)}")
    if views < 0:
        raise ConfigError(f"data.augment.views must be >= 0, got {views}")
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ConfigError(f"data.augment.scale must satisfy 0 < lo <= hi <= 1, got {list(scale)}")
    if not 0.0 < ratio[0] <= ratio[1]:
        raise ConfigError(f"data.augment.ratio must satisfy 0 < lo <= hi, got {list(ratio)}")


@dataclass
class DataConfig:
    concepts: list[str] = field(default_factory=list)
    """Folders written by ``unipers prepare``, one per concept (several train together)."""
    batch_size: int = 4
    """Samples per batch per device."""
    num_workers: int = 0
    """DataLoader worker processes."""
    task_weights: dict[str, float] = field(default_factory=lambda: {
        "recognition": 0.4, "qa": 0.15, "caption": 0.15, "generation": 0.3, "vqa": 0.0})
    """Mixing ratios of the manifest's tasks (tasks absent from the data drop out)."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Augmented views of training images (unipers/data/augment.py); cached like the originals."""
    pairs: Optional[str] = None
    """Align only: a folder of images with captions.jsonl, or a glob of WebDataset tar shards."""
    cache_latents: bool = True
    """Align, folder pairs: encode each image with the frozen VAE once, into
    ``<pairs>/cache/latents-<decoder fingerprint>.safetensors`` (held in memory while training), not at
    every step. Turn off for folders too large to hold; shards are always streamed. Entries are keyed by
    the images' sha256, so an image changed under the same name is encoded again."""
    cache_batch_size: int = 32
    """Align, folder pairs: images per VAE batch while filling the latent cache (saved as it fills)."""

    def __post_init__(self) -> None:
        _check_ranges("data", self, {"batch_size": (1, 65536), "num_workers": (0, 1024),
                                     "cache_batch_size": (1, 65536)})
        for task, weight in self.task_weights.items():
            _check_range(f"data.task_weights.{task}", weight, 0.0, None)


@dataclass
class TrainerConfig:
    max_steps: int = 200
    """Optimizer steps."""
    accelerator: str = "auto"
    """Lightning accelerator: auto, cpu, gpu."""
    devices: int = 1
    """Devices per node (one process each)."""
    num_nodes: int = 1
    """Nodes."""
    strategy: str = "auto"
    """auto, ddp (frozen base neither broadcast nor all-reduced) or fsdp (shards the frozen base, 30B)."""
    precision: str = "32-true"
    """Lightning precision: 32-true, or bf16-mixed on GPU (autocast)."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay (rows absent from a step are never touched, see ConceptBank)."""
    gradient_clip_val: float = 1.0
    """Clip the global gradient norm (0 = off)."""
    accumulate_grad_batches: int = 1
    """Batches per optimizer step."""
    val_every: int = 50
    """Validate (and pick the best concept file) every N steps; 0 = never."""
    checkpoint_every: int = 50
    """Write a resumable Lightning checkpoint (trainable state only) every N steps."""
    limit_val_batches: int = 8
    """Validation batches per check."""
    log_every: int = 10
    """Log metrics every N steps."""
    logger: str = "csv"
    """csv, tensorboard or wandb."""
    compile: bool = False
    """torch.compile the frozen backbone's decoder layers."""
    progress_bar: bool = True
    """Console progress bar."""
    cpu_threads: int = 0
    """Intra-op threads when training on CPU: 0 = one for a model under 50M parameters (its ops are too
    small to share between cores, and shared they stall whenever another process holds a core), torch's
    default above; N = exactly N (unipers.runtime)."""

    def __post_init__(self) -> None:
        _check_choice("trainer.strategy", self.strategy, ("auto", "ddp", "fsdp"))
        _check_choice("trainer.logger", self.logger, ("csv", "tensorboard", "wandb"))
        # Bounds that catch typos (1e30, -1, NaN) while leaving every real setting open.
        _check_ranges("trainer", self, {
            "max_steps": (1, 10**9), "devices": (1, 4096), "num_nodes": (1, 4096), "lr": (None, 10.0, 0.0),
            "weight_decay": (0.0, 10.0), "gradient_clip_val": (0.0, None), "accumulate_grad_batches": (1, 4096),
            "val_every": (0, None), "checkpoint_every": (0, None), "limit_val_batches": (0, None),
            "log_every": (1, None), "cpu_threads": (0, 4096)})


@dataclass
class LossWeights:
    understanding: float = 1.0
    """NLL of answer tokens (recognition, QA, captions)."""
    image_tokens: float = 0.0
    """AR NLL of the target image's VQ tokens after the generation prompt."""
    diffusion: float = 1.0
    """Denoising loss through the frozen connector and decoder."""

    def __post_init__(self) -> None:
        _check_ranges("losses", self, {"understanding": (0.0, 1e4), "image_tokens": (0.0, 1e4),
                                       "diffusion": (0.0, 1e4)})


@dataclass
class StageConfig:
    name: str = "joint"
    """Shown in logs and in the run folder."""
    steps: int = 0
    """Optimizer steps of this stage; 0 = until trainer.max_steps (last stage only)."""
    train: list[str] = field(default_factory=lambda: ["identifier", "shared", "und", "gen"])
    """Slot groups whose rows train in this stage; the others stay bit-identical."""
    losses: LossWeights = field(default_factory=LossWeights)
    """Loss weights of this stage."""
    tasks: Optional[dict[str, float]] = None
    """Task mixing for this stage (None = data.task_weights)."""
    self_prompting: bool = False
    """Yo'Chameleon: the model writes the concept's prefix itself, as the start of its answer."""

    def __post_init__(self) -> None:
        bad = [g for g in self.train if g not in ("identifier", "shared", "und", "gen")]
        if bad:
            raise ConfigError(f"stage {self.name!r}: unknown slot group(s) {bad} in 'train' "
                              "(valid: identifier, shared, und, gen)")
        _check_range(f"personalize.schedule[{self.name}].steps", self.steps, 0, None)


@dataclass
class PersonalizeConfig:
    schedule: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    """Stages run in order; a recipe is a schedule."""
    warmup_steps: int = 10
    """Linear LR warm-up at the start of each stage."""
    lr_schedule: str = "cosine"
    """cosine (per stage, to 10% of peak) or constant."""
    save_every: int = 0
    """Write the concept file every N steps (0 = only at the end and on a new best)."""
    decision_weight: float = 1.0
    """Weight of a recognition answer's first token (its Yes or No) in the understanding loss, against 1 for
    every other answer token: the rest of "Yes, <bo> is in this photo." follows from that first token."""

    def __post_init__(self) -> None:
        _check_choice("personalize.lr_schedule", self.lr_schedule, ("cosine", "constant"))
        _check_ranges("personalize", self, {"warmup_steps": (0, None), "save_every": (0, None),
                                            "decision_weight": (None, 1e4, 0.0)})
        if not self.schedule:
            raise ConfigError("personalize.schedule is empty")
        for stage in self.schedule[:-1]:
            if stage.steps <= 0:
                raise ConfigError(f"stage {stage.name!r}: only the last stage may have steps=0")


@dataclass
class AlignConfig:
    train_decoder: str = "none"
    """Also train the decoder: none, lora (adapters on UNet attention) or blocks (unfreeze named blocks)."""
    lora_rank: int = 8
    """LoRA rank (train_decoder=lora)."""
    unfreeze_blocks: list[str] = field(default_factory=lambda: ["mid_block"])
    """UNet submodules to unfreeze (train_decoder=blocks)."""
    warmup_steps: int = 100
    """Linear LR warm-up steps."""
    caption_dropout: float = 0.0
    """Share of captions replaced by "" so the empty prompt learns to be the unconditional input (CFG)."""

    def __post_init__(self) -> None:
        _check_choice("align.train_decoder", self.train_decoder, ("none", "lora", "blocks"))
        _check_ranges("align", self, {"lora_rank": (1, 4096), "warmup_steps": (0, None),
                                      "caption_dropout": (0.0, 1.0)})


@dataclass
class SlurmConfig:
    partition: Optional[str] = None
    """#SBATCH --partition."""
    account: Optional[str] = None
    """#SBATCH --account."""
    qos: Optional[str] = None
    """#SBATCH --qos."""
    constraint: Optional[str] = None
    """#SBATCH --constraint (e.g. a100|h100)."""
    time: str = "04:00:00"
    """Wall-clock limit; Lightning checkpoints and requeues 90 s before it (SIGUSR1)."""
    gpus_per_node: Optional[int] = None
    """GPUs to ask for per node (default: trainer.devices when the accelerator is a GPU, else none)."""
    cpus_per_task: int = 8
    """CPUs per task (one task per GPU)."""
    mem_per_task: Optional[str] = None
    """Memory per task, e.g. 64G (#SBATCH --mem-per-cpu is derived from it)."""
    concepts_per_task: int = 1
    """Concept arrays: concepts trained together in one array task (fill a GPU)."""
    max_parallel: Optional[int] = None
    """Concept arrays: at most this many array tasks at once (%N)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before training: module loads, venv activation."""
    extra: list[str] = field(default_factory=list)
    """More sbatch options, one "--option=value" (or "--flag") per item and #SBATCH line, e.g. "--mail-type=END";
    checked at submit (no spaces or newlines, none of the options unipers sets: docs/slurm.md)."""
    requeue: bool = True
    """Requeue on preemption / time limit and resume from the last checkpoint."""


@dataclass
class EvalConfig:
    clip_path: Optional[str] = None
    """Local CLIP folder (transformers CLIPModel + processor) for CLIP-I / CLIP-T."""
    dino_path: Optional[str] = None
    """Local DINO / DINOv2 folder (transformers AutoModel + image processor) for DINO similarity."""
    judge_path: Optional[str] = None
    """Local causal LM folder that judges open-ended answers against their reference (none: not scored)."""
    prompts: list[str] = field(default_factory=list)
    """Generation prompts with {concept}; empty = the built-in DreamBench-style templates."""
    images_per_prompt: int = 4
    """Seeded images per prompt."""
    steps: int = 25
    """Sampling steps."""
    guidance: float = 5.0
    """Classifier-free guidance scale."""
    seed: int = 0
    """First seed; image i of a prompt uses seed + i."""
    max_new_tokens: int = 48
    """Token limit for generated answers and captions."""
    batch_size: int = 8
    """Prompts per forward pass when scoring answers (recognition, options, captions)."""
    baselines: list[str] = field(default_factory=lambda: ["none", "class", "text", "image", "token"])
    """Baseline rows: none (name only), class (class word), text / image (a description / photo in context), token."""
    bootstrap: int = 1000
    """Bootstrap resamples for every metric's 95% interval (0: none), seeded from eval.seed."""
    copy_thresholds: dict[str, float] = field(default_factory=lambda: {"clip": 0.95, "dino": 0.9, "pixel": 0.95})
    """A generated image is a copy when its highest similarity to a train photo reaches one (above 1: off)."""
    think: bool = False
    """Draw each generation prompt that names a loaded concept as the AR model rewrites it (generate --think);
    CLIP-T still compares with the prompt as asked. A refused rewrite is drawn as written and counted."""

    def __post_init__(self) -> None:
        for key, value in dict(self.copy_thresholds).items():
            _check_choice("eval.copy_thresholds key", key, ("clip", "dino", "pixel"))
            _check_range(f"eval.copy_thresholds.{key}", value, -1.0)
        _check_ranges("eval", self, {"images_per_prompt": (1, 1024), "steps": (1, 1000), "guidance": (0.0, 100.0),
                                     "max_new_tokens": (1, 4096), "batch_size": (1, 4096), "bootstrap": (0, 10**6)})


@dataclass
class Config:
    seed: int = 0
    """Global seed."""
    run_dir: str = "runs/default"
    """Output folder of a run."""
    stage: str = "personalize"
    """What `unipers train` runs: personalize (concept rows) or align (the connector)."""
    ckpt_path: Optional[str] = None
    """Resume: "last" (the run folder's newest checkpoint) or a checkpoint file."""
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    personalize: PersonalizeConfig = field(default_factory=PersonalizeConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _check_choice("stage", self.stage, ("personalize", "align"))


DTYPES = ("float32", "bfloat16", "float16")


def _check_range(key: str, value: Any, lo: float | None = None, hi: float | None = None, *,
                 above: float | None = None) -> None:
    """ConfigError naming `key` unless `value` is a finite number with lo <= value <= hi (and > above)."""
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, not {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi) or (above is not None and value <= above):
        low = f"> {above:g}" if above is not None else (f">= {lo:g}" if lo is not None else "")
        high = f"<= {hi:g}" if hi is not None else ""
        raise ConfigError(f"{key} must be {' and '.join(x for x in (low, high) if x)}, not {value!r}")


def _check_ranges(section: str, obj: Any, ranges: dict[str, tuple]) -> None:
    """``{field: (lo, hi)}`` or ``{field: (lo, hi, above)}`` for each numeric field of a section."""
    for name, bounds in ranges.items():
        lo, hi, *above = bounds
        _check_range(f"{section}.{name}", getattr(obj, name), lo, hi, above=above[0] if above else None)


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")
