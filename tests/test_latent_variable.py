"""The world model's latent variable z: with z_dim=0 the model is exactly the deterministic one; on a world with
two futures its prior's draws land on both while the deterministic model predicts their midpoint; the KL keeps z
from carrying what it need not. Unit tests on hand-made worlds, then a short guarded WindyCliff run that logs z,
checkpoints it and refuses a resume without it."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_windy_cliff import SHORT

from ami.config import ConfigError, load_config
from ami.schema import WorldModelConfig
from ami.train import Trainer
from modules.nn import mlp
from modules.world_model import LatentVariable, WorldModel

STATE, ACTION = 2, 1


def trained(world: str, steps: int = 1200, **config) -> tuple[WorldModel, dict[str, torch.Tensor]]:
    """A world model of STATE-d latents trained on one-step transitions s' = s + a (+ the world's randomness):
    "coin": +-1 on the first dimension, even odds; "noise": N(0, 0.5^2) on every dimension.
    -> (the model, its last z figures)."""
    torch.manual_seed(0)
    model = WorldModel(STATE, ACTION, [], WorldModelConfig(hidden_dim=64, **config))
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    figures = {}
    for _ in range(steps):
        state, action = torch.rand(256, STATE) * 2 - 1, torch.rand(256, ACTION) * 2 - 1
        if world == "coin":
            flip = torch.randint(0, 2, (256, 1)).float() * 2 - 1
            randomness = torch.cat([flip, torch.zeros(256, STATE - 1)], dim=-1)
        else:
            randomness = 0.5 * torch.randn(256, STATE)
        _, loss, _, figures = model.prediction_loss(state, action[None], (state + action + randomness)[None])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model, figures


def test_without_z_the_world_model_is_the_deterministic_one():
    config = WorldModelConfig(hidden_dim=16, ensemble_size=2)
    torch.manual_seed(3)
    model = WorldModel(STATE, ACTION, ["x", "y"], config)
    torch.manual_seed(3)  # the same parts, made in the same order from the same stream
    parts = [mlp(STATE + ACTION, 16, STATE), mlp(STATE + ACTION, 16, STATE), mlp(STATE, 16, 2),
             mlp(2 * STATE, 16, ACTION, layers=1)]
    reference = [p for part in parts for p in part.parameters()]
    assert model.latent_variable is None
    assert len(list(model.parameters())) == len(reference)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference, strict=True))
    predictor, member = parts[0], parts[1]

    def step(net, state, action):
        return state + net(torch.cat([state, action], dim=-1))

    state, actions, targets = torch.randn(5, STATE), torch.rand(3, 5, ACTION) * 2 - 1, torch.randn(3, 5, STATE)
    assert torch.equal(model.step(state, actions[0]), step(predictor, state, actions[0]))
    members = torch.stack([state, state + 1])
    assert torch.equal(model.step_members(members, actions[0]),
                       torch.stack([step(predictor, members[0], actions[0]), step(member, members[1], actions[0])]))
    predicted, loss, by_horizon, figures = model.prediction_loss(state, actions, targets)
    imagined, ensemble = [state], [state]
    for action in actions:
        imagined.append(step(predictor, imagined[-1], action))
        ensemble.append(step(member, ensemble[-1], action))
    imagined, ensemble = torch.stack(imagined), torch.stack(ensemble)
    weights = config.horizon_discount ** torch.arange(3, dtype=torch.float32)
    expected = (weights * (imagined[1:] - targets).pow(2).mean(dim=(1, 2))).sum() / weights.sum()
    member_loss = sum(weights[k] * (ensemble[k + 1] - targets[k]).pow(2).mean() for k in range(3))
    assert torch.equal(predicted, imagined) and torch.equal(model.rollout(state, actions), imagined)
    assert torch.equal(by_horizon, (imagined[1:] - targets).pow(2).mean(dim=(1, 2)))
    assert torch.equal(loss, expected + member_loss / weights.sum())
    assert figures == {}


@pytest.mark.parametrize("kind,classes", [("gaussian", 2), ("discrete", 4)])
def test_the_prior_draws_both_futures_where_the_deterministic_model_predicts_their_midpoint(kind, classes):
    deterministic, _ = trained("coin")
    model, figures = trained("coin", z_dim=classes, z_kind=kind)
    state, action = torch.tensor([[0.2, -0.1]]).expand(400, -1), torch.full((400, 1), 0.3)
    with torch.no_grad():
        midpoint = deterministic.step(state[:1], action[:1])[0, 0] - 0.5
        noise = model.latent_variable.noise_like(model.latent_variable.prior(state, action))
        draws = model.step(state, action, noise)[:, 0] - 0.5  # s + a = 0.5; the two futures 1.5 and -0.5
    assert abs(midpoint) < 0.15  # the average of two futures, a state that never happens
    on_a_future = ((draws.abs() - 1).abs() < 0.25).float().mean()
    up = (draws > 0).float().mean()
    assert on_a_future > 0.9 and 0.3 < up < 0.7, (on_a_future, up)
    # A coin carries log 2 = 0.69 nats; with z read off the transition the prediction is all but exact.
    assert 0.5 < figures["information"] < 2.0 and figures["posterior_error"] < 0.02
    assert figures["prior_sample_error"] > 0.5 and figures["spread"] > 0.3


def test_the_kl_keeps_z_from_carrying_the_next_state():
    free, free_figures = trained("noise", z_dim=STATE, z_weight=0.0)
    bounded, bounded_figures = trained("noise", z_dim=STATE, z_weight=10.0)
    # Unbounded, z carries the noise the past cannot predict: the transition is read off z, nats of it.
    assert free_figures["information"] > 5 and free_figures["posterior_error"] < 0.02
    # Bounded, it carries nothing: the predictor predicts the mean from s and a, whatever z is drawn.
    assert bounded_figures["information"] < 0.05 and bounded_figures["usage"] == 0
    assert 0.2 < bounded_figures["posterior_error"] < 0.3  # the noise's variance, 0.25
    assert abs(bounded_figures["prior_sample_error"] - bounded_figures["posterior_error"]) < 0.02
    assert bounded_figures["spread"] < 0.05


def test_draws_kl_and_usage_on_hand_made_distributions():
    config = WorldModelConfig(hidden_dim=8, z_dim=2)
    gaussian = LatentVariable(STATE, ACTION, config)
    params = torch.tensor([[0.5, -1.0, 3.0, 3.0]])  # mean (0.5, -1), raw std 3 -> softplus(3) + 0.1
    std = torch.nn.functional.softplus(torch.tensor(3.0)) + 0.1
    assert torch.equal(gaussian.sample(params), params[:, :2])  # no noise: the mean
    assert torch.allclose(gaussian.sample(params, torch.tensor([[1.0, -2.0]])), torch.tensor([[0.5, -1.0]])
                          + std * torch.tensor([[1.0, -2.0]]))
    assert gaussian.kl(params, params).abs().max() < 1e-6
    shifted = params + torch.tensor([[1.0, 0.0, 0.0, 0.0]])  # the first mean one unit away, same std
    assert torch.allclose(gaussian.kl(shifted, params), 0.5 / std**2)
    assert gaussian.usage(shifted[None], params[None]) == 0.5  # one of the two dimensions carries anything
    assert gaussian.noise_like(params).shape == (1, 2)
    discrete = LatentVariable(STATE, ACTION, WorldModelConfig(hidden_dim=8, z_dim=3, z_kind="discrete"))
    logits = torch.tensor([[0.0, 2.0, 0.0]], requires_grad=True)
    z = discrete.sample(logits)
    assert torch.equal(z.detach(), torch.tensor([[0.0, 1.0, 0.0]]))  # no noise: the likeliest class
    z[0, 0].backward()
    assert logits.grad.abs().sum() > 0  # straight through the softmax
    noise = torch.tensor([[0.999, 1e-6, 0.5]])  # Gumbel noise large for class 0, very negative for class 1
    assert torch.equal(discrete.sample(logits.detach(), noise), torch.tensor([[1.0, 0.0, 0.0]]))
    uniform, certain = torch.zeros(1, 3), torch.tensor([[0.0, 30.0, 0.0]])
    assert torch.allclose(discrete.kl(certain, uniform), torch.log(torch.tensor(3.0)), atol=1e-4)
    assert torch.allclose(discrete.usage(uniform[None], uniform[None]), torch.tensor(1.0))
    assert torch.allclose(discrete.usage(certain[None], uniform[None]), torch.tensor(1 / 3), atol=1e-4)
    assert ((discrete.noise_like(logits) > 0) & (discrete.noise_like(logits) < 1)).all()


def test_bad_latent_variable_settings_are_refused():
    with pytest.raises(ConfigError, match="agent.world_model.z_kind='binary'"):
        load_config(["agent.world_model.z_dim=2", "agent.world_model.z_kind=binary"])
    with pytest.raises(ConfigError, match="agent.world_model.z_dim=-1"):
        load_config(["agent.world_model.z_dim=-1"])
    with pytest.raises(ConfigError, match="agent.world_model.z_weight=-0.5"):
        load_config(["agent.world_model.z_weight=-0.5"])
    with pytest.raises(ConfigError, match="z_dim=1 with z_kind='discrete'"):
        load_config(["agent.world_model.z_dim=1", "agent.world_model.z_kind=discrete"])


def test_a_guarded_run_with_z_logs_it_checkpoints_it_and_resumes_only_with_it(tmp_path):
    # The shield's look-ahead steps every ensemble member with z from the prior at its own state.
    overrides = [*SHORT, f"runs_dir={tmp_path}", "agent.world_model.z_dim=3", "agent.world_model.ensemble_size=2",
                 "train.log_every=100"]
    trainer = Trainer(load_config(overrides), tmp_path / "run")
    trainer.train()
    events = EventAccumulator(str(tmp_path / "run"), size_guidance={"scalars": 0})
    events.Reload()
    for name in ("information", "usage", "posterior_error", "prior_sample_error", "spread"):
        values = [event.value for event in events.Scalars(f"world_model/z/{name}")]
        assert len(values) >= 3 and all(value == value for value in values), name  # logged, finite
    latent = trainer.agent.world_model.latent_variable
    resumed = Trainer(load_config(overrides), tmp_path / "run", resume=True)
    resumed.logger.close()
    assert all(torch.equal(a, b) for a, b in zip(resumed.agent.world_model.latent_variable.parameters(),
                                                 latent.parameters(), strict=True))
    with pytest.raises(RuntimeError, match="latent_variable"):  # a checkpoint with z cannot load into a model without
        Trainer(load_config([*overrides, "agent.world_model.z_dim=0"]), tmp_path / "run", resume=True)
