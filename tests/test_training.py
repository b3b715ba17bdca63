"""Integration: short real training runs of the tiny agent on Pendulum-v1, the same suite for every shipped agent
variant (as Stable-Baselines3 runs one suite for every algorithm): the same seed gives the same run, a checkpoint
restores the same actions, and a run stopped and resumed is the uninterrupted one, at two environments at once.
Then: an interrupted episode resumes as truncated, a short run learns, and no run or checkpoint changes the
intrinsic cost or a guardrail."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ami.config import load_config, load_saved
from ami.envs import make_env
from ami.evaluate import EVAL_SEED, evaluate
from ami.runs import load_agent
from ami.train import Trainer
from modules.cost import GuardrailError

# Short tiny runs: 100 random seed steps, 50 pretraining updates, then planning.
TINY = ["agent=tiny", "progress=false", "seed=0", "train.seed_steps=100", "train.pretrain_updates=50",
        "train.eval_every=100000", "train.checkpoint_every=100", "train.log_every=50"]
# Logged values that measure wall-clock time, so they differ between otherwise identical runs.
TIMING_TAGS = {"charts/sps", "actor/plan_time_ms", "charts/updates_per_s"}
# Every shipped agent variant: the gradient planner, MPPI, Mode-1 acting between Mode-2 audits, compiled planning.
VARIANTS = {
    "gradient": [],
    "mppi": ["agent.actor.planner=mppi", "agent.actor.candidates=32", "agent.actor.iterations=2"],
    "mode1": ["agent.configurator.mode=auto", "agent.configurator.mode1_gap=100.0", "agent.configurator.audit_every=5"],
    "compiled": ["agent.actor.compile=true"],
}
# Two environments, two 50-step episodes each, planning from env step 40: the checkpoint at env step 100 falls
# where every episode ends, with the agent planning.
PAIR = ["train.num_envs=2", "env.max_episode_steps=50", "train.seed_steps=40", "train.checkpoint_every=100",
        "train.log_every=50", "train.eval_every=200", "train.eval_episodes=2"]


def tiny_config(runs_dir, *overrides):
    return load_config([*TINY, f"runs_dir={runs_dir}", *overrides])


def read_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in a run directory, as TensorBoard shows it: {tag: [(step, value), ...]}."""
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"] if tag not in TIMING_TAGS}


def assert_same(a, b, where="state"):
    """Recursive exact equality of nested dicts/lists/tensors/arrays; NaN equals NaN."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        if a.is_floating_point():
            assert bool(((a == b) | (a.isnan() & b.isnan())).all()), where
        else:
            assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and np.isnan(a):
        assert isinstance(b, float) and np.isnan(b), where
    else:
        assert a == b, where


def pendulum_observations(n, seed):
    """n Pendulum observations [cos theta, sin theta, theta_dot] spread over the state space."""
    rng = np.random.default_rng(seed)
    theta, theta_dot = rng.uniform(-np.pi, np.pi, n), rng.uniform(-8.0, 8.0, n)
    return np.stack([np.cos(theta), np.sin(theta), theta_dot], axis=1).astype(np.float32)


def agent_modules(agent):
    return {"perception": agent.perception, "world_model": agent.world_model, "critic": agent.cost.critic,
            "policy": agent.actor.policy}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant_runs(request, tmp_path_factory):
    """One variant, twice with seed 0: an uninterrupted 200-step run, and the same run stopped at env step 100
    (every episode just ended) and resumed to 200 in a new Trainer."""
    runs_dir = tmp_path_factory.mktemp(request.param)
    overrides = [*PAIR, *VARIANTS[request.param]]
    whole = Trainer(tiny_config(runs_dir, *overrides, "train.total_steps=200"), runs_dir / "whole")
    whole.train()
    first = Trainer(tiny_config(runs_dir, *overrides, "train.total_steps=100"), runs_dir / "split")
    first.train()
    first_scalars = read_scalars(runs_dir / "split")
    resumed = Trainer(load_saved(runs_dir / "split" / "config.yaml", ["train.total_steps=200"]), runs_dir / "split",
                      resume=True)
    start = (resumed.loop.env_steps, resumed.loop.episodes)
    resumed.train()
    return SimpleNamespace(name=request.param, whole=whole, first=first, first_scalars=first_scalars,
                           resumed=resumed, start=start, whole_scalars=read_scalars(runs_dir / "whole"),
                           split_scalars=read_scalars(runs_dir / "split"), runs_dir=runs_dir)


# -- 1. every variant: determinism, checkpoints, exact resume -------------------------------------------

def test_the_same_seed_gives_the_same_run(variant_runs):
    whole, first = variant_runs.whole_scalars, variant_runs.first_scalars
    assert "world_model/loss" in whole and "actor/energy_after" in whole
    for tag, series in first.items():
        assert series == [(step, value) for step, value in whole[tag] if step <= 100], tag
    if variant_runs.name == "mode1":  # the variant does what it says: Mode-1 acts, Mode-2 audits
        modes = [value for _, value in whole["actor/mode"]]
        assert variant_runs.whole.mode1_steps > 0 and max(modes) > 1.0 and min(modes) < 2.0


def test_a_run_stopped_and_resumed_is_the_uninterrupted_run(variant_runs):
    resumed, whole = variant_runs.resumed, variant_runs.whole
    assert variant_runs.start == (100, 4)  # resumed where every episode had just ended
    assert (resumed.loop.env_steps, resumed.loop.episodes) == (whole.loop.env_steps, whole.loop.episodes)
    a, b = variant_runs.whole_scalars, variant_runs.split_scalars
    assert set(a) == set(b)
    for tag in a:
        steps = [step for step, _ in b[tag]]
        assert len(steps) == len(set(steps)), f"{tag}: duplicated steps {steps}"
        assert b[tag] == a[tag], f"{tag}: resumed {b[tag][-3:]} vs uninterrupted {a[tag][-3:]}"
    assert any(step > 100 for step, _ in a["charts/episodic_return"])
    assert "eval/return_mean" in a  # the evaluation at the end, as well
    assert_same(whole.agent.memory.state_dict(), resumed.agent.memory.state_dict(), "memory")
    assert_same(whole.learner.state_dict(), resumed.learner.state_dict(), "learner")
    for name, module in agent_modules(whole.agent).items():
        assert_same(module.state_dict(), agent_modules(resumed.agent)[name].state_dict(), name)


def test_a_checkpoint_gives_the_same_actions(variant_runs):
    trained = variant_runs.whole.agent
    loaded, _, step = load_agent(variant_runs.runs_dir / "whole")
    assert step == 200
    for name, module in agent_modules(trained).items():
        assert_same(module.state_dict(), agent_modules(loaded)[name].state_dict(), name)
    assert trained.configurator.state.mode1_acting == loaded.configurator.state.mode1_acting
    observations = pendulum_observations(2, seed=1)
    for agent_a, agent_b in [(trained, loaded)]:
        with agent_a.fresh_episodes(), agent_b.fresh_episodes():
            for explore in (False, True, False):  # the second plan of each is warm-started from the first
                a = agent_a.act(observations, explore=explore, generator=torch.Generator().manual_seed(5))
                b = agent_b.act(observations, explore=explore, generator=torch.Generator().manual_seed(5))
                assert a.actions.shape == (2, 1) and a.plan.mode == b.plan.mode
                assert np.array_equal(a.actions, b.actions)


def test_another_seed_gives_another_run(tmp_path):
    cfg = tiny_config(tmp_path, "seed=1", "train.total_steps=200", "train.pretrain_updates=20")
    Trainer(cfg, tmp_path / "seed1").train()
    cfg = tiny_config(tmp_path, "seed=0", "train.total_steps=200", "train.pretrain_updates=20")
    Trainer(cfg, tmp_path / "seed0").train()
    one, zero = read_scalars(tmp_path / "seed1"), read_scalars(tmp_path / "seed0")
    assert one["world_model/loss"] != zero["world_model/loss"]
    assert one["cost/critic/value_loss"] != zero["cost/critic/value_loss"]


# -- 2. an interrupted episode -----------------------------------------------------------------------------

def test_an_interrupted_run_closes_its_episode_as_truncated_and_resumes_into_a_fresh_one(tmp_path):
    # Stopping at step 150 leaves the first episode (200 steps) unfinished: the final checkpoint is written
    # mid-episode, as on Ctrl-C.
    run_dir = tmp_path / "run"
    first = Trainer(tiny_config(tmp_path, "train.total_steps=150"), run_dir)
    first.train()
    saved = first.agent.memory.state_dict()
    assert bool(first.agent.memory.open[0]) and not saved["truncated"][149, 0]
    resumed = Trainer(load_saved(run_dir / "config.yaml", ["train.total_steps=350"]), run_dir, resume=True)
    memory = resumed.agent.memory
    assert (resumed.loop.env_steps, resumed.loop.episodes) == (150, 2)
    assert len(memory) == 150 and not memory.open.any()
    assert memory.truncated[149, 0] and not memory.terminated[149, 0]  # the old episode is closed ...
    assert not memory.has_transition[150, 0] and memory.episode[150, 0] == 0  # ... at the observation it reached
    torch.testing.assert_close(memory.obs[150, 0], torch.as_tensor(first.loop.obs[0]))
    assert torch.equal(memory.obs[:150], saved["obs"][:150]) and torch.equal(memory.action[:150], saved["action"][:150])
    resumed.train()
    # A fresh episode 1 started at row 151 from a reset, not from where episode 0 stopped, and ran 200 steps.
    assert memory.episode[151, 0] == 1 and memory.step[151, 0] == 150
    assert not torch.equal(memory.obs[151, 0], memory.obs[150, 0])
    assert (memory.episode[151:351, 0] == 1).all() and memory.truncated[350, 0]
    scalars = read_scalars(run_dir)
    assert scalars["charts/episodic_length"][-1] == (350, 200.0)
    episode_return = float(memory.reward[151:351, 0].sum())
    assert scalars["charts/episodic_return"][-1][1] == pytest.approx(episode_return, rel=1e-5)


# -- 3. a short run learns ------------------------------------------------------------------------------

def random_returns(env_config, episodes, seed=0):
    """Returns of uniformly random actions from the evaluation's start states."""
    env = make_env(env_config)
    rng = np.random.default_rng(seed)
    returns = []
    for i in range(episodes):
        env.reset(seed=EVAL_SEED + i)
        total, done = 0.0, False
        while not done:
            _, reward, terminated, truncated, _ = env.step(rng.uniform(-1.0, 1.0, (1,)).astype(np.float32))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return np.array(returns)


def test_short_run_beats_random_actions_on_pendulum(tmp_path):
    cfg = load_config([
        "agent=ami", "agent.actor.compile=false",
        "agent.learner.compile=false", "progress=false", "seed=0", f"runs_dir={tmp_path}",
        "train.total_steps=800", "train.seed_steps=200", "train.pretrain_updates=200",
        "train.eval_every=100000", "train.checkpoint_every=100000", "train.log_every=100",
        "agent.perception.latent_dim=32", "agent.perception.hidden_dim=64", "agent.world_model.hidden_dim=64",
        "agent.world_model.batch_size=128", "agent.cost.critic_hidden_dim=64",
        "agent.actor.policy_hidden_dim=64", "agent.actor.horizon=16", "agent.actor.candidates=8"])
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.train()
    result = evaluate(trainer.agent, cfg.env, episodes=5)
    random_mean = float(random_returns(cfg.env, 5).mean())
    assert -1500 < random_mean < -900
    assert result.mean > random_mean + 400, (result.returns, random_mean)
    memory = trainer.agent.memory  # four environments: the default
    stored = memory.has_transition
    steps, planned = memory.step[stored], memory.planned[stored]
    assert memory.num_envs == 4 and torch.equal(steps.sort().values, torch.arange(800))
    # Mode-2 planned every step after the seed phase, and Mode-1 imitates what it planned, not what was sent.
    assert not planned[steps < 200].any() and planned[steps >= 200].all()
    plan_action, sent = memory.plan_action[stored][steps >= 200], memory.action[stored][steps >= 200]
    assert not torch.equal(plan_action, sent)  # exploration noise and the shield lie between them


# -- 4. the intrinsic cost is immutable ---------------------------------------------------------------------

def fixed_cost_batch():
    """A fixed batch of quantities (64, 3) and actions (64, 1), some beyond the speed guardrail."""
    generator = torch.Generator().manual_seed(7)
    theta = (torch.rand(64, generator=generator) * 2 - 1) * torch.pi
    theta_dot = (torch.rand(64, generator=generator) * 2 - 1) * 10.0
    quantities = torch.stack([theta.cos(), theta.sin(), theta_dot], dim=-1)
    actions = torch.rand(64, 1, generator=generator) * 2 - 1
    return quantities, actions


def intrinsic_snapshot(agent):
    intrinsic = agent.cost.intrinsic
    quantities, actions = fixed_cost_batch()
    return {"describe": intrinsic.describe(), "terms": intrinsic.analytic_terms(quantities, actions),
            "weights": intrinsic.weight_vector(), "guardrails": intrinsic.guardrail_names,
            "violation": intrinsic.guardrail_violation(quantities, actions)}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    runs_dir = tmp_path_factory.mktemp("tiny_run")
    cfg = tiny_config(runs_dir, "train.total_steps=300")
    trainer = Trainer(cfg, runs_dir / "run")
    before = intrinsic_snapshot(trainer.agent)
    trainer.train()
    return SimpleNamespace(cfg=cfg, run_dir=runs_dir / "run", trainer=trainer, intrinsic_before=before)


def test_intrinsic_cost_unchanged_by_training_and_by_a_checkpoint_round_trip(tiny_run):
    before = tiny_run.intrinsic_before
    assert before["terms"][:, 2].gt(0).any()  # the batch does exceed the speed guardrail
    assert_same(intrinsic_snapshot(tiny_run.trainer.agent), before, "after training")
    loaded, _, _ = load_agent(tiny_run.run_dir)
    assert_same(intrinsic_snapshot(loaded), before, "after loading")
    saved = torch.load(tiny_run.run_dir / "checkpoints" / "latest.pt", weights_only=True)
    assert [tuple(t) for t in saved["intrinsic_cost"]] == before["describe"]
    assert [tuple(t) for t in saved["guardrails"]] == [t for t in before["describe"] if t[3]]


def _config_with_changed_guardrail(run_dir, tmp_path, field, value):
    """The run's saved config.yaml with one field of the speed_limit guardrail changed."""
    config = OmegaConf.load(run_dir / "config.yaml")
    (term,) = [t for t in config.agent.cost.terms if t.name == "speed_limit"]
    assert term.guardrail
    OmegaConf.update(term, field, value)
    path = tmp_path / "changed.yaml"
    OmegaConf.save(config, path)
    return load_saved(path)


@pytest.mark.parametrize(("field", "value"), [("params.limit", 8.0), ("weight", 5.0)])
def test_loading_a_checkpoint_with_a_different_guardrail_raises(tiny_run, tmp_path, field, value):
    cfg = _config_with_changed_guardrail(tiny_run.run_dir, tmp_path, field, value)
    checkpoint = (tiny_run.run_dir / "checkpoints" / "latest.pt").read_bytes()
    with pytest.raises(GuardrailError, match="speed_limit"):
        Trainer(cfg, tiny_run.run_dir, resume=True)
    assert (tiny_run.run_dir / "checkpoints" / "latest.pt").read_bytes() == checkpoint


def test_a_configurator_weight_given_on_resume_takes_effect(tiny_run):
    before = tiny_run.trainer.agent.configurator.weights["effort"]
    loaded, _, _ = load_agent(tiny_run.run_dir, ["agent.configurator.weights.effort=0.5"])
    assert before != 0.5
    assert loaded.configurator.weights["effort"] == 0.5
    index = loaded.cost.intrinsic.term_names.index("effort")
    assert loaded.configurator.weight_vector[index] == 0.5  # what plans are priced with
    others = {k: v for k, v in loaded.configurator.weights.items() if k != "effort"}
    assert others == {k: v for k, v in tiny_run.trainer.agent.configurator.weights.items() if k != "effort"}
