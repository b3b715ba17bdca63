"""Perception and world model: shapes, the VICReg terms keep the JEPA from collapsing, and training on
real Pendulum data lowers the multi-step prediction and readout losses."""

import pytest
import torch

from ami.learner import Learner
from ami.schema import PerceptionConfig, RewardFreeConfig, WorldModelConfig
from modules.perception import Perception
from modules.world_model import WorldModel


def test_shapes():
    torch.manual_seed(0)
    obs_dim, action_dim, latent, names = 3, 2, 7, ["a", "b", "c"]
    perception = Perception(obs_dim, PerceptionConfig(latent_dim=latent, hidden_dim=16))
    model = WorldModel(latent, action_dim, names, WorldModelConfig(hidden_dim=16))
    obs = torch.randn(4, obs_dim)
    state = perception(obs)
    assert state.shape == (4, latent)
    assert perception.target(obs).shape == (4, latent)
    assert perception.target(torch.randn(3, 4, obs_dim)).shape == (3, 4, latent)
    action = torch.rand(4, action_dim) * 2 - 1
    assert model.step(state, action).shape == (4, latent)
    actions = torch.rand(6, 4, action_dim) * 2 - 1
    states = model.rollout(state, actions)
    assert states.shape == (7, 4, latent)
    assert torch.equal(states[0], state)
    torch.testing.assert_close(states[2], model.step(model.step(state, actions[0]), actions[1]))
    assert model.readout(states).shape == (7, 4, len(names))
    assert model.readout(state).shape == (4, len(names))
    obs = torch.randn(4, 8, obs_dim)
    losses, encodings = model.loss(perception, obs, torch.rand(3, 8, action_dim))
    assert losses.total.shape == ()
    assert losses.prediction_by_horizon.shape == (3,)
    assert losses.latent_std.shape == (latent,)
    # The online encodings, detached: the critic trains on the states the world model just saw.
    assert not encodings.requires_grad
    torch.testing.assert_close(encodings, perception(obs.flatten(0, 1)).view(4, 8, latent))


def random_walk(batch, steps, generator, mixing):
    """A point in 2-D moved by random actions, seen through a noisy 8-sensor linear map.

    -> obs (steps + 1, batch, 8), actions (steps, batch, 2)."""
    position = torch.randn(batch, 2, generator=generator)
    actions = torch.rand(steps, batch, 2, generator=generator) * 2 - 1
    positions = [position]
    for action in actions:
        positions.append(positions[-1] + action)
    clean = torch.stack(positions) @ mixing.T
    return clean + 3.0 * torch.randn(clean.shape, generator=generator), actions


def train_jepa(variance_weight, covariance_weight, target="stopgrad", steps=600, seed=0):
    """-> mean per-dimension std of the encoder's output on held-out data after training."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(8, 2, generator=g)
    horizon, latent = 3, 16
    perception = Perception(8, PerceptionConfig(latent_dim=latent, hidden_dim=64, target=target, target_tau=0.05))
    model = WorldModel(latent, 2, [f"sensor_{i}" for i in range(8)],
                       WorldModelConfig(hidden_dim=64, rollout_horizon=horizon, readout_weight=0.0,
                                        variance_weight=variance_weight, covariance_weight=covariance_weight))
    perception.normalizer.update(random_walk(512, horizon, g, mixing)[0].flatten(0, 1))
    optimiser = torch.optim.Adam([*perception.encoder.parameters(), *model.parameters()], lr=3e-3)
    for _ in range(steps):
        obs, actions = random_walk(64, horizon, g, mixing)
        losses, _ = model.loss(perception, obs, actions)
        optimiser.zero_grad()
        losses.total.backward()
        optimiser.step()
        perception.update_target()
    with torch.no_grad():
        held_out = random_walk(512, horizon, g, mixing)[0].flatten(0, 1)
        return perception(held_out).std(0).mean().item()


@pytest.mark.parametrize("target", ["stopgrad", "ema"])
def test_variance_regulariser_prevents_collapse(target):
    collapsed = train_jepa(variance_weight=0.0, covariance_weight=0.0, target=target)
    regularised = train_jepa(variance_weight=1.0, covariance_weight=0.04, target=target)
    # Without the regulariser the prediction loss is won by shrinking the embedding...
    assert collapsed < 0.05, collapsed
    # ...with it, every dimension keeps (close to) unit spread.
    assert regularised > 0.5, regularised


def test_world_model_training_reduces_prediction_and_readout_loss(make_agent, fill_memory):
    agent, cfg = make_agent()
    fill_memory(agent, 400)
    batch = agent.memory.sample_sequences(256, cfg.world_model.rollout_horizon, torch.Generator().manual_seed(123))

    def evaluation_loss():
        with torch.no_grad():
            losses, _ = agent.world_model.loss(agent.perception, batch.obs, batch.actions)
        return losses.prediction.item(), losses.readout.item(), losses.latent_std.mean().item()

    prediction_before, readout_before, _ = evaluation_loss()
    learner = Learner(agent, cfg, RewardFreeConfig(), seed=0)
    for _ in range(100):
        learner.update()
    prediction_after, readout_after, latent_std = evaluation_loss()
    assert prediction_after + readout_after < 0.2 * (prediction_before + readout_before)
    assert prediction_after < 0.5 * prediction_before
    assert readout_after < 0.5 * readout_before
    # A lower prediction loss that is not bought by shrinking the latents.
    assert latent_std > 0.5


def test_every_ensemble_member_learns_the_same_dynamics_from_its_own_start():
    """Three predictors of one linear system: differently initialised, they disagree at first; the prediction loss
    trains all of them (the first through the encoder's states, the others from a detached start)."""
    torch.manual_seed(0)
    model = WorldModel(4, 1, [], WorldModelConfig(hidden_dim=32, ensemble_size=3))
    assert model.ensemble_size == 3 and len(model.predictor_parameters()) == 3 * len(list(model.predictor.parameters()))
    optimiser = torch.optim.Adam(model.predictor_parameters(), lr=5e-3)
    dynamics = torch.randn(5, 4) * 0.3

    def batch():
        state, actions = torch.randn(64, 4), torch.rand(3, 64, 1) * 2 - 1
        targets, s = [], state
        for action in actions:
            s = s + torch.cat([s, action], -1) @ dynamics
            targets.append(s)
        return state, actions, torch.stack(targets)

    def member_errors():
        state, actions, targets = batch()
        with torch.no_grad():
            predicted = model.step_members(state[None].expand(3, -1, -1), actions[0])
        return (predicted - targets[0]).pow(2).mean(dim=(1, 2))

    before = member_errors()
    spread = model.step_members(torch.zeros(3, 2, 4), torch.zeros(2, 1))
    assert (spread[0] - spread[1]).abs().max() > 1e-3  # different members, different predictions
    for _ in range(150):
        state, actions, targets = batch()
        _, loss, _, _ = model.prediction_loss(state, actions, targets)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    after = member_errors()
    assert (after < before / 10).all(), (before, after)
