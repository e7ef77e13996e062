"""Loading experiment configs: ``configs/X.py[:arg]`` plus ``--config.a.b=value`` overrides.

A config file defines ``get_config(arg: str | None) -> ml_collections.ConfigDict``; the text after
the colon selects a variant (``configs/lm.py:tiny``). Overrides are parsed against the type of the
value they replace, so ``--config.train.num_steps=10`` stays an int and a typo in a key is an error
rather than a silently ignored setting.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
from typing import Iterable

import ml_collections


class ConfigError(ValueError):
    """A config file, argument or override that cannot be used."""


def load_config(spec: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """Loads ``path.py[:arg]`` and applies ``a.b=value`` overrides (without the ``--config.``)."""
    path, _, arg = spec.partition(":")
    if not path.endswith(".py"):
        raise ConfigError(f"config {spec!r}: expected a python file such as configs/lm.py:tiny")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"_videolm_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config(arg)")
    config = module.get_config(arg or None)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}:get_config returned {type(config).__name__}, expected a ConfigDict")
    for override in overrides:
        apply_override(config, override)
    return config


def _parse_value(text: str, current):
    if isinstance(current, str):
        return text
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"expected true or false, got {text!r}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise ConfigError(f"cannot parse {text!r} as {type(current).__name__}") from None
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if current is not None and not isinstance(value, type(current)):
        raise ConfigError(f"expected {type(current).__name__}, got {text!r}")
    return value


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    """Applies one ``a.b.c=value`` override in place."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected key=value")
    *parents, leaf = key.split(".")
    node = config
    for i, name in enumerate(parents):
        if name not in node:
            raise ConfigError(f"override {override!r}: config has no key {'.'.join(parents[:i + 1])!r}")
        node = node[name]
    if leaf not in node:
        raise ConfigError(f"override {override!r}: config has no key {key!r}")
    try:
        node[leaf] = _parse_value(text, node[leaf])
    except ConfigError as e:
        raise ConfigError(f"override {override!r}: {e}") from None


def split_config_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separates ``--config.a.b=v`` / ``--config.a.b v`` arguments from the rest of argv."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            body = arg[len("--config."):]
            if "=" not in body:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{arg}: missing value")
                body = f"{body}={argv[i + 1]}"
                i += 1
            overrides.append(body)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def save_config(config: ml_collections.ConfigDict, path: str) -> None:
    """Writes the resolved config as JSON (atomically) next to a run's checkpoints."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    """Writes JSON atomically (temp file + rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=float)
    os.replace(tmp, path)


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())
