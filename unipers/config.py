"""Typed configuration: the dataclass schema (`unipers.schema`), then YAML files, then ``key=value``
overrides (OmegaConf).

    cfg = load_config(["personalize", "backbone/anole-7b"], ["bank.num_shared=8", "seed=1"])
    cfg = load_config(["my_run.yaml"])          # a path works too

A YAML file may list other YAML files under ``defaults:`` (paths relative to that file); they are merged
first, in order. Every key is checked against the schema before merging, so a typo fails with the file,
the full key and the closest valid key, instead of OmegaConf's bare "Key not in Config".
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf

from unipers.paths import cache_dir, config_file
from unipers.schema import (
    AlignConfig, AugmentConfig, BackboneConfig, BankConfig, Config, ConfigError, ConnectorConfig, DataConfig,
    DecoderConfig, DTYPES, EvalConfig, LossWeights, PersonalizeConfig, SlurmConfig, StageConfig,
    TrainerConfig, check_augment,
)

# The schema's names are imported from here too (``from unipers.config import Config, ConfigError``).
__all__ = [
    "AlignConfig", "AugmentConfig", "BackboneConfig", "BankConfig", "Config", "ConfigError",
    "ConnectorConfig", "DataConfig", "DecoderConfig", "DTYPES", "EvalConfig", "LossWeights",
    "PersonalizeConfig", "SlurmConfig", "StageConfig", "TrainerConfig", "check_augment", "load_config",
    "split_config_args", "to_yaml",
]


def _cache_folder(name: str) -> str:
    return str(cache_dir(name))


# ``${cache:world}`` in a config: that cache's folder (unipers.paths.cache_dir), wherever UNIPERS_HOME is.
OmegaConf.register_resolver("cache", _cache_folder, replace=True)


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
            item = _list_item_type(schema, full)
            if item is not None and isinstance(value, list):
                for i, element in enumerate(value):
                    if not isinstance(element, dict):
                        raise ConfigError(f"'{full}[{i}]' in {source} must be a mapping")
                    _check_keys(element, f"{source} ({full}[{i}])", item)

    walk(data, "")


def _list_item_type(schema: type, dotted: str) -> Optional[type]:
    """The dataclass of a list field's items (e.g. personalize.schedule -> StageConfig), else None."""
    import typing

    cls: Any = schema
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        cls = hints[part]
        if dataclasses.is_dataclass(cls):
            continue
        args = typing.get_args(cls)
        if i == len(parts) - 1 and typing.get_origin(cls) is list and args and dataclasses.is_dataclass(args[0]):
            return args[0]
        return None
    return None


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


def split_config_args(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """Command-line items -> (configs, key=value overrides), each in the order given: an item with '=' that
    is not an existing file is an override."""
    overrides = [i for i in items if "=" in i and not Path(i).is_file()]
    return [i for i in items if i not in overrides], overrides


def load_config(files: list[str | Path] = (), overrides: list[str] = (), schema: type = Config) -> Any:
    """Schema defaults <- YAML files (with their ``defaults``) <- ``key=value`` overrides -> a dataclass.
    A file is a path or a shipped config's name (``personalize``, ``backbone/anole-7b``)."""
    merged = OmegaConf.structured(schema)
    sources: list[tuple[str, dict]] = []
    for f in files:
        try:
            path = config_file(f)
        except FileNotFoundError as err:
            raise ConfigError(str(err)) from None
        sources.extend(_read_yaml(path))
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
