"""Shared fixtures: the tiny agent on Pendulum and a batch of real random-action transitions."""

import pytest
import torch
from omegaconf import OmegaConf

from ami.build import build_agent
from ami.config import load_config
from ami.envs import make_vector_env
from ami.loop import EnvLoop

# Small models: one thread avoids oversubscription when the 2-core CPU is shared.
torch.set_num_threads(1)

PENDULUM_NAMES = ["cos_theta", "sin_theta", "theta_dot"]
# The files that take longest, longest first (about 330, 155, 130, 55, 50 and 45 s on this 2-core machine):
# pytest-xdist hands files to its two workers in collection order (--no-loadscope-reorder), and a long file
# handed out last keeps one worker busy while the other idles.
LONGEST_FIRST = ("test_reward_free.py", "test_bench.py", "test_training.py", "test_docs.py", "test_distributed.py",
                 "test_cli.py")


def pytest_collection_modifyitems(items: list) -> None:
    order = {name: rank for rank, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))  # stable: each file keeps its own order


@pytest.fixture
def captured_graphs(monkeypatch):
    """torch.compile with the aot_eager backend: Dynamo captures each function whole and AOTAutograd its backward,
    as Inductor would get them, and the captured graphs run as they are. A test of what ami's code compiles to
    (one graph, the eager result) then takes seconds; Inductor's code generation, about a minute per graph cold on
    this 2-core CPU, runs in the compiled training test (test_training's "compiled" variant) and the benchmarks."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda function, **options: compile_(
        function, **{**options, "backend": "aot_eager", "mode": None}))


@pytest.fixture
def make_agent():
    """make_agent(*overrides, num_envs=1) -> (agent, agent_config) for the tiny Pendulum agent on the CPU."""

    def make(*overrides, seed=0, num_envs=1):
        cfg = load_config(["agent=tiny", *overrides])
        agent_cfg = OmegaConf.to_object(cfg.agent)
        torch.manual_seed(seed)
        return build_agent(agent_cfg, 3, 1, PENDULUM_NAMES, torch.device("cpu"), num_envs), agent_cfg

    return make


@pytest.fixture
def fill_memory():
    """fill_memory(agent, steps, seed): `steps` real Pendulum-v1 transitions per environment of the agent's
    memory, of random proposals through the agent's own act path, written by agent.observe (which also feeds
    the normaliser)."""

    def fill(agent, steps, seed=0):
        loop = EnvLoop(make_vector_env(load_config().env, agent.memory.num_envs))
        loop.reset(seed=seed)
        generator = torch.Generator().manual_seed(seed)
        while loop.env_steps < steps * loop.num_envs:
            step = loop.step(lambda obs: agent.act(obs, random=True, generator=generator))
            if step.action.plan is not None:
                agent.observe(step)
            agent.reset(step.started)
        loop.envs.close()

    return fill
