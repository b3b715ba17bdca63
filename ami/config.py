"""A run's configuration resolved: the schema (ami.schema) filled in from presets, overrides or a saved run.

Resolution order: schema defaults < the env preset < the agent preset < CLI dotlist. A preset is a name
(configs/env/<name>.yaml, shipped inside the package as ami/presets/ by an install) or a path to a YAML file
anywhere (env=./my_env.yaml). Unknown keys and wrong types raise OmegaConf errors that name the full key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from ami.schema import RunConfig
from ami.validation import ConfigError, validate

# An installed wheel carries the presets inside the package; a checkout keeps them in configs/ at the top.
_PACKAGED = Path(__file__).resolve().parent / "presets"
CONFIG_DIR = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parent.parent / "configs"


def available(kind: str) -> list[str]:
    """Names of the shipped presets of this kind ("env" or "agent")."""
    return sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.yaml"))


def is_preset_file(value: str) -> bool:
    """env=./my_env.yaml names a file; env=pendulum a shipped preset."""
    return value.endswith((".yaml", ".yml")) or "/" in value or "\\" in value


def _variant(kind: str, name: str) -> DictConfig:
    if is_preset_file(name):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(f"{kind}={name!r}: no such file (from {Path.cwd()}); expected a YAML preset file "
                              f"or one of {available(kind)}")
    else:
        path = CONFIG_DIR / kind / f"{name}.yaml"
        if not path.is_file():
            raise ConfigError(f"{kind}={name!r}: no such preset; expected one of {available(kind)} or a path to a "
                              "YAML file")
    preset = _read_yaml(path, f"{kind}={name!r}: ")
    if not isinstance(preset, DictConfig):
        raise ConfigError(f"{kind}={name!r}: {path} holds a {type(preset).__name__}; expected a mapping such as "
                          "'env: {id: ...}'")
    if OmegaConf.select(preset, f"{kind}.name") is None:  # runs are named by their presets
        preset = OmegaConf.merge(preset, {kind: {"name": path.stem}})
    return preset


def _merge(*configs: DictConfig) -> DictConfig:
    try:
        return OmegaConf.merge(*configs)
    except TypeError as error:  # OmegaConf's message for a list item addressed like a dict key
        raise ConfigError(f"{error}: lists such as agent.cost.terms are replaced whole, in a variant "
                          "file (configs/env/*.yaml), not item by item from the command line") from error


def _yaml_problem(error: yaml.YAMLError, line: bool = True) -> str:
    """What YAML could not read, and (line) on which line of the file."""
    problem = ": ".join(str(part) for part in (getattr(error, "context", None), getattr(error, "problem", None))
                        if part) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    return f"{problem}, line {mark.line + 1}" if line and mark is not None else problem


def _read_yaml(path: str | Path, what: str = "") -> Any:
    """A YAML file's content; a file YAML cannot read is a ConfigError that names it (after `what`) and the line."""
    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as error:
        raise ConfigError(f"{what}{path} is not YAML ({_yaml_problem(error)})") from error


def _dotlist(items: list[str]) -> DictConfig:
    """key=value overrides as a config; a value YAML cannot read is a ConfigError that names its override."""
    try:
        return OmegaConf.from_dotlist(items)
    except yaml.YAMLError:
        for item in items:
            try:
                OmegaConf.from_dotlist([item])
            except yaml.YAMLError as error:
                problem = _yaml_problem(error, line=False)
                raise ConfigError(f"override {item!r}: its value is not YAML ({problem})") from error
        raise


def load_config(overrides: list[str] | None = None) -> DictConfig:
    """Resolve a RunConfig from `env=NAME agent=NAME key=value ...` overrides."""
    overrides = list(overrides or [])
    selection = {"env": "pendulum", "agent": "ami"}
    rest = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected key=value")
        if key in selection:
            selection[key] = value
        else:
            rest.append(item)
    cfg = _merge(OmegaConf.structured(RunConfig), _variant("env", selection["env"]),
                 _variant("agent", selection["agent"]), _dotlist(rest))
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def load_saved(saved: str | Path | DictConfig, overrides: list[str] | None = None) -> DictConfig:
    """A run's saved config (its config.yaml, or the config a checkpoint holds) back in the schema, with optional
    overrides."""
    cfg = _merge(OmegaConf.structured(RunConfig), saved if isinstance(saved, DictConfig) else _read_yaml(saved),
                 _dotlist(list(overrides or [])))
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def without_guardrails(cfg: DictConfig) -> DictConfig:
    """The same run with its guardrail terms removed and its shield off: the unguarded baseline
    that `ami bench safety` compares against. Its agent is named <name>_unguarded."""
    data = OmegaConf.to_container(cfg, resolve=True)
    agent = data["agent"]
    agent["name"] = f"{agent['name']}_unguarded"
    agent["cost"]["terms"] = [term for term in agent["cost"]["terms"] if not term.get("guardrail", False)]
    agent["shield"]["enabled"] = False
    unguarded = _merge(OmegaConf.structured(RunConfig), OmegaConf.create(data))
    validate(unguarded)
    OmegaConf.set_readonly(unguarded, True)
    return unguarded
