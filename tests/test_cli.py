"""The command line, run as a user runs it (a subprocess): train, eval, video, resume, the
TensorBoard tags a run writes, and configuration errors (exit status 2, naming the key)."""

import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ami.config import CONFIG_DIR

AMI = [sys.executable, "-m", "ami.cli"]
# A tiny run: 100 random steps, then planning; one evaluation (at step 200), a checkpoint at the
# first episode's end (200) and at the end (300, mid-episode); module losses logged every 50 steps.
TINY_TRAIN = ["agent=tiny", "train.total_steps=300", "train.seed_steps=100", "train.pretrain_updates=50",
              "train.eval_every=200", "train.eval_episodes=2", "train.checkpoint_every=100",
              "train.log_every=50"]


def ami(*args, cwd, timeout=300):
    return subprocess.run([*AMI, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def scalar_tags(run_dir) -> set[str]:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return set(accumulator.Tags()["scalars"])


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`ami train` of the tiny agent; the run's tags are read right after it, before anything else
    touches the run directory."""
    runs_dir = tmp_path_factory.mktemp("cli_runs")
    result = ami("train", *TINY_TRAIN, f"runs_dir={runs_dir}", "--no-progress", cwd=runs_dir)
    run_dirs = [p for p in runs_dir.iterdir() if p.is_dir()]
    tags = scalar_tags(run_dirs[0]) if len(run_dirs) == 1 else set()
    return SimpleNamespace(result=result, runs_dir=runs_dir, run_dirs=run_dirs, tags=tags)


def test_train_eval_video_and_resume(cli_run):
    train = cli_run.result
    assert train.returncode == 0, train.stderr
    # A short summary; the resolved config (the tiny agent's own values and the overrides) is in config.yaml.
    assert "env pendulum (Pendulum-v1, 3 named quantities), agent tiny, seed 0, 1 env(s)" in train.stdout
    assert "speed_limit" in train.stdout and "latent_dim" not in train.stdout
    count = re.search(r"parameters: ([\d,]+)", train.stdout)
    assert count and int(count.group(1).replace(",", "")) > 0, train.stdout
    assert len(cli_run.run_dirs) == 1
    run_dir = cli_run.run_dirs[0]
    assert f"run directory: {run_dir}" in train.stdout
    assert (run_dir / "config.yaml").is_file()
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "latest.pt").is_file()
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert (saved.train.total_steps, saved.agent.name, saved.agent.perception.latent_dim) == (300, "tiny", 16)

    evaluation = ami("eval", run_dir, "--episodes", "2", "--video", cwd=cli_run.runs_dir)
    assert evaluation.returncode == 0, evaluation.stderr
    assert re.search(r"step 300, 2 episodes from seed \d+: return -?\d+\.\d ± \d+\.\d", evaluation.stdout), \
        evaluation.stdout
    videos = list((run_dir / "videos").glob("*.mp4"))
    assert len(videos) == 1 and videos[0].stat().st_size > 0
    assert str(videos[0]) in evaluation.stdout

    resume = ami("train", "--resume", run_dir, "train.total_steps=350", "--no-progress", cwd=cli_run.runs_dir)
    assert resume.returncode == 0, resume.stderr
    assert "resuming at step 300" in resume.stdout
    assert "done: 350 env steps" in resume.stdout
    assert [p for p in cli_run.runs_dir.iterdir() if p.is_dir()] == [run_dir]  # no new run directory


@pytest.mark.parametrize(("override", "named"), [
    ("agent.actor.horizonn=3", "agent.actor.horizonn"),  # unknown key
    ("agent.actor.horizon=abc", "agent.actor.horizon"),  # wrong type
    ("agent.actor.horizon=[1", "'agent.actor.horizon=[1': its value is not YAML"),  # unreadable value
    ("agent=nope", "nope"),  # unknown variant
    ("env=nope", "nope"),
])
def test_config_errors_exit_2_and_name_the_key(tmp_path, override, named):
    args = ["agent=tiny", override] if not override.startswith("agent=") else [override]
    result = ami("train", *args, f"runs_dir={tmp_path}", "train.total_steps=1", "--no-progress", cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "configuration error" in result.stderr and named in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not list(tmp_path.iterdir())  # no run was started
    if override == "agent=nope":  # an unknown variant's message lists the choices
        assert "tiny" in result.stderr and "ami_mppi" in result.stderr


def test_config_version_and_a_configuration_error_answer_without_importing_torch(tmp_path):
    """They need no torch, so they answer at once: `ami config`, `ami --version`, and `ami train` with a key
    that does not exist (exit status 2, its one-line report)."""
    code = ("import contextlib, io, sys\n"
            "from ami.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:\n"
            "    statuses = [main(['config', 'agent=tiny']), main(['train', 'agent.actor.horizonn=3'])]\n"
            "    try:\n"
            "        main(['--version'])\n"
            "    except SystemExit as exit:\n"
            "        statuses.append(exit.code)\n"
            "print(statuses, 'horizonn' in err.getvalue(), 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[0,", "2,", "0]", "True", "False"], result.stdout


def test_eval_of_a_directory_that_is_not_a_run_exits_2(tmp_path):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    result = ami("eval", empty, cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert str(empty) in result.stderr and "no config.yaml" in result.stderr
    assert "Traceback" not in result.stderr


def test_eval_of_a_run_without_checkpoint_exits_2(cli_run, tmp_path):
    # A run directory whose checkpoint is missing (e.g. killed before its first save).
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text((cli_run.run_dirs[0] / "config.yaml").read_text())
    result = ami("eval", run, "--episodes", "1", cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "checkpoints/latest.pt" in result.stderr and "Traceback" not in result.stderr


def test_tensorboard_tags_of_a_tiny_run(cli_run):
    assert cli_run.result.returncode == 0, cli_run.result.stderr
    terms = [t.name for t in OmegaConf.load(CONFIG_DIR / "env" / "pendulum.yaml").agent.cost.terms]
    assert terms == ["pendulum", "effort", "speed_limit", "env_reward"]
    expected = {
        "charts/episodic_return", "charts/episodic_length", "charts/sps", "eval/return_mean",
        *(f"cost/intrinsic/{name}" for name in terms),
        "cost/critic/value_loss", "cost/critic/step_explained", "world_model/prediction_loss/h1",
        "world_model/latent_std_mean", "world_model/latent_std_min", "actor/energy_before", "actor/energy_after",
        "actor/plan_time_ms",
    }
    missing = expected - cli_run.tags
    assert not missing, f"missing tags {sorted(missing)}; present: {sorted(cli_run.tags)}"
    # Per-dimension figures are histograms: the scalars stay a page or two.
    assert not [tag for tag in cli_run.tags if "/dim_" in tag] and len(cli_run.tags) < 80, sorted(cli_run.tags)
