"""Integration: short real training runs of the tiny agent on Pendulum-v1.

Checkpoints restore everything (identical actions), a resumed run continues exactly where the
uninterrupted one would be, the same seed gives the same run, an interrupted run resumes into a
fresh episode, a short run learns, executed actions stay in bounds, and the intrinsic cost is the
same before and after training and loading (and a checkpoint cannot change a guardrail).
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ami.config import load_config, load_saved
from ami.envs import make_env
from ami.evaluate import EVAL_SEED, evaluate
from ami.train import Trainer
from modules.cost import GuardrailError

# Short tiny runs: 100 random seed steps, 50 pretraining updates, then planning; no evaluation.
TINY = ["agent=tiny", "progress=false", "seed=0", "train.seed_steps=100", "train.pretrain_updates=50",
        "train.eval_every=1000", "train.checkpoint_every=100", "train.log_every=50"]
# Logged values that measure wall-clock time, so they differ between otherwise identical runs.
TIMING_TAGS = {"charts/sps", "actor/plan_time_ms"}


def tiny_config(runs_dir, *overrides):
    return load_config([*TINY, f"runs_dir={runs_dir}", *overrides])


def read_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in a run directory, as TensorBoard shows it: {tag: [(step, value), ...]}."""
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


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


def agent_modules(agent):
    return {"perception": agent.perception, "world_model": agent.world_model, "critic": agent.cost.critic,
            "policy": agent.actor.policy}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One uninterrupted 400-step tiny run (two Pendulum episodes), saved; its scalars are read right
    after training, before other tests open the run directory."""
    runs_dir = tmp_path_factory.mktemp("tiny_run")
    cfg = tiny_config(runs_dir, "train.total_steps=400")
    run_dir = runs_dir / "run"
    trainer = Trainer(cfg, run_dir)
    intrinsic_before = intrinsic_snapshot(trainer.agent)
    result = trainer.train()
    return SimpleNamespace(cfg=cfg, run_dir=run_dir, trainer=trainer, result=result,
                           scalars=read_scalars(run_dir), intrinsic_before=intrinsic_before)


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """The tiny run's configuration stopped at step 200 (an episode end), then resumed to 400."""
    runs_dir = tmp_path_factory.mktemp("resumed_run")
    run_dir = runs_dir / "run"
    first = Trainer(tiny_config(runs_dir, "train.total_steps=200"), run_dir)
    first_result = first.train()
    resumed = Trainer(load_saved(run_dir / "config.yaml", ["train.total_steps=400"]), run_dir, resume=True)
    start = (resumed.step, resumed.episode)
    result = resumed.train()
    return SimpleNamespace(run_dir=run_dir, first_result=first_result, start=start, trainer=resumed,
                           result=result, scalars=read_scalars(run_dir))


# -- 1. checkpoint round trip -------------------------------------------------------------------

def test_checkpoint_round_trip_gives_identical_actions(tiny_run):
    trainer = tiny_run.trainer
    path = trainer.save()
    assert path == tiny_run.run_dir / "checkpoints" / "latest.pt" and path.is_file()
    loaded = Trainer(tiny_run.cfg, tiny_run.run_dir, resume=True)
    loaded.logger.close()
    a, b = trainer.agent, loaded.agent

    assert (loaded.step, loaded.episode) == (trainer.step, trainer.episode) == (400, 2)
    for name, module in agent_modules(a).items():
        state_a, state_b = module.state_dict(), agent_modules(b)[name].state_dict()
        assert list(state_a) == list(state_b), name
        for key in state_a:
            assert_same(state_a[key], state_b[key], f"{name}.{key}")
    assert_same(a.memory.state_dict(), b.memory.state_dict(), "memory")
    assert len(b.memory) == 400
    assert_same(trainer.learner.state_dict(), loaded.learner.state_dict(), "learner")
    assert a.configurator.weights == b.configurator.weights
    assert a.configurator.policy_error == b.configurator.policy_error
    assert a.actor.previous is not None  # the warm start is part of what must round-trip
    assert_same(a.actor.previous, b.actor.previous, "actor.previous")

    # Same observations, same generator seed: the same actions, with and without exploration, for a
    # batch (no warm start) and for one env (warm-started from the saved plan), twice in a row.
    observations = pendulum_observations(8, seed=1)
    for batch in (observations, observations[:1], observations[:1]):
        for explore in (False, True):
            actions_a, *_ = a.act(batch, explore=explore, generator=torch.Generator().manual_seed(5))
            actions_b, *_ = b.act(batch, explore=explore, generator=torch.Generator().manual_seed(5))
            assert actions_a.shape == (len(batch), 1)
            assert np.array_equal(actions_a, actions_b)
            assert_same(a.actor.previous, b.actor.previous, "actor.previous after acting")


# -- 2. resume continues counters and curves ------------------------------------------------------

def test_resume_continues_step_counters_and_curves_exactly(tiny_run, resumed_run):
    assert resumed_run.first_result["step"] == 200
    assert resumed_run.start == (200, 1)  # resumed at the checkpoint, after the first episode
    assert resumed_run.result["step"] == 400 and resumed_run.trainer.step == 400
    assert resumed_run.trainer.episode == 2

    b, a = resumed_run.scalars, tiny_run.scalars
    returns = b["charts/episodic_return"]
    steps = [step for step, _ in returns]
    assert any(step > 200 for step in steps)
    for tag, series in b.items():
        tag_steps = [step for step, _ in series]
        assert len(tag_steps) == len(set(tag_steps)), f"{tag}: duplicated steps {tag_steps}"

    # The resumed run is the uninterrupted one: every RNG, optimiser and buffer was restored.
    for tag in ("charts/episodic_return", "charts/episodic_length", "world_model/loss",
                "world_model/prediction_loss", "cost/critic/value_loss", "actor/energy_after"):
        after_a = [(step, value) for step, value in a[tag] if step > 200]
        after_b = [(step, value) for step, value in b[tag] if step > 200]
        assert after_a, tag
        assert after_b == after_a, tag
    assert_same(tiny_run.trainer.agent.memory.state_dict(), resumed_run.trainer.agent.memory.state_dict(),
                "memory")


def test_resume_keeps_the_events_logged_at_the_checkpoint_step(tiny_run, resumed_run):
    """The checkpoint at step 200 was written after everything logged at step 200 (the episode's
    return, the module losses), so the resumed run must keep those events: its curves equal the
    uninterrupted run's at every step, 200 included."""
    a, b = tiny_run.scalars, resumed_run.scalars
    for tag in ("charts/episodic_return", "world_model/loss", "cost/critic/value_loss"):
        assert 200 in [step for step, _ in a[tag]], tag
        assert b[tag] == a[tag], f"{tag}: resumed {b[tag]} vs uninterrupted {a[tag]}"


# -- 3. determinism ----------------------------------------------------------------------------

def _short_run(runs_dir, name, seed):
    cfg = tiny_config(runs_dir, f"seed={seed}", "train.total_steps=150", "train.pretrain_updates=20")
    trainer = Trainer(cfg, runs_dir / name)
    trainer.train()
    updates = [trainer.learner.update() for _ in range(3)]
    updates = [{k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in u.items()} for u in updates]
    scalars = {tag: series for tag, series in read_scalars(runs_dir / name).items() if tag not in TIMING_TAGS}
    return scalars, updates


def test_same_seed_gives_identical_losses_and_another_seed_different_ones(tmp_path):
    scalars_0, updates_0 = _short_run(tmp_path, "a", seed=0)
    scalars_0b, updates_0b = _short_run(tmp_path, "b", seed=0)
    scalars_1, updates_1 = _short_run(tmp_path, "c", seed=1)

    assert "world_model/loss" in scalars_0 and "actor/energy_after" in scalars_0
    assert scalars_0b == scalars_0
    assert_same(updates_0b, updates_0, "updates")
    assert scalars_1["world_model/loss"] != scalars_0["world_model/loss"]
    assert scalars_1["cost/critic/value_loss"] != scalars_0["cost/critic/value_loss"]
    assert updates_1[0]["world_model/loss"] != updates_0[0]["world_model/loss"]


# -- 4. an interrupted run ----------------------------------------------------------------------

def test_interrupted_run_resumes_into_a_fresh_episode(tmp_path):
    # Stopping at step 150 leaves the first episode (200 steps) unfinished: the final checkpoint is
    # written mid-episode, as on Ctrl-C.
    run_dir = tmp_path / "run"
    first = Trainer(tiny_config(tmp_path, "train.total_steps=150"), run_dir)
    first.train()
    assert first.obs is not None  # mid-episode
    saved_memory = first.agent.memory.state_dict()
    assert not saved_memory["truncated"][149] and not saved_memory["terminated"][149]

    resumed = Trainer(load_saved(run_dir / "config.yaml", ["train.total_steps=350"]), run_dir, resume=True)
    memory = resumed.agent.memory
    assert (resumed.step, resumed.episode, resumed.obs) == (150, 1, None)
    assert len(memory) == 150
    assert memory.truncated[149] and not memory.terminated[149]  # the old episode is closed
    assert (memory.step[149].item(), memory.episode[149].item()) == (149, 0)
    # Nothing else in memory changed.
    assert torch.equal(memory.truncated[:149], saved_memory["truncated"][:149])
    assert torch.equal(memory.obs, saved_memory["obs"]) and torch.equal(memory.action, saved_memory["action"])

    resumed.train()
    # A fresh episode 1 started at step 150 from a reset, not from where episode 0 stopped ...
    assert (memory.step[150].item(), memory.episode[150].item()) == (150, 1)
    assert not torch.equal(memory.obs[150], memory.next_obs[149])
    assert (memory.episode[150:350] == 1).all() and memory.truncated[349] and memory.truncated.sum() == 2
    # ... and ran its full 200 steps: its statistics did not continue the interrupted episode's.
    scalars = read_scalars(run_dir)
    assert scalars["charts/episodic_length"][-1] == (350, 200.0)
    episode_return = float(memory.reward[150:350].sum())
    assert scalars["charts/episodic_return"][-1][0] == 350
    assert scalars["charts/episodic_return"][-1][1] == pytest.approx(episode_return, rel=1e-5)


# -- 5. a short run learns ------------------------------------------------------------------------

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
    # Measured: about 50 s here; seeds 0-3 all reach -100 to -230 against about -1100 for random.
    cfg = load_config([
        "agent=ami", "agent.actor.compile=false", "progress=false", "seed=0", f"runs_dir={tmp_path}",
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
    assert result.mean > random_mean + 500, (result.returns, random_mean)


# -- 6. executed actions ----------------------------------------------------------------------------

def test_executed_actions_are_finite_and_in_bounds(tiny_run):
    memory = tiny_run.trainer.agent.memory
    size = len(memory)
    assert size == 400
    actions = memory.action[:size]
    assert torch.isfinite(actions).all()
    assert (actions.abs() <= 1.0).all()
    assert torch.equal(memory.step[:size], torch.arange(size))
    # Both phases were checked: random seed actions, then planned (and exploration-noised) ones.
    assert not memory.planned[:100].any() and memory.planned[100:size].all()
    assert actions[100:size].std() > 0


# -- 7. the intrinsic cost is immutable -------------------------------------------------------------

def test_intrinsic_cost_unchanged_by_training_and_by_a_checkpoint_round_trip(tiny_run):
    before = tiny_run.intrinsic_before
    assert before["terms"][:, 2].gt(0).any()  # the batch does exceed the speed guardrail
    assert_same(intrinsic_snapshot(tiny_run.trainer.agent), before, "after training")
    loaded = Trainer(tiny_run.cfg, tiny_run.run_dir, resume=True, read_only=True)
    assert_same(intrinsic_snapshot(loaded.agent), before, "after loading")
    saved = torch.load(tiny_run.run_dir / "checkpoints" / "latest.pt", weights_only=False)
    assert [tuple(t) for t in saved["intrinsic_cost"]] == before["describe"]


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
        Trainer(cfg, tiny_run.run_dir, resume=True, read_only=True)
    assert (tiny_run.run_dir / "checkpoints" / "latest.pt").read_bytes() == checkpoint


def test_a_configurator_weight_given_on_resume_takes_effect(tiny_run):
    before = tiny_run.trainer.agent.configurator.weights["effort"]
    cfg = load_saved(tiny_run.run_dir / "config.yaml", ["agent.configurator.weights.effort=0.5"])
    loaded = Trainer(cfg, tiny_run.run_dir, resume=True, read_only=True)
    assert before != 0.5
    assert loaded.agent.configurator.weights["effort"] == 0.5
    # The other weights come back from the checkpoint unchanged.
    others = {k: v for k, v in loaded.agent.configurator.weights.items() if k != "effort"}
    assert others == {k: v for k, v in tiny_run.trainer.agent.configurator.weights.items() if k != "effort"}
