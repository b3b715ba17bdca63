"""Configuration errors name what is wrong, in load_config and on the command line (exit status 2)."""

import subprocess
import sys

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ami.cli import main
from ami.config import CONFIG_DIR, ConfigError, load_config, load_saved
from modules.cost import GuardrailError

BAD_OVERRIDES = [
    # (override, what the message must name)
    ("agent.actor.horizonn=3", "agent.actor.horizonn"),
    ("agent.actor.horizon=abc", "agent.actor.horizon"),
    ("agent=nope", "nope"),
    ("env=nope", "nope"),
    ("agent.actor.planner=foo", "agent.actor.planner"),
    ("agent.perception.target=foo", "agent.perception.target"),
    ("agent.actor.horizon=0", "agent.actor.horizon"),
    ("agent.cost.discount=1.5", "agent.cost.discount"),
    ("agent.configurator.weights.nosuch=1", "nosuch"),
    ("agent.actor.screen_samples=-1", "agent.actor.screen_samples"),
    ("agent.cost.goal.metric=cosine", "agent.cost.goal.metric"),
    ("agent.cost.goal.critic_discount=1.0", "agent.cost.goal.critic_discount"),
    ("agent.cost.goal.critic_expectile=0", "agent.cost.goal.critic_expectile"),
    ("reward_free.critic_batch_size=0", "reward_free.critic_batch_size"),
    ("reward_free.critic_updates=-1", "reward_free.critic_updates"),
    ("train.num_envs=0", "train.num_envs"),
    ("env.nonfinite=ignore", "env.nonfinite"),
    ("agent.cost.value_weight=1.5", "agent.cost.value_weight"),
    ("agent.cost.discount=1.0", "agent.cost.value_weight"),  # a value to price plans with needs a discount
    ("agent.actor.random_hold=0.5", "agent.actor.random_hold"),
    ("agent.configurator.mode1_gap=-0.1", "agent.configurator.mode1_gap"),
    ("agent.configurator.audit_every=0", "agent.configurator.audit_every"),
    ("env.action_repeat=0", "env.action_repeat"),
    ("agent.cost.value_ensemble=0", "agent.cost.value_ensemble"),
    ("agent.cost.value_pessimism=-1", "agent.cost.value_pessimism"),
    ("agent.cost.value_optimism=-1", "agent.cost.value_optimism"),
    ("agent.cost.value_optimism=1", "agent.cost.value_ensemble >= 2"),  # one head has no spread to be optimistic on
    ("agent.cost.imagined_horizon=-1", "agent.cost.imagined_horizon"),
    ("agent.cost.imagined_lambda=1.5", "agent.cost.imagined_lambda"),
]


@pytest.mark.parametrize(("override", "named"), BAD_OVERRIDES)
def test_load_config_error_names_the_key(override, named):
    with pytest.raises((OmegaConfBaseException, ConfigError)) as info:
        load_config(["agent=tiny", override] if not override.startswith("agent=") else [override])
    assert named in str(info.value)


def test_unknown_variant_lists_the_choices():
    with pytest.raises(ConfigError) as info:
        load_config(["agent=nope"])
    message = str(info.value)
    assert "agent" in message and "nope" in message and "tiny" in message


def test_bad_choice_is_config_error():
    with pytest.raises(ConfigError, match=r"agent\.actor\.planner"):
        load_config(["agent.actor.planner=foo"])


def test_good_overrides_apply():
    cfg = load_config(["agent=tiny", "agent.actor.horizon=5", "agent.actor.planner=mppi", "seed=3"])
    assert (cfg.agent.actor.horizon, cfg.agent.actor.planner, cfg.seed, cfg.agent.name) == (5, "mppi", 3, "tiny")
    assert cfg.agent.perception.latent_dim == 16  # from configs/agent/tiny.yaml


def test_configurator_weight_naming_a_guardrail_is_rejected():
    # speed_limit is a guardrail in configs/env/pendulum.yaml: its weight cannot be configured.
    with pytest.raises((ConfigError, GuardrailError)) as info:
        load_config(["agent=tiny", "agent.configurator.weights.speed_limit=0"])
    assert "speed_limit" in str(info.value)
    # A non-guardrail term may be reweighted.
    cfg = load_config(["agent=tiny", "agent.configurator.weights.effort=0.5"])
    assert cfg.agent.configurator.weights.effort == 0.5


CLI_CASES = [
    ("agent.actor.horizonn=3", "agent.actor.horizonn"),
    ("agent.actor.horizon=abc", "agent.actor.horizon"),
    ("agent=nope", "nope"),
    ("agent.actor.planner=foo", "agent.actor.planner"),
    ("agent.configurator.weights.speed_limit=0", "speed_limit"),
]


@pytest.mark.parametrize(("override", "named"), CLI_CASES)
def test_cli_config_error_exits_2_and_names_key(override, named, capsys, tmp_path):
    # The run settings keep a (wrongly) accepted config from training for long or writing outside tmp_path.
    args = ["train", f"runs_dir={tmp_path}", "progress=false", "train.total_steps=1"]
    args += [override] if override.startswith("agent=") else ["agent=tiny", override]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert named in err
    assert "configuration error" in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())  # no run directory was started


def test_a_preset_or_saved_config_yaml_cannot_read_is_named_with_its_line(tmp_path):
    broken = tmp_path / "my_env.yaml"
    broken.write_text("env:\n  id: MyEnv-v0\n  kwargs: {speed: 2\n")
    with pytest.raises(ConfigError, match=r"my_env.yaml is not YAML \(.*line \d\)"):
        load_config([f"env={broken}"])
    saved = tmp_path / "config.yaml"  # a run's saved config, as ami eval and --resume read it
    saved.write_text("seed: [0\n")
    with pytest.raises(ConfigError, match=r"config.yaml is not YAML \(.*line \d\)"):
        load_saved(saved)


def test_cli_subprocess_unknown_variant_exits_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ami.cli", "train", "agent=nope"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "nope" in result.stderr
    assert "Traceback" not in result.stderr



def _contained(preset, resolved) -> bool:
    """Whether every value the preset gives is the resolved one (which may add defaults around it)."""
    if isinstance(preset, DictConfig):
        return isinstance(resolved, DictConfig) and all(
            key in resolved and _contained(value, resolved[key]) for key, value in preset.items())
    if isinstance(preset, ListConfig):
        return (isinstance(resolved, ListConfig) and len(preset) == len(resolved)
                and all(_contained(a, b) for a, b in zip(preset, resolved, strict=True)))
    return preset == resolved


@pytest.mark.parametrize("env_name", sorted(p.stem for p in (CONFIG_DIR / "env").glob("*.yaml")))
def test_every_agent_setting_of_an_env_preset_takes_effect(env_name):
    """The agent preset is merged after the env preset and wins a conflict, so an agent key that both set is
    silently dead in the env preset: each env preset must set only keys that survive."""
    preset = OmegaConf.load(CONFIG_DIR / "env" / f"{env_name}.yaml").get("agent", OmegaConf.create({}))
    resolved = load_config([f"env={env_name}"]).agent
    dead = [f"{section}.{key}" for section, values in preset.items() for key, value in values.items()
            if not _contained(value, resolved[section][key])]
    assert not dead, f"{env_name}.yaml sets agent keys that the agent preset overrides: {dead}"
