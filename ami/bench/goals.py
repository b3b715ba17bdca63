"""`ami bench goals`: zero-shot goal reaching on a reward-free world model, planner against planner.

Each run (one trained world model per seed) is scored with every planner variant on the same start/goal
pairs: the gradient planner as configured, MPPI on the same world model and energy, and ablations of the
gradient planner's parts. Figures: success rate, steps to the goal, agent time per episode.
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ami.bench.parallel import run_jobs
from ami.checkpoint import load_checkpoint
from ami.config import ConfigError
from ami.envs import make_vector_env
from ami.goals import run_goal_episode
from ami.loop import EnvLoop
from ami.runs import load_agent

EVAL_SEED = 1_000_000  # start/goal pairs come from env seeds EVAL_SEED + i: never the training data's
# Planner variants: overrides on the run's own configuration. "gradient" is the configuration as trained;
# the ablations take one part of it away each.
VARIANTS: dict[str, list[str]] = {
    "gradient": [],
    "mppi": ["agent.actor.planner=mppi", "agent.actor.candidates=256", "agent.actor.iterations=6",
             "agent.actor.mppi_elite=32"],
    "one_candidate": ["agent.actor.candidates=1"],  # plain gradient descent on one sequence
    "no_fresh": ["agent.actor.fresh_fraction=0.0"],  # every candidate starts near the warm start
    "straight_fresh": ["agent.actor.fresh_segments=1"],  # fresh candidates are one straight move
    "no_final_weight": ["agent.cost.goal.final_weight=0.0"],  # the plan's last state weighs like the others
    "final_weight_10": ["agent.cost.goal.final_weight=10.0"],  # the last state weighs as 10 others
    "final_only": ["agent.cost.goal.weight=0.0"],  # only the plan's last state is priced
    "horizon_20": ["agent.actor.horizon=20"],
    "horizon_40": ["agent.actor.horizon=40"],  # the previous preset: too short for the longest detours
    "no_screen": ["agent.actor.screen_samples=0"],  # fresh candidates drawn, not picked from many
    "no_boredom": ["agent.cost.boredom_weight=0.0"],  # the places the agent lingered in cost nothing more
    "no_stall": ["agent.configurator.stall_patience=0"],  # the boredom weight stays put while progress stalls
    # With the goal critic (runs trained with reward_free.critic_updates > 0): its steps to go from the
    # plan's last state added to the energy, or its steps as the distance everywhere.
    "critic_final": ["agent.cost.goal.critic_final_weight=30.0"],
    "critic_metric": ["agent.cost.goal.metric=critic"],
}
CRITIC_VARIANTS = ("critic_final", "critic_metric")
DEFAULT_VARIANTS = ("gradient", "mppi")


@dataclass(frozen=True)
class Row:
    run: str
    seed: int
    variant: str
    episodes: int
    success_rate: float
    steps_mean: float  # over successful episodes
    agent_s_per_episode: float  # wall time inside agent.act, mean over episodes
    agent_s_per_episode_p90: float
    plan_ms_per_call: float
    final_distance_mean: float


def evaluate_variant(run_dir: str, variant: str, episodes: int, progress: bool) -> Row:
    agent, cfg, _ = load_agent(run_dir, VARIANTS[variant])
    generator = torch.Generator().manual_seed(cfg.seed)
    loop = EnvLoop(make_vector_env(cfg.env, 1), cfg.env.nonfinite)
    # One untimed planning call first: a torch.compile'd energy compiles on its first call.
    agent.act(loop.reset(seed=EVAL_SEED), generator=generator)
    results = [run_goal_episode(agent, loop, EVAL_SEED + i, generator=generator)
               for i in tqdm(range(episodes), desc=f"s{cfg.seed} {variant}", disable=not progress, leave=False)]
    loop.envs.close()
    success = np.array([r.success for r in results])
    times = np.array([r.agent_time_s for r in results])
    calls = sum(r.plan_calls for r in results)
    steps = [r.steps for r in results if r.success]
    return Row(str(run_dir), int(cfg.seed), variant, episodes, float(success.mean()),
               float(np.mean(steps)) if steps else float("nan"), float(times.mean()),
               float(np.percentile(times, 90)), 1000 * float(times.sum()) / max(calls, 1),
               float(np.mean([r.final_distance for r in results])))


def table(rows: list[Row], variants: list[str]) -> str:
    lines = ["| planner | success (per seed) | success, mean ± sd | steps | agent s / episode (p90) | ms / plan |",
             "|---|---|---|---|---|---|"]
    for variant in variants:
        group = [r for r in rows if r.variant == variant]
        if not group:
            continue
        rates = [100 * r.success_rate for r in group]
        spread = statistics.stdev(rates) if len(rates) > 1 else 0.0
        lines.append(
            f"| {variant} | {', '.join(f'{x:.0f}%' for x in rates)} | {statistics.mean(rates):.1f} ± {spread:.1f}% "
            f"| {np.nanmean([r.steps_mean for r in group]):.1f} "
            f"| {np.mean([r.agent_s_per_episode for r in group]):.2f} "
            f"({np.mean([r.agent_s_per_episode_p90 for r in group]):.2f}) "
            f"| {np.mean([r.plan_ms_per_call for r in group]):.0f} |")
    return "\n".join(lines)


def _has_trained_critic(run_dir: str) -> bool:
    critic = load_checkpoint(Path(run_dir))[0]["modules"].get("goal_critic")
    return critic is not None and bool(critic["trained"])


def run(runs: list[str], variants: list[str], episodes: int, out_dir: Path, progress: bool, jobs: int) -> list[Row]:
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"--variants {unknown}: expected some of {list(VARIANTS)}")
    if any(v in CRITIC_VARIANTS for v in variants):
        untrained = [r for r in runs if not _has_trained_critic(r)]
        if untrained:
            raise ConfigError(f"--variants {[v for v in variants if v in CRITIC_VARIANTS]} need a trained goal "
                             f"critic, and runs {untrained} have none: resume them with reward_free.critic_updates")
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = [(run_dir, variant) for run_dir in runs for variant in variants]
    # Inner progress bars only when the jobs run here, one at a time.
    rows = run_jobs(evaluate_variant, [(r, v, episodes, progress and jobs <= 1) for r, v in tasks], jobs,
                    "goal benchmark", progress)
    with (out_dir / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    text = table(rows, variants)
    (out_dir / "table.md").write_text(text + "\n")
    print(f"{episodes} start/goal pairs per run (env seeds {EVAL_SEED}..{EVAL_SEED + episodes - 1}); "
          f"runs: {', '.join(runs)}\n{text}\nresults: {out_dir / 'results.csv'}")
    return rows
