"""Typed configuration: dataclass schema, then YAML files, then ``key=value`` overrides (OmegaConf).

    cfg = load_config(["configs/backbone/anole-7b.yaml"], ["bank.num_shared=8", "seed=1"])

A YAML file may list other YAML files under ``defaults:`` (paths relative to that file); they are merged
first, in order. Every key is checked against the schema before merging, so a typo fails with the file,
the full key and the closest valid key, instead of OmegaConf's bare "Key not in Config".
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf


class ConfigError(ValueError):
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

    def __post_init__(self) -> None:
        _check_choice("backbone.dtype", self.dtype, DTYPES)
        _check_choice("backbone.attn_implementation", self.attn_implementation, ("sdpa", "eager", "flash_attention_2"))


@dataclass
class DecoderConfig:
    path: str = "tiny"
    """Local Stable-Diffusion-format folder (vae/, unet/, scheduler/), or "tiny" for the embedded preset."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16 or float16."""
    attention: str = "sdpa"
    """UNet attention: sdpa (PyTorch, default) or xformers (GPU only)."""

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
        for key in ("num_shared", "num_und", "num_gen"):
            if getattr(self, key) < 0:
                raise ConfigError(f"bank.{key} must be >= 0, got {getattr(self, key)}")
        _check_choice("bank.init", self.init, ("class_word", "random"))
        _check_choice("bank.head_rows", self.head_rows, ("identifier", "all", "none"))


@dataclass
class DataConfig:
    concepts: list[str] = field(default_factory=list)
    """Folders written by ``unipers prepare``, one per concept."""
    batch_size: int = 4
    """Samples per batch per device."""
    num_workers: int = 0
    """DataLoader worker processes."""


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
    precision: str = "32-true"
    """Lightning precision, e.g. 32-true or bf16-mixed."""
    lr: float = 1e-3
    """Peak learning rate for concept rows."""
    weight_decay: float = 0.0
    """AdamW weight decay (rows absent from a step are never touched, see ConceptBank)."""


@dataclass
class Config:
    seed: int = 0
    """Global seed."""
    run_dir: str = "runs/default"
    """Output folder of a run."""
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


DTYPES = ("float32", "bfloat16", "float16")


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")


def _schema_keys(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of the schema -> its dataclass field type (nested dataclasses expanded)."""
    keys: dict[str, Any] = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for name, f in hints.items():
        full = f"{prefix}{name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        keys[full] = default
        if dataclasses.is_dataclass(default):
            keys.update(_schema_keys(type(default), full + "."))
    return keys


def _check_keys(data: dict, source: str, schema: type = Config) -> None:
    valid = _schema_keys(schema)

    def walk(node: Any, prefix: str) -> None:
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            full = f"{prefix}{key}"
            if full not in valid:
                close = difflib.get_close_matches(full, list(valid), n=1, cutoff=0.6)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"unknown config key '{full}' in {source}{hint}")
            if dataclasses.is_dataclass(valid[full]):
                if not isinstance(value, dict):
                    raise ConfigError(f"'{full}' in {source} is a section; give its keys, not a value")
                walk(value, full + ".")

    walk(data, "")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, dict]]:
    """The file and, first, everything its ``defaults:`` list pulls in, as (source, dict) pairs."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'defaults' cycle through {' -> '.join(map(str, seen))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    except Exception as err:  # YAML syntax errors come in several types
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping, got {type(data).__name__}")
    parts: list[tuple[str, dict]] = []
    for parent in data.pop("defaults", None) or []:
        parts.extend(_read_yaml(path.parent / parent, seen + (path,)))
    parts.append((str(path), data))
    return parts


def _parse_override(item: str) -> dict:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not key=value")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False)
    except Exception as err:
        raise ConfigError(f"override '{item}': {err}") from err


def load_config(files: list[str | Path] = (), overrides: list[str] = (), schema: type = Config) -> Any:
    """Schema defaults <- YAML files (with their ``defaults``) <- ``key=value`` overrides -> a dataclass."""
    merged = OmegaConf.structured(schema)
    sources: list[tuple[str, dict]] = []
    for f in files:
        sources.extend(_read_yaml(Path(f)))
    sources.extend((f"override '{o}'", _parse_override(o)) for o in overrides)
    for source, data in sources:
        _check_keys(data, source, schema)
        try:
            merged = OmegaConf.merge(merged, data)
        except Exception as err:  # wrong types, e.g. seed=abc
            raise ConfigError(f"{source}: {err}") from err
    try:
        return OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(str(err)) from err


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML, to save beside a run or a concept."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
