"""config -> modules -> Agent: the one place that knows every module class."""

from __future__ import annotations

import gymnasium as gym
import torch

from ami.agent import Agent
from ami.config import ConfigError
from ami.schema import ActorConfig, AgentConfig
from modules.actor import Actor, PlanEnergy, Policy
from modules.configurator import Configurator
from modules.cost import Cost, IntrinsicCost
from modules.critic import GoalCritic, TrainableCritic
from modules.ego import LinearStandIn
from modules.memory import EpisodeTrail, ShortTermMemory
from modules.nn import Repairs
from modules.perception import ImagePerception, Perception
from modules.planners import GradientPlanner, MPPIPlanner
from modules.shield import ModelTrust, Shield
from modules.world_model import WorldModel


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"device={name!r}: not a torch device; expected auto, cpu, cuda or cuda:N") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r}: CUDA is not available on this machine; use device=cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device={name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def build_planner(config: ActorConfig, repairs: Repairs | None = None) -> GradientPlanner | MPPIPlanner:
    """The configured planner (agent.actor.planner), for the actor or for any energy (a true-dynamics oracle)."""
    planner = GradientPlanner if config.planner == "gradient" else MPPIPlanner
    return planner(config, repairs)


def build_perception(observation: int | gym.Space, config: AgentConfig) -> Perception | ImagePerception:
    """observation: a vector's size, or the observation space (a flat Box, a uint8 image Box, or a Dict of
    "image", optional "goal" and optional "vector")."""
    if isinstance(observation, int):
        return Perception(observation, config.perception)
    if isinstance(observation, gym.spaces.Dict):
        vector = observation.spaces.get("vector")
        return ImagePerception(observation["image"].shape, 0 if vector is None else vector.shape[0],
                               "goal" in observation.spaces, config.perception)
    if len(observation.shape) == 3:
        return ImagePerception(observation.shape, 0, False, config.perception)
    return Perception(observation.shape[0], config.perception)


def build_agent(config: AgentConfig, observation: int | gym.Space, action_dim: int,
                observation_names: list[str], device: torch.device, num_envs: int = 1) -> Agent:
    """observation: the observation space, or a vector observation's size; num_envs: the environments acting at
    once in training (short-term memory keeps one stream each)."""
    repairs = Repairs()
    perception = build_perception(observation, config).to(device)
    latent_dim = config.perception.latent_dim
    world_model = WorldModel(latent_dim, action_dim, observation_names, config.world_model).to(device)
    intrinsic = IntrinsicCost(config.cost.terms, observation_names)
    critic = TrainableCritic(latent_dim, action_dim, config.cost).to(device)
    has_goal = isinstance(observation, gym.spaces.Dict) and "goal" in observation.spaces
    goal_critic = GoalCritic(latent_dim, config.cost.goal).to(device) if has_goal else None
    cost = Cost(intrinsic, critic, goal_critic)
    terms = len(intrinsic.term_names)
    if isinstance(perception, ImagePerception):  # memory keeps the image, as uint8, and a dict's vector
        memory = ShortTermMemory(perception.image_shape, action_dim, latent_dim, terms, num_envs, config.memory,
                                 torch.uint8, perception.vector_dim)
    else:
        memory = ShortTermMemory(perception.obs_dim, action_dim, latent_dim, terms, num_envs, config.memory)
    policy = Policy(latent_dim, action_dim, config.actor).to(device)
    shield = Shield(config.shield, intrinsic, world_model, observation_names, action_dim)
    guide = shield.planning_cost if shield.active and shield.ego is not None and config.shield.guide_planner else None
    energy = PlanEnergy(world_model, intrinsic, critic, config.cost.discount, config.cost.value_weight, guide,
                        config.cost.goal, goal_critic, config.cost.boredom_weight, config.cost.boredom_radius)
    if config.actor.compile:
        energy.compile()
    actor = Actor(policy, energy, build_planner(config.actor, repairs), action_dim, config.actor, repairs)
    configurator = Configurator(config.configurator, intrinsic.default_weights, intrinsic.guardrail_names,
                                config.actor.horizon, config.actor.iterations, device)
    trail = EpisodeTrail(config.memory.trail_capacity, latent_dim, config.memory.trail_every) \
        if config.cost.boredom_weight else None
    stand_in = None
    if shield.active and config.shield.stand_in == "linear":
        if not observation_names:
            raise ConfigError("agent.shield.stand_in='linear' models the observation's named quantities; this "
                              "env's observation has none (pixels alone)")
        stand_in = LinearStandIn(len(observation_names), action_dim, world_model.ensemble_size)
    return Agent(perception, world_model, cost, memory, actor, configurator, shield, device,
                 config.actor.exploration_std, trail, repairs, ModelTrust(config.shield.trust_window),
                 stand_in, ModelTrust(config.shield.trust_window), config.shield.stand_in_refit)


def parameter_counts(agent: Agent) -> dict[str, int]:
    modules = {"perception": agent.perception.encoder, "world_model": agent.world_model,
               "critic": agent.cost.critic, "policy": agent.actor.policy}
    if agent.cost.goal_critic is not None:
        modules["goal_critic"] = agent.cost.goal_critic
    return {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in modules.items()}
