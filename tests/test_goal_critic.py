"""The goal critic: hindsight goals from stored episodes, and steps to a goal learned by expectile TD."""

from __future__ import annotations

import pytest
import torch

from ami.learner import episode_bounds, hindsight_goals
from ami.schema import GoalConfig
from modules.critic import GoalCritic


def test_episode_bounds() -> None:
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    first, last = episode_bounds(ids)
    assert first.tolist() == [0, 0, 0, 3, 3, 5, 5, 5, 5]
    assert last.tolist() == [2, 2, 2, 4, 4, 8, 8, 8, 8]


def _transitions(ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Positions whose next frame is in the same episode."""
    return (torch.arange(len(ids)) < last).nonzero().squeeze(1)


def test_hindsight_goals_stay_in_the_episode() -> None:
    ids = torch.arange(50).repeat_interleave(20)  # 50 episodes of 20 frames
    first, last = episode_bounds(ids)
    transitions = _transitions(ids, last)
    index = transitions[torch.randint(len(transitions), (20_000,), generator=torch.Generator().manual_seed(0))]
    goal = hindsight_goals(index, first, last, 0.9, torch.Generator().manual_seed(1))
    assert (ids[goal] == ids[index]).all()
    reached = (goal == index).float().mean().item()
    assert 0.2 <= reached < 0.3  # a fifth by construction, plus uniform draws that land on the frame itself
    assert (goal < index).float().mean().item() > 0.1  # earlier frames are goals too: the walk can go back
    assert (goal > index).float().mean().item() > 0.5


def _chain_episodes(length: int, episodes: int, steps: int, generator: torch.Generator) -> torch.Tensor:
    """Random walks on positions 0..length-1 (a step left, right, or none): (episodes * steps,) positions."""
    position = torch.randint(length, (episodes,), generator=generator)
    walk = []
    for _ in range(steps):
        walk.append(position.clone())
        position = (position + torch.randint(-1, 2, (episodes,), generator=generator)).clamp(0, length - 1)
    return torch.stack(walk, 1).flatten()


def _train_chain_critic(expectile: float, updates: int = 1500) -> tuple[GoalCritic, torch.Tensor]:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    length, steps = 12, 80
    embedding = torch.randn(length, 8, generator=generator)
    positions = _chain_episodes(length, 200, steps, generator)
    ids = torch.arange(200).repeat_interleave(steps)
    first, last = episode_bounds(ids)
    transitions = _transitions(ids, last)
    critic = GoalCritic(8, GoalConfig(critic_hidden_dim=64, critic_discount=0.95, critic_expectile=expectile,
                                      critic_tau=0.02))
    optimiser = torch.optim.Adam(critic.net.parameters(), lr=2e-3)
    for _ in range(updates):
        index = transitions[torch.randint(len(transitions), (256,), generator=generator)]
        goal = hindsight_goals(index, first, last, 0.95, generator)
        loss, _ = critic.loss(embedding[positions[index]], embedding[positions[index + 1]],
                              embedding[positions[goal]], positions[goal] == positions[index])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        critic.update_target()
    with torch.no_grad():
        grid = critic.steps(embedding[:, None].expand(-1, length, -1), embedding)  # (from, to)
    return critic, grid


@pytest.fixture(scope="module")
def chain_steps() -> dict[float, torch.Tensor]:
    return {tau: _train_chain_critic(tau)[1] for tau in (0.5, 0.9)}


def test_goal_critic_learns_steps_along_a_chain(chain_steps: dict[float, torch.Tensor]) -> None:
    """From random walks alone, the upper-expectile critic's steps grow with the true distance |i - j| and
    stay near it: the best the walks achieved, not their average (a random walk needs ~d^2 steps)."""
    steps = chain_steps[0.9]
    distance = (torch.arange(12)[:, None] - torch.arange(12)[None]).abs()
    near = (distance > 0) & (distance <= 6)  # pairs the 80-step walks join often enough to learn
    ranks = torch.stack([steps[near], distance[near].float()]).argsort(1).argsort(1).float()
    assert torch.corrcoef(ranks)[0, 1] > 0.8
    by_distance = torch.stack([steps[distance == d].mean() for d in range(1, 7)])
    assert (by_distance.diff() > 0).all(), by_distance
    assert steps.diagonal().max() < 0.5
    for d, (low, high) in {1: (0.6, 1.8), 5: (3.0, 8.0)}.items():
        assert low < steps[distance == d].mean() < high, (d, steps[distance == d].mean())


def test_upper_expectile_is_more_optimistic_than_the_mean(chain_steps: dict[float, torch.Tensor]) -> None:
    distance = (torch.arange(12)[:, None] - torch.arange(12)[None]).abs()
    far = distance >= 6
    assert chain_steps[0.9][far].mean() < 0.8 * chain_steps[0.5][far].mean()


def test_goal_critic_gradient_reaches_states() -> None:
    critic = GoalCritic(4, GoalConfig(critic_hidden_dim=16))
    states = torch.randn(5, 3, 4, requires_grad=True)  # (H, B, D)
    steps = critic.steps(states, torch.randn(3, 4))
    assert steps.shape == (5, 3) and (steps >= 0).all()
    steps.sum().backward()
    assert states.grad is not None and states.grad.abs().sum() > 0


def test_the_critic_metric_prices_steps_and_needs_a_trained_critic() -> None:
    from omegaconf import OmegaConf

    from ami.build import build_agent
    from ami.config import load_config
    from ami.envs import make_env

    cfg = load_config(["env=two_rooms", "agent.cost.goal.metric=critic", "agent.actor.compile=false",
                       "agent.learner.compile=false",
                       "agent.actor.horizon=6", "agent.cost.goal.final_weight=3.0", "agent.memory.capacity=10",
                       "agent.perception.conv_channels=4"])
    env = make_env(cfg.env)
    agent = build_agent(OmegaConf.to_object(cfg.agent), env.observation_space, 2, [], torch.device("cpu"))
    critic = agent.cost.goal_critic
    assert isinstance(critic, GoalCritic)
    weights = torch.zeros(len(agent.cost.intrinsic.term_names))
    generator = torch.Generator().manual_seed(0)
    state, goal = torch.randn(2, 32, generator=generator), torch.randn(2, 32, generator=generator)
    with pytest.raises(ValueError, match="trained goal critic"):
        agent.actor.energy.bind(weights, goal=goal)
    critic.trained.fill_(True)
    actions = (torch.rand(6, 2, 2, generator=generator) * 2 - 1).requires_grad_(True)
    energy, states = agent.actor.energy.bind(weights, goal=goal)(state, actions)
    steps = critic.steps(states[1:], goal)
    torch.testing.assert_close(energy, steps.sum(0) + 3.0 * steps[-1])  # the preset's discount is 1
    energy.sum().backward()
    assert actions.grad is not None and actions.grad.abs().sum() > 0
