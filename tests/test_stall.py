"""The configurator's stall rule: while the goal distance stops falling, the boredom weight goes up."""

import pytest
import torch
from test_boredom import bored_plan, two_rooms_agent

from ami.config import ConfigError, load_config
from ami.goals import batched
from ami.schema import ConfiguratorConfig
from modules.configurator import Configurator


def configurator(patience: int, margin: float = 0.25) -> Configurator:
    return Configurator(ConfiguratorConfig(stall_patience=patience, stall_margin=margin), {}, [], 8, 3)


def test_stall_scale_counts_steps_without_progress_per_env() -> None:
    rule = configurator(patience=2)
    # env 0: 5 (first: progress), 5 and 4.9 (within the margin: stalled), 4.5 (progress), 4.5, 4.5.
    # env 1 keeps falling by more than the margin: never stalled.
    distances = [(5.0, 9.0), (5.0, 8.0), (4.9, 7.0), (4.5, 6.0), (4.5, 5.0), (4.5, 4.0)]
    scales = [rule.stall_scale(torch.tensor(step)).tolist() for step in distances]
    assert scales == [[1.0, 1.0], [1.5, 1.0], [2.0, 1.0], [1.0, 1.0], [1.5, 1.0], [2.0, 1.0]]
    rule.reset(torch.tensor([True, False]))  # env 0 starts a new episode: its first step is progress again
    assert rule.stall_scale(torch.tensor([9.0, 4.0])).tolist() == [1.0, 1.5]
    rule.reset()
    assert rule.state.best_distance is None and rule.state.stalled_steps is None


def test_plan_energy_scales_only_the_boredom_term_per_env() -> None:
    agent, weights, state, goal, actions, plain, _, visited, bored = bored_plan()
    scale = torch.tensor([1.0, 3.0])
    scaled, _ = agent.actor.energy.bind(weights, goal=goal, visited=visited, boredom_scale=scale)(state, actions)
    torch.testing.assert_close(scaled - plain, scale * (bored - plain), rtol=1e-4, atol=1e-4)
    assert torch.autograd.grad(scaled.sum(), actions)[0].abs().sum() > 0
    # A planner's candidates (B * N rows) each see their own env's factor.
    rows = agent.actor.energy.bind(weights, goal=goal, visited=visited, boredom_scale=scale)
    energy_rows, _ = rows(state.repeat_interleave(3, 0), actions.detach().repeat_interleave(3, 1))
    torch.testing.assert_close(energy_rows, scaled.detach().repeat_interleave(3, 0))


def test_agent_raises_boredom_while_it_stands_still_and_forgets_on_reset() -> None:
    agent, env = two_rooms_agent("agent.cost.boredom_weight=1.0", "agent.configurator.stall_patience=4")
    obs, _ = env.reset(seed=0)
    g = torch.Generator().manual_seed(0)
    scales = []
    for _ in range(3):  # the dot never moves: the same distance every step
        scales.append(agent.act(batched(obs), generator=g).task.boredom_scale.tolist())
    assert scales == [[1.0], [1.25], [1.5]]
    with agent.fresh_episodes():  # evaluation starts its own count and gives training's back
        assert agent.act(batched(obs), generator=g).task.boredom_scale.tolist() == [1.0]
    assert agent.act(batched(obs), generator=g).task.boredom_scale.tolist() == [1.75]
    agent.reset()
    assert agent.act(batched(obs), generator=g).task.boredom_scale.tolist() == [1.0]
    off, _ = two_rooms_agent("agent.cost.boredom_weight=1.0", "agent.configurator.stall_patience=0")
    assert off.act(batched(obs), generator=g).task.boredom_scale is None
    no_boredom, _ = two_rooms_agent("agent.cost.boredom_weight=0.0", "agent.configurator.stall_patience=4")
    assert no_boredom.act(batched(obs), generator=g).task.boredom_scale is None  # nothing to raise
    env.close()


@pytest.mark.parametrize("override", ["agent.configurator.stall_patience=-1", "agent.configurator.stall_margin=-0.1"])
def test_bad_stall_settings_name_the_key(override: str) -> None:
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(["env=two_rooms", override])
