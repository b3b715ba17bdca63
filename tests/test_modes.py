"""The configurator's mode switch: Mode-1 acts alone while Mode-2 measures its proposals as good as its own plans,
Mode-2 audits it, and takes control back when they are not."""

import torch

from ami.config import load_config
from ami.messages import Plan
from ami.schema import ConfiguratorConfig
from ami.train import Trainer
from modules.configurator import Configurator


def plan(proposal: float, planned: float, mode: str = "mode2", seconds: float = 0.01) -> Plan:
    energies = torch.tensor([planned, planned])
    return Plan(torch.zeros(3, 2, 1), energies, energies, torch.zeros(4, 2, 5), torch.zeros(3, 2, 4, 1),
                torch.zeros(2, 4), torch.tensor([proposal, proposal]), seconds, mode)


def test_mode1_acts_while_its_proposals_are_as_good_and_mode2_takes_back_control_when_not():
    switch = Configurator(ConfiguratorConfig(mode="auto", mode1_gap=0.05, audit_every=4), {}, [], 8, 3)
    assert [switch.mode() for _ in range(3)] == ["mode2"] * 3  # Mode-2 until it has measured Mode-1
    switch.report(plan(10.3, 10.0))  # 3% worse than the plan: within the gap
    assert switch.state.mode1_acting and abs(switch.state.gap - 0.03) < 1e-6
    assert [switch.mode() for _ in range(8)] == ["mode1", "mode1", "mode1", "mode2"] * 2  # audits
    switch.report(plan(10.0, 10.0, seconds=0.0))  # a held plan followed: nothing was measured
    switch.report(plan(50.0, 10.0, mode="mode1"))  # Mode-1's own plan: nothing to compare with
    assert switch.state.mode1_acting and abs(switch.state.gap - 0.03) < 1e-6
    switch.report(plan(13.0, 10.0))  # one audit 30% worse: the running gap (0.0975) stays under twice the margin
    assert switch.state.mode1_acting
    switch.report(plan(15.0, 10.0))  # and another: 0.198 > 0.1, Mode-2 takes back control
    assert not switch.state.mode1_acting and [switch.mode() for _ in range(3)] == ["mode2"] * 3
    for _ in range(8):  # proposals as good as plans again: the gap falls back under 0.05, Mode-1 acts
        switch.report(plan(10.0, 10.0))
    assert switch.state.mode1_acting
    fixed = Configurator(ConfiguratorConfig(mode="mode2"), {}, [], 8, 3)
    fixed.report(plan(10.0, 10.0))
    assert fixed.mode() == "mode2" and fixed.state.gap is None  # the configured mode is the mode


def test_an_auto_run_hands_over_to_mode1_and_audits_it(tmp_path):
    cfg = load_config(["agent=tiny", "progress=false", f"runs_dir={tmp_path}", "train.total_steps=400",
                       "train.seed_steps=100", "train.pretrain_updates=50", "train.eval_every=10000",
                       "agent.configurator.mode=auto", "agent.configurator.mode1_gap=0.5"])
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.train()
    assert 0 < trainer.mode1_steps < 300  # Mode-1 acted on some steps, Mode-2 (planning, audits) on the rest
    memory = trainer.agent.memory
    planned = memory.planned[memory.has_transition]
    assert int(planned[100:].sum()) == 300 - trainer.mode1_steps  # Mode-1's steps are no imitation targets
