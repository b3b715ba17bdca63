"""Boredom: the episode's trail of latents (short-term memory) and the cost of lingering near it."""

from typing import NamedTuple

import pytest
import torch
from omegaconf import OmegaConf

from ami.agent import Agent
from ami.build import build_agent
from ami.config import ConfigError, load_config
from ami.envs import make_env
from ami.goals import batched
from modules.cost import boredom
from modules.memory import EpisodeTrail

TINY_TWO_ROOMS = ["env=two_rooms", "agent.actor.compile=false", "agent.learner.compile=false", "agent.actor.horizon=6",
                  "agent.actor.screen_samples=0", "agent.memory.capacity=10", "agent.perception.conv_channels=4",
                  "agent.memory.trail_capacity=5", "agent.memory.trail_every=1"]


def two_rooms_agent(*overrides: str):
    cfg = load_config([*TINY_TWO_ROOMS, *overrides])
    env = make_env(cfg.env)
    return build_agent(OmegaConf.to_object(cfg.agent), env.observation_space, 2, [], torch.device("cpu")), env


def test_trail_keeps_the_newest_states_per_env_and_forgets_on_reset() -> None:
    trail = EpisodeTrail(capacity=3, latent_dim=2)
    assert trail.view() is None
    for step in range(4):  # one more than fits: the oldest is overwritten
        trail.add(torch.tensor([[step, 0.0], [step, 1.0]]))
    torch.testing.assert_close(trail.latents[0, :, 0], torch.tensor([3.0, 1.0, 2.0]))
    assert trail.count.tolist() == [4, 4]
    view = trail.view()
    trail.add(torch.tensor([[9.0, 9.0], [9.0, 9.0]]))
    assert (view != 9.0).all(), "a plan's view must not change with later steps"
    trail.reset(torch.tensor([True, False]))
    assert (trail.latents[0] == EpisodeTrail.FAR).all() and trail.count.tolist() == [0, 5]
    assert (trail.latents[1] != EpisodeTrail.FAR).any()
    trail.reset()
    assert trail.view() is None
    with pytest.raises(ValueError, match="capacity"):
        EpisodeTrail(0, 2)
    with pytest.raises(ValueError, match="every"):
        EpisodeTrail(4, 2, every=0)


def test_a_sparse_trail_keeps_one_step_in_every_few_from_each_episode_start() -> None:
    trail = EpisodeTrail(capacity=8, latent_dim=1, every=3)
    for step in range(7):
        trail.add(torch.tensor([[float(step)], [float(step)]]))
        if step == 1:
            trail.reset(torch.tensor([False, True]))  # env 1 starts a new episode after its step 1
    assert trail.count.tolist() == [3, 2]
    torch.testing.assert_close(trail.latents[0, :3, 0], torch.tensor([0.0, 3.0, 6.0]))
    torch.testing.assert_close(trail.latents[1, :2, 0], torch.tensor([2.0, 5.0]))
    assert (trail.latents[:, 3:] == EpisodeTrail.FAR).all()


def test_boredom_is_the_kernel_sum_and_empty_slots_add_nothing() -> None:
    g = torch.Generator().manual_seed(0)
    states, visited = torch.randn(4, 2, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    radius = 0.7
    brute = torch.exp(-(states[:, :, None] - visited[None]).pow(2).sum(-1) / (2 * radius**2)).sum(-1)
    torch.testing.assert_close(boredom(states, visited, radius), brute)
    padded = torch.cat([visited, torch.full((2, 3, 3), EpisodeTrail.FAR)], dim=1)
    torch.testing.assert_close(boredom(states, padded, radius), brute)
    # Standing on a state visited three times costs three.
    here = visited[:, 0]  # (B, D)
    torch.testing.assert_close(boredom(here[None], torch.stack([here] * 3, dim=1), 1e-3), torch.full((1, 2), 3.0))


class BoredPlan(NamedTuple):
    """One plan of 2 envs priced with boredom (weight 2, radius 1.5) and without, over a trail of 3 of its
    own imagined states per env."""

    agent: Agent
    weights: torch.Tensor  # (T,) all zero: the goal and boredom terms alone
    state: torch.Tensor  # (B, D)
    goal: torch.Tensor  # (B, D)
    actions: torch.Tensor  # (H, B, A), requires grad
    plain: torch.Tensor  # (B,) energy without a trail
    states: torch.Tensor  # (H + 1, B, D)
    visited: torch.Tensor  # (B, 3, D)
    bored: torch.Tensor  # (B,) energy with the trail


def bored_plan() -> BoredPlan:
    agent, _ = two_rooms_agent("agent.cost.boredom_weight=2.0", "agent.cost.boredom_radius=1.5")
    weights = torch.zeros(len(agent.cost.intrinsic.term_names))
    g = torch.Generator().manual_seed(0)
    state, goal = torch.randn(2, 32, generator=g), torch.randn(2, 32, generator=g)
    actions = (torch.rand(6, 2, 2, generator=g) * 2 - 1).requires_grad_(True)
    plain, states = agent.actor.energy.bind(weights, goal=goal)(state, actions)
    visited = states[2:5].detach().transpose(0, 1)  # (B, 3, D): where this plan passes
    bored, _ = agent.actor.energy.bind(weights, goal=goal, visited=visited)(state, actions)
    return BoredPlan(agent, weights, state, goal, actions, plain, states, visited, bored)


def test_plan_energy_adds_boredom_over_the_plan_and_its_gradient_leaves_the_trail() -> None:
    agent, weights, state, goal, actions, plain, states, visited, bored = bored_plan()
    torch.testing.assert_close(bored - plain, 2.0 * boredom(states[1:], visited, 1.5).sum(0), rtol=1e-4, atol=1e-4)
    assert ((bored - plain) > 2.0 * 3).all()  # at least one per visited state it passes through
    assert torch.autograd.grad((bored - plain).sum(), actions)[0].abs().sum() > 0
    # A planner's candidates (B * N rows) each see their own env's trail.
    rows = agent.actor.energy.bind(weights, goal=goal, visited=visited)
    energy_rows, _ = rows(state.repeat_interleave(3, 0), actions.detach().repeat_interleave(3, 1))
    torch.testing.assert_close(energy_rows, bored.detach().repeat_interleave(3, 0))


def test_agent_keeps_the_trail_of_its_episode_and_only_when_bored() -> None:
    agent, env = two_rooms_agent("agent.cost.boredom_weight=1.0")
    obs, _ = env.reset(seed=0)
    g = torch.Generator().manual_seed(0)
    percepts = []
    for _ in range(3):
        action = agent.act(batched(obs), generator=g)
        percept, task = action.percept, action.task
        percepts.append(percept.state[0])
        assert task.visited is not None and task.visited.shape == (1, 5, 32)
        obs, *_ = env.step(env.action_space.sample())
    assert agent.trail.count.tolist() == [3]
    torch.testing.assert_close(agent.trail.latents[0, :3], torch.stack(percepts))
    agent.reset()
    assert agent.trail.view() is None
    plain, _ = two_rooms_agent("agent.cost.boredom_weight=0.0")
    assert plain.trail is None
    assert plain.act(batched(obs), generator=g).task.visited is None
    env.close()


@pytest.mark.parametrize("override", ["agent.cost.boredom_weight=-1.0", "agent.cost.boredom_radius=0.0",
                                      "agent.memory.trail_capacity=0", "agent.memory.trail_every=0"])
def test_bad_boredom_settings_name_the_key(override: str) -> None:
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(["env=two_rooms", override])
