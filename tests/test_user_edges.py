"""What a new user touches first, run as they run it (subprocesses, from folders outside the checkout): their
own env by `module:id`, Dict observations, preset files anywhere, flags among overrides, `ami config`, one-line
errors that exit 2, and Ctrl-C, which saves, exits 130 and resumes."""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from omegaconf import OmegaConf

import ami
from ami.config import CONFIG_DIR, load_config
from ami.envs import FlatDictObservation, make_env, observation_names

AMI = [sys.executable, "-m", "ami.cli"]
SOURCE = Path(ami.__file__).resolve().parent.parent  # where this ami is imported from
TINY = ["agent=tiny", "train.seed_steps=100", "train.pretrain_updates=20", "train.eval_episodes=1"]

# A user's env in a module of their own: a point that moves toward a goal, observed as a Dict of vectors the way
# goal-conditioned envs and dm_control (through shimmy) observe. It takes no render_mode argument.
GOAL_ENV = textwrap.dedent('''
    import gymnasium as gym
    import numpy as np

    class ReachGoal(gym.Env):
        def __init__(self):
            box = lambda *shape: gym.spaces.Box(-5.0, 5.0, shape, dtype=np.float64)
            self.observation_space = gym.spaces.Dict({"position": box(2), "goal": box(2), "time": box()})
            self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), dtype=np.float32)

        def _obs(self):
            return {"position": self.pos.copy(), "goal": self.target.copy(), "time": np.array(self.t / 50)}

        def reset(self, seed=None, options=None):
            super().reset(seed=seed)
            self.pos, self.target, self.t = self.np_random.uniform(-1, 1, 2), self.np_random.uniform(-1, 1, 2), 0
            return self._obs(), {}

        def step(self, action):
            self.pos, self.t = np.clip(self.pos + 0.1 * np.asarray(action), -5, 5), self.t + 1
            return self._obs(), -float(np.linalg.norm(self.pos - self.target)), False, False, {}

    gym.register("ReachGoal-v0", entry_point=ReachGoal, max_episode_steps=50)
''')


def ami(*args, cwd, env=None, timeout=300):
    return subprocess.run([*AMI, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)


def with_path(folder) -> dict:
    """The environment of a subprocess that imports modules from `folder` (and ami from this checkout)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(SOURCE)])}


def one_line_error(result) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# -- a user's own env ------------------------------------------------------------------------------------------

def test_a_dict_of_vectors_is_one_vector_named_by_its_keys():
    space = gym.spaces.Dict({"position": gym.spaces.Box(-1, 1, (2,)), "time": gym.spaces.Box(0, 1, ()),
                             "grid": gym.spaces.Box(0, 3, (2, 2), dtype=np.int64)})

    class Env(gym.Env):
        observation_space, action_space = space, gym.spaces.Box(-1, 1, (1,))

        def reset(self, seed=None, options=None):
            return {"position": np.array([0.5, -0.5]), "time": np.array(0.25), "grid": np.arange(4).reshape(2, 2)}, {}

    env = FlatDictObservation(Env())  # in the Dict space's key order (gymnasium sorts a plain dict's keys)
    assert env.names == ["grid_0", "grid_1", "grid_2", "grid_3", "position_0", "position_1", "time"]
    obs, _ = env.reset()
    assert obs.dtype == np.float32 and obs.tolist() == [0.0, 1.0, 2.0, 3.0, 0.5, -0.5, 0.25]
    assert env.observation_space.contains(obs)
    assert env.observation_space.low.tolist() == [0, 0, 0, 0, -1, -1, 0]
    assert env.observation_space.high.tolist() == [3, 3, 3, 3, 1, 1, 1]


def test_a_module_id_env_with_dict_observations_is_made_and_named(tmp_path, monkeypatch):
    (tmp_path / "user_goal_env.py").write_text(GOAL_ENV)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(["env=gym", "env.id=user_goal_env:ReachGoal-v0"])
    env = make_env(cfg.env)
    assert observation_names(cfg.env, env) == ["goal_0", "goal_1", "position_0", "position_1", "time"]
    obs, _ = env.reset(seed=0)
    assert obs.shape == (5,) and obs.dtype == np.float32


def test_training_a_module_id_env_from_a_folder_of_its_own(tmp_path):
    (tmp_path / "user_goal_env.py").write_text(GOAL_ENV)
    result = ami("train", "env=gym", "env.id=user_goal_env:ReachGoal-v0", *TINY, "train.total_steps=150",
                 "train.eval_every=150", f"runs_dir={tmp_path / 'runs'}", "--no-progress", cwd=tmp_path,
                 env=with_path(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "env gym (user_goal_env:ReachGoal-v0, 5 named quantities)" in result.stdout, result.stdout
    assert "done: 150 env steps" in result.stdout


# -- presets and the command line --------------------------------------------------------------------------------

def test_preset_files_anywhere_and_flags_among_overrides(tmp_path):
    env_file, agent_file = tmp_path / "my_pendulum.yaml", tmp_path / "presets" / "my_agent.yaml"
    env_file.write_text((CONFIG_DIR / "env" / "pendulum.yaml").read_text().replace("  name: pendulum\n", ""))
    agent_file.parent.mkdir()
    agent_file.write_text("agent:\n  actor: {horizon: 7}\n")
    result = ami("config", "env=./my_pendulum.yaml", "seed=4", f"agent={agent_file}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    cfg = OmegaConf.create(result.stdout)
    # A preset file without a name is named by its file; its values and the overrides are all there.
    assert (cfg.env.name, cfg.env.id, cfg.agent.name) == ("my_pendulum", "Pendulum-v1", "my_agent")
    assert (cfg.agent.actor.horizon, cfg.seed) == (7, 4)
    assert [term.name for term in cfg.agent.cost.terms][0] == "pendulum"

    # Flags may come between overrides, as in `ami train env=pendulum --no-progress seed=1`.
    run = ami("train", "env=./my_pendulum.yaml", "--no-progress", *TINY, "train.total_steps=100",
              f"runs_dir={tmp_path / 'runs'}", "seed=1", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "env my_pendulum (Pendulum-v1, 3 named quantities), agent tiny, seed 1" in run.stdout
    assert "step/s" not in run.stderr  # --no-progress held, though it came before the last override
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("my_pendulum__tiny__s1__")
    assert "  horizon: 8\n" not in run.stdout and "latent_dim" not in run.stdout  # a summary, not the config


def test_version_and_unknown_flags():
    version = subprocess.run([*AMI, "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and re.fullmatch(r"ami \d+\.\d+\.\d+\n", version.stdout)
    unknown = subprocess.run([*AMI, "train", "--no-such-flag"], capture_output=True, text=True)
    assert unknown.returncode == 2 and "--no-such-flag" in unknown.stderr


@pytest.mark.parametrize(("overrides", "expected"), [
    (["env=gym", "env.id=CartPole-v1"], r"env.id='CartPole-v1' has action space Discrete\(2\).*expected a Box"),
    (["env=gym", "env.id=NoSuchEnv-v3"], r"env.id='NoSuchEnv-v3': Environment `NoSuchEnv` doesn't exist"),
    (["env=gym", "env.id=no_such_module:Env-v0"], r"env.id='no_such_module:Env-v0': cannot import module "
                                                  r"'no_such_module'"),
    (["env=gym", "env.id=json:Env-v0"], r"registers no such id"),
    (["device=cuda:99"], r"device='cuda:99': "),
    (["device=gpu"], r"device='gpu': not a torch device"),
    (["env=./missing.yaml"], r"env='./missing.yaml': no such file"),
])
def test_user_errors_exit_2_with_one_line(tmp_path, overrides, expected):
    result = ami("train", *overrides, "agent=tiny", f"runs_dir={tmp_path / 'runs'}", "--no-progress", cwd=tmp_path)
    line = one_line_error(result)
    assert re.search(expected, line), line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_eval_takes_overrides(tmp_path):
    run = ami("train", *TINY, "train.total_steps=100", f"runs_dir={tmp_path}", "--no-progress", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    # A run saved for a GPU machine, evaluated on this one.
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("device: auto", "device: cuda:99"))
    assert "device='cuda:99'" in one_line_error(ami("eval", run_dir, "--episodes", "1", cwd=tmp_path))
    evaluation = ami("eval", run_dir, "device=cpu", "--episodes", "1", cwd=tmp_path)
    assert evaluation.returncode == 0, evaluation.stderr
    assert "1 episodes from seed" in evaluation.stdout


def test_ctrl_c_saves_exits_130_and_resumes(tmp_path):
    process = subprocess.Popen([*AMI, "train", *TINY, "train.total_steps=100000", f"runs_dir={tmp_path}",
                                "--no-progress"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 120
        for line in process.stdout:  # wait until the run is under way, past its seed steps
            if line.startswith("run directory:") or time.monotonic() > deadline:
                break
        time.sleep(8)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, (stdout, stderr)
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    stopped = re.search(r"interrupted at step (\d+); resume with: ami train --resume (\S+)", stdout + stderr)
    assert stopped, (stdout, stderr)
    step, run_dir = int(stopped.group(1)), stopped.group(2)
    assert step > 0 and (tmp_path / run_dir.split("/")[-1] / "checkpoints" / "latest.pt").is_file()
    resume = ami("train", "--resume", run_dir, f"train.total_steps={step + 20}", "--no-progress", cwd=tmp_path)
    assert resume.returncode == 0, resume.stderr
    assert f"resuming at step {step}" in resume.stdout and f"done: {step + 20} env steps" in resume.stdout
