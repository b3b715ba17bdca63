"""Reward-free JEPA from pixels on TwoRooms: encoder shapes, anti-collapse, a world model that beats a frozen random
encoder, zero-shot planning to a goal image, and the run's checkpoint and TensorBoard figures."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ami.build import build_agent
from ami.config import ConfigError, load_config
from ami.envs import make_env, make_vector_env
from ami.goals import run_goal_episode
from ami.latent_health import effective_rank, encode, linear_probe_error, relative_prediction_error
from ami.loop import EnvLoop
from ami.reward_free import collect_dataset, encode_memory, probe_set
from ami.schema import PerceptionConfig
from ami.train import Trainer
from modules.perception import ImagePerception

# The preset's model on a quarter of its dataset; TINY shrinks the model for the tests that need no learning.
SHORT = ["env=two_rooms", "progress=false", "reward_free.transitions=50000", "train.num_envs=8",
         "reward_free.probe_frames=1000", "agent.memory.capacity=52000", "agent.actor.compile=false",
         "agent.learner.compile=false"]
TINY = [*SHORT, "reward_free.transitions=20000", "agent.memory.capacity=21000", "agent.perception.latent_dim=16",
        "agent.perception.conv_channels=8", "agent.perception.hidden_dim=128", "agent.world_model.hidden_dim=128",
        "agent.world_model.batch_size=16", "agent.world_model.rollout_horizon=4"]
UNREGULARISED = ["agent.world_model.variance_weight=0", "agent.world_model.covariance_weight=0",
                 "agent.world_model.inverse_dynamics_weight=0", "agent.world_model.temporal_variance_weight=0",
                 "agent.world_model.smoothness_weight=0"]
JOINT_UPDATES, PREDICTOR_UPDATES = 600, 1000


def make_trainer(path, *overrides, updates=0, base=TINY, data=None):
    """A reward-free Trainer with its dataset collected (or `data`'s memory, another trainer's, copied), its probe
    frames drawn, and `updates` joint updates."""
    cfg = load_config([*base, f"runs_dir={path}", f"reward_free.updates={max(updates, 1)}", *overrides])
    trainer = Trainer(cfg, path / "run")
    if data is None:
        collect_dataset(trainer)
    else:
        trainer.agent.memory.load_state_dict(data.agent.memory.state_dict())
    trainer.probe_frames, trainer.probe_positions = probe_set(cfg, cfg.reward_free.probe_frames)
    batch = trainer.agent.memory.sample_sequences(256, 2 * cfg.agent.world_model.rollout_horizon,
                                                  torch.Generator().manual_seed(7))
    trainer.probe_sequences = (batch.obs, batch.actions)
    for _ in range(updates):
        trainer.learner.update()
    return trainer


def predictor_updates(trainer, count):
    """count predictor-only updates on the trainer's encoder, frozen now."""
    latents = encode_memory(trainer.agent, progress=False)
    for _ in range(count):
        trainer.learner.update_predictor(latents)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short reward-free run of the preset's model: joint updates, then the predictor alone."""
    torch.manual_seed(0)
    # Horizon 40, not the preset's 60: this model's 60-step rollouts drift, and a plan that long wanders on
    # its way to a goal 10 pixels off (126 steps on one of the pairs below, against at most 40).
    trainer = make_trainer(tmp_path_factory.mktemp("reward_free"), "reward_free.predictor_batch_size=64",
                           "agent.actor.horizon=40", updates=JOINT_UPDATES, base=SHORT)
    predictor_updates(trainer, PREDICTOR_UPDATES)
    return trainer


def test_encoder_shapes_for_images_and_dict_observations():
    config = PerceptionConfig(latent_dim=16, conv_channels=8, keypoints=4)
    image = torch.randint(0, 256, (5, 64, 64, 3), dtype=torch.uint8)
    perception = ImagePerception((64, 64, 3), 4, True, config)
    assert perception(image, torch.randn(5, 4)).shape == (5, 16)
    assert perception.target(image[None].expand(2, -1, -1, -1, -1), torch.randn(2, 5, 4)).shape == (2, 5, 16)
    cfg = load_config(["env=two_rooms", "agent.actor.compile=false", "agent.learner.compile=false"])
    env = make_env(cfg.env)
    agent = build_agent(OmegaConf.to_object(cfg.agent), env.observation_space, 2, [], torch.device("cpu"))
    obs, _ = env.reset(seed=0)
    percept = agent.perceive({key: np.stack([value, value]) for key, value in obs.items()})
    assert percept.state.shape == (2, 32) and percept.goal.shape == (2, 32) and percept.observation.shape == (2, 0)
    assert agent.memory.obs.dtype == torch.uint8 and agent.memory.obs.shape[2:] == (64, 64, 1)
    with pytest.raises(ValueError, match="conv_layers"):
        ImagePerception((60, 60, 1), 0, False, config)


@pytest.mark.parametrize("keypoints_only", [True, False])
def test_the_split_first_convolution_is_the_convolution_of_the_image_and_its_coordinate_channels(keypoints_only):
    """The encoder convolves the image and the coordinate channels apart (the convolution is linear); it must be
    the convolution of [image / 255, coordinates] stacked, the whole encoder too, gradients included."""
    torch.manual_seed(0)
    config = PerceptionConfig(latent_dim=16, conv_channels=8, keypoints=4, keypoints_only=keypoints_only)
    encoder = ImagePerception((32, 32, 3), 0, False, config).encoder
    image = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    stacked = torch.cat([image.permute(0, 3, 1, 2).float() / 255.0, encoder.coordinates.expand(6, -1, -1, -1)], 1)
    assert torch.allclose(encoder.first_layer(image), encoder.early[0](stacked), atol=1e-5)
    early = encoder.early(stacked)
    features = [encoder.keypoints(early)] if keypoints_only else [encoder.late(early), encoder.keypoints(early)]
    reference = encoder.head(torch.cat(features, dim=-1))
    weight = encoder.early[0][0].weight
    (expected,) = torch.autograd.grad(reference.square().sum(), weight)
    latent = encoder(image)
    (gradient,) = torch.autograd.grad(latent.square().sum(), weight)
    assert torch.allclose(latent, reference, atol=1e-5)
    assert torch.allclose(gradient, expected, rtol=1e-3, atol=1e-4)


def test_the_world_model_loss_reaches_the_encoder_through_every_term(trained):
    agent = trained.agent
    batch = agent.memory.sample_sequences(4, 3, torch.Generator().manual_seed(0))
    losses, _ = agent.world_model.loss(agent.perception, batch.obs, batch.actions)
    agent.perception.zero_grad()
    agent.world_model.zero_grad()
    losses.total.backward()
    first_conv = agent.perception.encoder.early[0][0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    assert agent.world_model.inverse_dynamics_head[0].weight.grad.abs().sum() > 0
    assert losses.prediction_by_horizon.shape == (3,) and torch.isfinite(losses.total)


def test_the_dataset_is_reward_free_complete_and_collected_identically_from_the_seed(trained, tmp_path):
    memory = trained.agent.memory
    assert len(memory) == 50000 and (memory.reward == 0).all()
    # Every stretch ends with the observation it reached: one final row per episode and per environment.
    episodes = len(torch.unique(memory.episode[memory.seq >= 0]))
    assert int((~memory.has_transition & (memory.seq >= 0)).sum()) == episodes
    assert not memory.open.any()
    # The same seed collects the same data: a run of a tenth of the transitions has the same first ones.
    again = make_trainer(tmp_path, "reward_free.transitions=5000", "agent.memory.capacity=6000", base=SHORT)
    again = again.agent.memory
    rows = again.has_transition.nonzero(as_tuple=True)
    assert len(rows[0]) == 5000
    assert torch.equal(again.obs[rows], memory.obs[rows]) and torch.equal(again.action[rows], memory.action[rows])
    assert not torch.equal(again.obs[rows], memory.obs[(rows[0] + 1, rows[1])])  # the check above can fail


def test_a_dataset_that_does_not_fit_stops_before_overwriting_any_of_it(tmp_path):
    """5,000 transitions and their episodes' final frames do not fit in 5,000 rows: collection stops with a line
    naming the key, instead of overwriting the first records."""
    cfg = load_config([*TINY, f"runs_dir={tmp_path}", "reward_free.transitions=5000", "agent.memory.capacity=5000"])
    trainer = Trainer(cfg, tmp_path / "run")
    with pytest.raises(ConfigError, match="agent.memory.capacity=5000 is full"):
        collect_dataset(trainer)
    memory = trainer.agent.memory
    assert int(memory.written.max()) <= memory.rows and (memory.seq[0] == 0).all()  # the first rows are still there
    assert torch.equal(memory.step[0], torch.arange(8))  # each environment's first transition


def test_regularised_jepa_keeps_its_rank_and_unregularised_collapses(tmp_path):
    """On the flattened conv features (not the keypoints, whose latent starts near a point), the prediction
    loss alone shrinks the latent to a point; the anti-collapse terms spread it over many directions."""
    ranks, spread, data = {}, {}, None
    for name, overrides in [("regularised", []), ("unregularised", UNREGULARISED)]:
        torch.manual_seed(0)
        trainer = data = make_trainer(tmp_path / name, "agent.perception.keypoints_only=false", *overrides, data=data)
        initial = encode(trainer.agent.perception, trainer.probe_frames).std(0).mean()
        for _ in range(150):
            trainer.learner.update()
        latents = encode(trainer.agent.perception, trainer.probe_frames)
        ranks[name], spread[name] = effective_rank(latents), float(latents.std(0).mean() / initial)
    assert ranks["regularised"] > 7.0 and spread["regularised"] > 5.0, (ranks, spread)
    assert ranks["unregularised"] < 5.0 and spread["unregularised"] < 0.25, (ranks, spread)


def test_a_short_run_predicts_and_locates_the_dot_better_than_a_frozen_random_encoder(trained, tmp_path):
    torch.manual_seed(0)
    cfg = load_config([*SHORT, f"runs_dir={tmp_path}", "reward_free.predictor_batch_size=64"])
    baseline = Trainer(cfg, tmp_path / "run")
    baseline.agent.memory.load_state_dict(trained.agent.memory.state_dict())  # the same data
    baseline.probe_frames, baseline.probe_positions = trained.probe_frames, trained.probe_positions
    baseline.probe_sequences = trained.probe_sequences
    # The encoder stays at its random initialisation; the predictor gets as many updates as the trained
    # model's had in both phases together.
    predictor_updates(baseline, JOINT_UPDATES + PREDICTOR_UPDATES)
    scores = {}
    for name, trainer in [("trained", trained), ("random", baseline)]:
        report_obs, actions = trainer.probe_sequences
        agent = trainer.agent
        with torch.no_grad():
            latents = encode(agent.perception, report_obs.flatten(0, 1)).view(*report_obs.shape[:2], -1)
            predicted = agent.world_model.rollout(latents[0], actions)
        error = relative_prediction_error(predicted[1:], latents[1:], latents[0]).mean()
        frames = encode(agent.perception, trainer.probe_frames)
        probe = linear_probe_error(frames[:750], trainer.probe_positions[:750], frames[750:],
                                   trainer.probe_positions[750:])
        scores[name] = (float(error), probe)
    assert scores["trained"][0] < scores["random"][0], scores
    assert scores["trained"][1] < 0.75 * scores["random"][1], scores


def test_planning_reaches_a_goal_near_the_start_in_the_same_room(trained):
    """Zero-shot: the goal is an image the world model never saw as a goal; the plan energy is the latent
    distance to it. Each pair is 8 to 11 pixels apart (the success radius is 4.5), in one room."""
    agent, loop = trained.agent, EnvLoop(make_vector_env(trained.cfg.env, 1))
    pairs = [((10.0, 40.0), (18.0, 44.0)), ((50.0, 20.0), (43.0, 13.0)), ((8.0, 10.0), (12.0, 20.0))]
    episodes = [run_goal_episode(agent, loop, seed=k, options={"wall_x": 32.0, "door_y": 52.0, "start": start,
                                                               "goal": goal})
                for k, (start, goal) in enumerate(pairs)]
    assert all(e.success for e in episodes), [(e.success, e.steps, e.final_distance) for e in episodes]
    assert max(e.steps for e in episodes) <= 40


def test_cli_trains_resumes_logs_latent_health_and_benchmarks_planners(tmp_path):
    import subprocess
    import sys

    # 40-step episodes and 20-step plans: the goal bench below runs its episodes on this run's config.
    tiny = [*TINY, "progress=false", f"runs_dir={tmp_path}", "reward_free.transitions=5000",
            "agent.memory.capacity=5800", "reward_free.probe_frames=300", "reward_free.log_every=10",
            "reward_free.picture_every=20", "reward_free.checkpoint_every=10", "reward_free.predictor_updates=0",
            "env.max_episode_steps=40", "agent.actor.horizon=20"]
    ami = [sys.executable, "-m", "ami.cli"]
    first = subprocess.run([*ami, "train", *tiny, "reward_free.updates=20"], capture_output=True, text=True,
                           timeout=300, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "no reward stored or used" in first.stdout and "(perception" in first.stdout
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    no_critic = subprocess.run([*ami, "bench", "goals", "--runs", str(run_dir), "--variants", "critic_final"],
                               capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert no_critic.returncode == 2 and "goal critic" in no_critic.stderr
    resumed = subprocess.run([*ami, "train", "--resume", str(run_dir), "reward_free.updates=30",
                              "reward_free.predictor_updates=5", "reward_free.critic_updates=5", "progress=false"],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at update 20" in resumed.stdout and "40 updates in" in resumed.stdout
    assert "critic_updates: 5" in (run_dir / "config.yaml").read_text()  # the resumed run's own config
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    for tag in ("world_model/effective_rank", "world_model/probe_rmse", "world_model/relative_error/h1",
                "world_model/inverse_dynamics_loss", "world_model/temporal_variance_loss",
                "world_model/latent_std_min"):
        assert tag in scalars, tag
    assert [e.step for e in events.Scalars("world_model/effective_rank")] == [10, 20, 30, 40]
    assert [e.step for e in events.Scalars("cost/critic/goal_critic_loss")] == [40]
    assert "world_model/real_vs_imagined" in events.Tags()["images"]
    assert "world_model/latent_std" in events.Tags()["histograms"]
    bench = subprocess.run([*ami, "bench", "goals", "--runs", str(run_dir), "--episodes", "1", "--variants",
                            "gradient", "mppi", "critic_final", "--out", str(tmp_path / "bench"), "--no-progress"],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert bench.returncode == 0, bench.stderr
    assert "| gradient |" in bench.stdout and "| mppi |" in bench.stdout and "| critic_final |" in bench.stdout
    assert len((tmp_path / "bench" / "results.csv").read_text().splitlines()) == 4
    bad = subprocess.run([*ami, "bench", "goals", "--runs", str(run_dir), "--variants", "cem"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert bad.returncode == 2 and "cem" in bad.stderr
