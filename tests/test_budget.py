"""The configurator's planning budget: each plan's Adam steps set from how the last plan converged, within the
configured range, kept across a resume."""

import dataclasses

import pytest
import torch

from ami.config import ConfigError, load_config
from ami.schema import ActorConfig, ConfiguratorConfig
from ami.train import Callback, Trainer
from modules.configurator import Configurator
from modules.planners import GradientPlanner


def budget(**settings) -> Configurator:
    return Configurator(ConfiguratorConfig(**settings), {}, [], 8, 4)


def test_budget_follows_the_last_step_that_still_helped():
    rule = budget(max_iterations=12, min_iterations=2, converged=0.01)
    # Converged after two steps (the third and fourth move the energy by 0.1% of it): three next time.
    assert rule.budget(torch.tensor([20.0, 12.0, 10.0, 9.99, 9.985])) == 3
    # Still improving at the last step: half as many again, then capped.
    assert rule.budget(torch.tensor([20.0, 16.0, 13.0, 11.0, 10.0])) == 6
    rule.iterations = 10
    assert rule.budget(torch.tensor([20.0] + [19.0 - i for i in range(10)])) == 12
    # Nothing helped: the floor. A diverged plan (inf) says nothing: unchanged.
    assert rule.budget(torch.tensor([10.0, 10.0, 10.0])) == 2
    assert rule.budget(torch.tensor([float("inf"), 10.0, 9.0])) == 10


def test_report_sets_the_budget_only_when_it_is_on_and_the_plan_was_planned():
    trace = torch.tensor([20.0, 12.0, 10.0, 10.0, 10.0])
    planner = GradientPlanner(ActorConfig(candidates=4, iterations=4))
    plan = planner.plan(torch.zeros(2, 3), lambda s, a: ((a ** 2).sum((0, 2)), torch.zeros(a.shape[0] + 1, *s.shape)),
                        5, 4, 1)
    plan = dataclasses.replace(plan, energy_trace=trace)
    fixed = budget()
    fixed.report(plan)
    assert fixed.iterations == 4  # max_iterations 0: the configured budget, always
    rule = budget(max_iterations=8)
    rule.report(dataclasses.replace(plan, plan_time_s=0.0))  # a held plan followed: not planned
    assert rule.iterations == 4
    rule.report(plan)
    assert rule.iterations == 3


def test_gradient_planner_traces_its_best_energy_without_leaving_the_device():
    target = torch.linspace(-0.5, 0.5, 6).view(6, 1, 1)

    def energy(state, actions):
        return ((actions - target) ** 2).sum((0, 2)) + state.sum(1), torch.zeros(7, state.shape[0], 3)

    planner = GradientPlanner(ActorConfig(candidates=8, iterations=5, lr=0.1))
    plan = planner.plan(torch.zeros(3, 3), energy, 6, 5, 1, generator=torch.Generator().manual_seed(0))
    trace = plan.energy_trace
    assert trace.shape == (6,)  # before the first step and after each of five
    assert bool((trace[1:] <= trace[:-1]).all()) and trace[-1] < trace[0]
    assert trace[-1].item() == pytest.approx(plan.energy_after.mean().item())


def test_a_run_adapts_its_budget_and_resumes_with_it(tmp_path):
    overrides = ["agent=tiny", "progress=false", f"runs_dir={tmp_path}", "train.total_steps=240",
                 "train.seed_steps=80", "train.pretrain_updates=20", "train.eval_every=10000",
                 "agent.actor.iterations=3", "agent.configurator.max_iterations=9",
                 "agent.configurator.converged=0.002"]
    budgets: list[int] = []

    class Budgets(Callback):
        def on_step(self, trainer, step):
            if step.action.plan.mode == "mode2" and step.action.plan.plan_time_s > 0:
                budgets.append(step.action.task.iterations)

    trainer = Trainer(load_config(overrides), tmp_path / "run")
    trainer.train(callback=Budgets())
    assert budgets[0] == 3 and len(set(budgets)) > 1 and all(1 <= b <= 9 for b in budgets)
    saved = trainer.agent.configurator.iterations
    resumed = Trainer(load_config(overrides + ["train.total_steps=300"]), tmp_path / "run", resume=True)
    assert resumed.agent.configurator.iterations == saved
    resumed.close()


@pytest.mark.parametrize("override", ["agent.configurator.max_iterations=-1", "agent.configurator.min_iterations=0",
                                      "agent.configurator.max_iterations=3"])
def test_bad_budget_settings_name_the_key(override):
    with pytest.raises(ConfigError, match="iterations"):
        load_config([override, "agent.actor.iterations=5"])
