"""A run as it lives on disk: the agent its configuration builds, the agent's part of a checkpoint, and a trained
agent loaded back for evaluation and planning (guardrails and shield checked on every load)."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ami.agent import Agent
from ami.build import build_agent, resolve_device
from ami.checkpoint import check_guardrails, load_checkpoint
from ami.config import ConfigError, load_saved
from ami.envs import UnsupportedEnvError, make_vector_env, observation_kind, observation_names
from ami.loop import EnvLoop


def build_run_agent(cfg: DictConfig, loop: EnvLoop, device: torch.device) -> Agent:
    """The agent of a run's configuration, for its env loop's spaces (one memory stream per environment)."""
    envs = loop.envs
    observation_kind(envs.single_observation_space)
    names = observation_names(cfg.env, envs.envs[0])
    if not hasattr(envs.single_action_space, "shape") or len(envs.single_action_space.shape) != 1:
        raise UnsupportedEnvError(f"env.id={cfg.env.id!r}: expected a flat Box action space")
    return build_agent(OmegaConf.to_object(cfg.agent), envs.single_observation_space,
                       envs.single_action_space.shape[0], names, device, loop.num_envs)


def agent_state(agent: Agent) -> dict:
    """The agent's part of a checkpoint: its trained modules, the configurator's settings and mode switch, and
    the guardrails and shield every load is checked against."""
    intrinsic = agent.cost.intrinsic
    modules = {"perception": agent.perception.state_dict(), "world_model": agent.world_model.state_dict(),
               "critic": agent.cost.critic.state_dict(), "policy": agent.actor.policy.state_dict()}
    if agent.cost.goal_critic is not None:
        modules["goal_critic"] = agent.cost.goal_critic.state_dict()
    state = agent.configurator.state
    return {"guardrails": [term for term in intrinsic.describe() if term[3]], "intrinsic_cost": intrinsic.describe(),
            "shield": agent.shield.describe(), "modules": modules, "shield_trust": agent.trust.state_dict(),
            **({"stand_in": {"model": agent.stand_in.state_dict(), "trust": agent.stand_in_trust.state_dict(),
                             "unfitted": agent.stand_in_unfitted}} if agent.stand_in is not None else {}),
            "configurator": {"weights": agent.configurator.weights, "mode1_acting": state.mode1_acting,
                             "gap": state.gap, "steps_since_audit": state.steps_since_audit,
                             "iterations": agent.configurator.iterations}}


def load_agent_state(agent: Agent, state: dict, path: Path, cfg: DictConfig) -> None:
    """Load agent_state() into agent, after checking that its guardrails and shield are this configuration's."""
    check_guardrails(state, [term for term in agent.cost.intrinsic.describe() if term[3]], agent.shield.describe(),
                     path)
    modules = state["modules"]
    agent.perception.load_state_dict(modules["perception"])
    agent.world_model.load_state_dict(modules["world_model"])
    agent.cost.critic.load_state_dict(modules["critic"])
    agent.actor.policy.load_state_dict(modules["policy"])
    if agent.cost.goal_critic is not None and "goal_critic" in modules:
        agent.cost.goal_critic.load_state_dict(modules["goal_critic"])
    # The checkpoint's weights, then this configuration's explicit ones on top: a weight given when resuming
    # (`agent.configurator.weights.effort=0.5`) takes effect.
    configurator = state["configurator"]
    for name, weight in {**configurator["weights"], **dict(cfg.agent.configurator.weights)}.items():
        agent.configurator.set_weight(name, weight)
    switch = agent.configurator.state
    switch.mode1_acting, switch.gap = configurator["mode1_acting"], configurator["gap"]
    switch.steps_since_audit = configurator["steps_since_audit"]
    budget = cfg.agent.configurator
    if budget.max_iterations and "iterations" in configurator:  # the planning budget where it had got to
        agent.configurator.iterations = min(max(configurator["iterations"], budget.min_iterations),
                                            budget.max_iterations)
    agent.world_model_trained = state["learner"]["updates"] > 0
    if "shield_trust" in state:
        agent.trust.load_state_dict(state["shield_trust"])
    if agent.stand_in is not None and "stand_in" in state:  # the shield's description already matched
        agent.stand_in.load_state_dict(state["stand_in"]["model"])
        agent.stand_in_trust.load_state_dict(state["stand_in"]["trust"])
        agent.stand_in_unfitted = state["stand_in"]["unfitted"]


def run_config(run_dir: str | Path, overrides: list[str] | None = None) -> DictConfig:
    """A run directory's saved configuration with overrides on top; ConfigError when it is not a run."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: no config.yaml there; expected an ami run directory")
    return load_saved(run_dir / "config.yaml", overrides)


def acting_agent(cfg: DictConfig, state: dict, path: Path) -> Agent:
    """An agent that acts and does not train (one env, a memory of one row), with the modules of `state` (a
    checkpoint or a saved agent, read from `path`), guardrails and shield checked."""
    loop = EnvLoop(make_vector_env(cfg.env, 1), cfg.env.nonfinite)
    agent = build_run_agent(OmegaConf.merge(cfg, {"agent": {"memory": {"capacity": 1}}, "train": {"num_envs": 1}}),
                            loop, resolve_device(cfg.device))
    loop.envs.close()
    load_agent_state(agent, state, path, cfg)
    return agent


def load_agent(run_dir: str | Path, overrides: list[str] | None = None) -> tuple[Agent, DictConfig, int]:
    """A trained run's agent, read-only (ami eval, ami bench goals): its saved configuration with overrides on
    top, its modules from the newest readable checkpoint (guardrails checked) -> (agent, config, env steps)."""
    cfg = run_config(run_dir, ["progress=false", *(overrides or [])])
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    state, path = load_checkpoint(run_dir)
    return acting_agent(cfg, state, path), cfg, int(state["loop"]["env_steps"])
