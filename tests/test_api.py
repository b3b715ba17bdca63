"""The Python API (ami.AMI) as a notebook uses it: learn twice and go on, predict, evaluate, save and load the
agent alone, resume a whole run, env objects and functions, and callbacks that watch and stop training."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from ami import AMI, Callback
from ami.config import ConfigError

SMALL = ["train.seed_steps=100", "train.pretrain_updates=20", "train.eval_every=100000", "train.log_every=50",
         "train.checkpoint_every=100000"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    runs = tmp_path_factory.mktemp("api")
    model = AMI(env="pendulum", agent="tiny", overrides=[*SMALL, f"runs_dir={runs}"])
    model.learn(150)
    yield model
    model.close()


def test_learn_twice_goes_on_from_where_it_stopped(model):
    assert model.env_steps == 150
    updates = model._trainer.learner.updates
    model.learn(30)
    assert model.env_steps == 180 and model._trainer.learner.updates == updates + 30  # one update per env step
    assert (model.run_dir / "checkpoints" / "latest.pt").is_file()


def test_predict_gives_an_action_in_the_envs_own_bounds(model):
    env = gym.make("Pendulum-v1")
    obs, _ = env.reset(seed=3)
    action = model.predict(obs, generator=torch.Generator().manual_seed(0))
    assert action.shape == (1,) and action.dtype == np.float32
    # The agent's action in [-1, 1], mapped onto Pendulum's torque bounds [-2, 2].
    with model.agent.fresh_episodes():
        own = model.agent.act(obs[None], generator=torch.Generator().manual_seed(0)).actions[0]
    np.testing.assert_allclose(action, 2.0 * own, atol=1e-6)
    assert -2.0 <= action[0] <= 2.0
    env.step(action)


def test_saved_agent_loads_and_acts_identically(model, tmp_path):
    path = model.save(tmp_path / "agent.pt")
    loaded = AMI.load(path)
    assert loaded.env_steps == model.env_steps and loaded.run_dir is None  # loading starts no run
    for seed in range(3):
        obs, _ = gym.make("Pendulum-v1").reset(seed=seed)
        a = model.predict(obs, generator=torch.Generator().manual_seed(seed))
        b = loaded.predict(obs, generator=torch.Generator().manual_seed(seed))
        np.testing.assert_array_equal(a, b)
    ours, theirs = model.evaluate(episodes=2), loaded.evaluate(episodes=2)
    np.testing.assert_array_equal(ours.returns, theirs.returns)
    # A loaded agent trains on in a new run of its own, from its modules.
    loaded.learn(120)
    assert loaded.env_steps == 120 and loaded.run_dir is not None and loaded.run_dir != model.run_dir
    loaded.close()


def test_a_whole_run_resumes(model):
    model.learn(10)
    steps = model.env_steps
    resumed = AMI.resume(model.run_dir)
    assert resumed.env_steps == steps
    resumed.learn(10)
    assert resumed.env_steps == steps + 10
    resumed.close()


def test_a_callback_can_watch_and_stop_training(tmp_path):
    class StopAfterTwoEpisodes(Callback):
        def __init__(self):
            self.episodes, self.steps = [], 0

        def on_step(self, trainer, step):
            self.steps += 1

        def on_episode(self, trainer, episode):
            self.episodes.append(episode.stats["return"])
            return len(self.episodes) < 2

    callback = StopAfterTwoEpisodes()
    model = AMI(env="pendulum", agent="tiny", overrides=[*SMALL, f"runs_dir={tmp_path}"])
    model.learn(5000, callback=callback)
    assert model.env_steps == 400 and callback.steps == 400  # two 200-step Pendulum episodes, then it stopped
    assert len(callback.episodes) == 2 and all(r < 0 for r in callback.episodes)
    assert (model.run_dir / "checkpoints" / "latest.pt").is_file()
    # A plain function is an on_step callback.
    model.learn(1000, callback=lambda trainer, step: trainer.loop.env_steps < 420)
    assert model.env_steps == 420
    model.close()


def test_an_env_object_and_a_function_making_one(tmp_path):
    made = AMI(env=gym.make("Pendulum-v1"), agent="tiny",
               overrides=[*SMALL, f"runs_dir={tmp_path}"])
    made.learn(110)
    assert made.env_steps == 110 and made.run_dir.name.startswith("pendulumenv__tiny__")
    assert made.predict(np.array([1.0, 0.0, 0.0], dtype=np.float32)).shape == (1,)
    made.close()
    by_function = AMI(env=lambda: gym.make("MountainCarContinuous-v0"), agent="tiny",
                      overrides=[*SMALL, f"runs_dir={tmp_path}"])
    by_function.learn(110)
    assert by_function.env_steps == 110 and by_function.agent.world_model.observation_names == ["obs_0", "obs_1"]
    assert by_function.run_dir.name.startswith("env__tiny__")
    by_function.close()


def test_from_config_runs_the_configured_schedule(tmp_path):
    from ami.config import load_config

    model = AMI.from_config(load_config(["agent=tiny", *SMALL, "train.total_steps=120", f"runs_dir={tmp_path}",
                                         "progress=false"]))
    result = model.train()
    assert result["step"] == model.env_steps == 120 and model.run_dir.parent == tmp_path


def test_env_strings_select_presets_files_and_gymnasium_ids():
    from ami.api import env_overrides

    assert env_overrides("pendulum") == ["env=pendulum"]
    assert env_overrides("./my_env.yaml") == ["env=./my_env.yaml"]
    assert env_overrides("ami/HazardNav-v0") == ["env=gym", "env.id=ami/HazardNav-v0"]
    assert env_overrides("my_package.my_module:MyEnv-v0") == ["env=gym", "env.id=my_package.my_module:MyEnv-v0"]


def test_bad_input_names_what_was_expected(tmp_path, model):
    with pytest.raises(ConfigError, match="env='no_such_env'"):
        AMI(env="no_such_env", agent="tiny", overrides=[f"runs_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"learn\(steps=0\)"):
        model.learn(0)
