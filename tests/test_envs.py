"""Every env preset: its gymnasium env builds through ami's wrapper, its observation names match the
observation, its cost terms read quantities that exist, and a short real run trains on MuJoCo."""

import csv

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ami.build import build_agent
from ami.config import available, load_config, load_saved
from ami.envs import make_env, observation_names
from ami.evaluate import evaluate
from ami.train import Trainer

PRESETS = [name for name in available("env") if name != "gym"]


@pytest.mark.parametrize("preset", PRESETS)
def test_env_preset_builds_and_its_cost_reads_the_observation(preset):
    cfg = load_config([f"env={preset}"])
    env = make_env(cfg.env)
    obs, _ = env.reset(seed=0)
    image = obs["image"] if isinstance(obs, dict) else obs
    assert image.dtype == (np.uint8 if image.ndim == 3 else np.float32)
    assert env.action_space.low.min() == -1.0 and env.action_space.high.max() == 1.0
    names = observation_names(cfg.env, env)
    agent = build_agent(OmegaConf.to_object(cfg.agent), env.observation_space, env.action_space.shape[0], names,
                        torch.device("cpu"))
    action = np.zeros(env.action_space.shape, dtype=np.float32)
    next_obs, reward, _, _, info = env.step(action)
    batch = {k: v[None] for k, v in next_obs.items()} if isinstance(next_obs, dict) else next_obs[None]
    quantities = agent.perceive(batch).observation  # the named quantities: none for an image
    assert quantities.shape == (1, len(names))
    terms = agent.cost.intrinsic.real_terms(quantities, torch.as_tensor(action)[None], torch.tensor([reward]),
                                            {key: np.asarray([value]) for key, value in info.items()})
    assert terms.shape == (1, len(agent.cost.intrinsic.term_names))
    assert torch.isfinite(terms).all()
    env.close()


def test_reacher_distance_term_is_the_env_reward_distance():
    """Reacher-v5 reward is -distance - |a|^2; the preset analytic terms rebuild it exactly."""
    cfg = load_config(["env=reacher"])
    env = make_env(cfg.env)
    obs, _ = env.reset(seed=3)
    names = observation_names(cfg.env, env)
    agent = build_agent(OmegaConf.to_object(cfg.agent), obs.shape[0], 2, names, torch.device("cpu"))
    weights = agent.cost.intrinsic.weight_vector() * agent.cost.intrinsic.mask("analytic")
    rng = np.random.default_rng(0)
    for _ in range(20):
        action = rng.uniform(-1, 1, 2).astype(np.float32)
        obs, reward, _, _, info = env.step(action)
        # Reacher-v5 scores the state it arrives in; ami scores the state it acts from (a one-step
        # shift that planning over a horizon does not feel). The formulas themselves are the env's.
        terms = agent.cost.intrinsic.analytic_terms(torch.as_tensor(obs)[None], torch.as_tensor(action)[None])
        cost = float((terms[0] * weights).sum())
        assert cost == pytest.approx(-reward, abs=2e-3)
    env.close()


def test_short_run_on_inverted_pendulum(tmp_path):
    """A real MuJoCo env with terminations, through the whole trainer with two envs: each episode's return is
    its length less the falling step (InvertedPendulum-v5 pays 1 per step upright), every fall is a terminated
    transition in memory with the observation after it stored, and evaluation writes its returns."""
    cfg = load_config(["env=inverted_pendulum", "agent=tiny", "train.num_envs=2", "train.total_steps=150",
                       "train.seed_steps=60", "train.pretrain_updates=10", "train.eval_every=150",
                       "train.eval_episodes=2", f"runs_dir={tmp_path}", "progress=false"])
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.train()
    episodes = list(csv.DictReader((tmp_path / "run" / "episodes.csv").open()))
    assert len(episodes) >= 4  # random actions tip the pole over within the seed phase
    for row in episodes:
        assert float(row["return"]) == int(row["length"]) - 1, row
    memory = trainer.agent.memory
    falls = memory.terminated & memory.has_transition
    assert int(falls.sum()) == len(episodes)
    rows, envs = falls.nonzero(as_tuple=True)
    after = (rows + 1) % memory.rows, envs
    assert not memory.has_transition[after].any() and (memory.episode[after] == memory.episode[rows, envs]).all()
    rows = list(csv.DictReader((tmp_path / "run" / "eval.csv").open()))
    assert len(rows) == 1 and 150 <= int(rows[0]["step"]) < 152  # the two envs step together: 150 or just past it
    assert len(rows[0]["returns"].split()) == 2


@pytest.mark.parametrize("repeat", [2, 3])
def test_action_repeat_holds_each_action_sums_its_rewards_and_stops_where_the_episode_ends(repeat):
    """dm_control's cartpole-swingup (1,000 physics steps an episode) held `repeat` steps an action, against the
    same env stepped once an action: the same states, the rewards summed; 3 does not divide 1,000, so the last
    action is held one step, and the episode is truncated, not terminated."""
    held = make_env(load_config(["env=dmc_cartpole_swingup", f"env.action_repeat={repeat}"]).env)
    single = make_env(load_config(["env=dmc_cartpole_swingup", "env.action_repeat=1"]).env)
    obs_held, obs_single = held.reset(seed=0)[0], single.reset(seed=0)[0]
    rng, steps, done = np.random.default_rng(0), 0, False
    while not done:
        action = rng.uniform(-1.0, 1.0, 1).astype(np.float32)
        obs_held, reward_held, terminated, truncated, _ = held.step(action)
        rewards = []
        for _ in range(repeat):
            obs_single, reward, *ended, _ = single.step(action)
            rewards.append(reward)
            if any(ended):
                break
        steps, done = steps + 1, terminated or truncated
        assert np.array_equal(obs_held, obs_single) and reward_held == pytest.approx(sum(rewards), rel=1e-9)
        assert any(ended) == done
    assert steps == -(-1000 // repeat) and truncated and not terminated
    held.close()
    single.close()


def test_a_dict_observation_dm_control_task_trains_saves_resumes_and_evaluates(tmp_path):
    """cartpole-swingup's Dict of position and velocity, flattened into named quantities, each action held for two
    physics steps, in 200-step episodes (100 actions): a run stopped at step 150 resumes to 250 and evaluates."""
    overrides = ["env=dmc_cartpole_swingup", "agent=tiny", "env.max_episode_steps=200", "train.seed_steps=60",
                 "train.pretrain_updates=10", "train.eval_every=100000", "train.checkpoint_every=100",
                 f"runs_dir={tmp_path}", "progress=false"]
    first = Trainer(load_config([*overrides, "train.total_steps=150"]), tmp_path / "run")
    first.train()
    assert first.agent.world_model.observation_names == [f"position_{i}" for i in range(3)] + ["velocity_0",
                                                                                               "velocity_1"]
    resumed = Trainer(load_saved(tmp_path / "run" / "config.yaml", ["train.total_steps=250"]), tmp_path / "run",
                      resume=True)
    assert resumed.loop.env_steps == 150
    resumed.train()
    episodes = list(csv.DictReader((tmp_path / "run" / "episodes.csv").open()))
    assert [int(row["length"]) for row in episodes] == [100, 100]  # the one cut at 150 is not logged ...
    memory = resumed.agent.memory  # ... but closed in memory as truncated, as the two ended by the time limit are
    assert int((memory.truncated & memory.has_transition).sum()) == 3 and not memory.terminated.any()
    assert all(0.0 <= float(row["return"]) <= 2.0 * int(row["length"]) for row in episodes)  # 2 rewards in [0, 1]
    result = evaluate(resumed.agent, resumed.cfg.env, episodes=2)
    assert list(result.lengths) == [100, 100] and ((result.returns >= 0.0) & (result.returns <= 200.0)).all()


def test_mountaincar_energy_drive_matches_the_env_dynamics():
    """The swing drive is 1 at rest on the valley floor, 0 at rest at the flag, and nearly constant
    along a real MountainCarContinuous-v0 trajectory without force (the energy it measures is the
    env's own, conserved up to the integrator's error)."""
    cfg = load_config(["env=mountaincar"])
    env = make_env(cfg.env)
    names = observation_names(cfg.env, env)
    agent = build_agent(OmegaConf.to_object(cfg.agent), 2, 1, names, torch.device("cpu"))
    swing = agent.cost.intrinsic.term_names.index("swing")

    def drive(position, velocity):
        q = torch.tensor([[position, velocity]], dtype=torch.float32)
        return float(agent.cost.intrinsic.analytic_terms(q, torch.zeros(1, 1))[0, swing])

    assert drive(-np.pi / 6, 0.0) == pytest.approx(1.0, abs=1e-4)
    assert drive(0.45, 0.0) == pytest.approx(0.0, abs=1e-4)
    assert drive(-0.5, 0.07) == 0.0  # enough speed at the bottom to reach the flag
    env.reset(seed=0)
    env.unwrapped.state = np.array([-0.9, 0.0])
    values = []
    for _ in range(60):
        obs, *_ = env.step(np.zeros(1, dtype=np.float32))
        values.append(drive(float(obs[0]), float(obs[1])))
    assert max(values) - min(values) < 0.05
    # With full force the drive falls: the car gains the energy it is missing.
    env.unwrapped.state = np.array([-0.5, 0.0])
    for _ in range(30):
        obs, *_ = env.step(np.array([1.0 if obs[1] >= 0 else -1.0], dtype=np.float32))
    assert drive(float(obs[0]), float(obs[1])) < 0.9
    env.close()


def test_cost_from_termination_pays_one_on_the_step_a_walker_falls():
    cfg = load_config(["env=hopper"])
    assert cfg.env.cost_from_termination
    env = make_env(cfg.env)
    env.reset(seed=0)
    costs, terminated = [], False
    while not terminated:
        _, _, terminated, truncated, info = env.step(np.ones(env.action_space.shape, dtype=np.float32))
        costs.append(info["cost"])
        assert not truncated
    assert costs[-1] == 1.0 and sum(costs[:-1]) == 0.0 and len(costs) > 1
