"""config -> modules -> Agent: the one place that knows every module class."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from ami.agent import Agent
from ami.config import AgentConfig
from modules.actor import Actor, PlanEnergy, Policy
from modules.configurator import Configurator
from modules.cost import Cost, IntrinsicCost, TrainableCritic
from modules.memory import ShortTermMemory
from modules.perception import Perception
from modules.shield import Shield
from modules.world_model import WorldModel


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}: CUDA is not available on this machine; use device=cpu or auto")
    return device


def as_dataclass(cfg: DictConfig) -> AgentConfig:
    """The agent section as typed dataclasses (each module gets its own)."""
    return OmegaConf.to_object(cfg)


def build_agent(config: AgentConfig, obs_dim: int, action_dim: int, observation_names: list[str],
                device: torch.device) -> Agent:
    perception = Perception(obs_dim, config.perception).to(device)
    latent_dim = config.perception.latent_dim
    world_model = WorldModel(latent_dim, action_dim, observation_names, config.world_model).to(device)
    intrinsic = IntrinsicCost(config.cost.terms, observation_names)
    critic = TrainableCritic(latent_dim, action_dim, config.cost).to(device)
    cost = Cost(intrinsic, critic)
    memory = ShortTermMemory(obs_dim, action_dim, latent_dim, len(intrinsic.term_names), config.memory)
    policy = Policy(latent_dim, action_dim, config.actor).to(device)
    shield = Shield(config.shield, intrinsic, world_model, observation_names, action_dim)
    guide = shield.planning_cost if shield.active and shield.ego is not None and config.shield.guide_planner else None
    energy = PlanEnergy(world_model, intrinsic, critic, config.cost.discount, config.cost.value_weight, guide)
    if config.actor.compile:
        energy.compile()
    actor = Actor(policy, energy, action_dim, config.actor)
    configurator = Configurator(config.configurator, intrinsic.default_weights, intrinsic.guardrail_names,
                                config.actor.horizon, config.actor.iterations)
    return Agent(perception, world_model, cost, memory, actor, configurator, shield, device,
                 config.actor.exploration_std)


def parameter_counts(agent: Agent) -> dict[str, int]:
    modules = {"perception": agent.perception.encoder, "world_model": agent.world_model,
               "critic": agent.cost.critic, "policy": agent.actor.policy}
    return {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in modules.items()}
