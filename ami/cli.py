"""Command line: `ami train [overrides]`, `ami train --resume RUN_DIR`, `ami eval RUN_DIR`, `ami config`, `ami bench`.

Flags and key=value overrides mix in any order. A user error (configuration, files, an env ami cannot drive)
exits 2 with one line; a run stopped on non-finite data exits 1; Ctrl-C saves a resumable checkpoint and
exits 130.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import OmegaConf

from ami import __version__
from ami.config import ConfigError, available, load_config

if TYPE_CHECKING:
    from ami.train import Trainer

EXIT_USAGE = 2  # the command, its configuration or its files are wrong
EXIT_STOPPED = 1  # a run stopped on data it cannot use (a non-finite observation, reward or loss)
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT
# Commands whose positional key=value arguments are config overrides (flags may come between them).
TAKES_OVERRIDES = ("train", "eval", "config", "planner", "control", "safety")
# The errors a user (or their data) causes, each reported in one line: (module, class, exit status, prefix). A class
# is looked up only once its module is imported, as an error of it cannot exist before: so `ami config`,
# `ami --version` and a configuration error never import torch, and answer in a fraction of a second.
USER_ERRORS = [
    ("omegaconf.errors", "OmegaConfBaseException", EXIT_USAGE, "configuration error: "),
    ("ami.validation", "ConfigError", EXIT_USAGE, "configuration error: "),
    ("modules.cost", "GuardrailError", EXIT_USAGE, "configuration error: "),
    ("ami.envs", "UnsupportedEnvError", EXIT_USAGE, "configuration error: "),
    ("builtins", "FileNotFoundError", EXIT_USAGE, ""),
    ("ami.checkpoint", "CheckpointError", EXIT_USAGE, ""),
    # The run stopped; its last good checkpoint stays.
    ("ami.loop", "NonFiniteError", EXIT_STOPPED, "stopped: "),
    ("ami.learner", "NonFiniteLossError", EXIT_STOPPED, "stopped: "),
]


def one_line(error: Exception) -> str:
    """The error's message in one line. OmegaConf's goes on with lines that repeat its key and name the schema
    class: its first line, led by the key."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    key = getattr(error, "full_key", None)
    if len(lines) > 1 and any(line.strip().startswith("full_key:") for line in lines):
        return f"{key}: {lines[0]}" if key and key not in lines[0] else lines[0]
    return " ".join(line.strip() for line in lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ami", description="Autonomous machine intelligence agents.")
    parser.add_argument("--version", action="version", version=f"ami {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    presets = (f"Overrides: env=PRESET agent=PRESET key=value, where a preset is one of env {available('env')}, "
               f"agent {available('agent')}, or a YAML file (env=./my_env.yaml).")
    train = sub.add_parser("train", help="train an agent", description=presets)
    train.add_argument("overrides", nargs="*", help="env=pendulum agent=ami seed=3 agent.actor.horizon=20")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    config = sub.add_parser("config", help="print the resolved configuration and exit", description=presets)
    config.add_argument("overrides", nargs="*", help="as for train")
    ev = sub.add_parser("eval", help="evaluate a trained run")
    ev.add_argument("run_dir")
    ev.add_argument("overrides", nargs="*", help="on top of the run's saved config, e.g. device=cpu")
    ev.add_argument("--episodes", type=int, default=10)
    ev.add_argument("--video", action="store_true", help="also write an mp4 of one episode into the run")
    ev.add_argument("--seed", type=int, default=None, help="first start seed (default: the fixed eval seed)")
    bench = sub.add_parser("bench", help="measure and compare").add_subparsers(dest="bench", required=True)
    planner = bench.add_parser("planner", help="planning latency and FLOP/s, gradient vs MPPI")
    planner.add_argument("overrides", nargs="*", help="config overrides, as for train")
    planner.add_argument("--grid", action="store_true", help="also batch x horizon x iterations")
    planner.add_argument("--repeats", type=int, default=30, help="timed calls per setting")
    planner.add_argument("--compile", choices=("off", "on", "plan", "both", "all"), default="both",
                         help="eager, torch.compile per iteration, the whole plan as one graph (gradient planner), "
                              "off and on side by side (both), or all three")
    planner.add_argument("--device", default="auto")
    planner.add_argument("--out", default=None, help="output folder (default runs/bench/planner__<stamp>)")
    control = bench.add_parser("control", help="sample efficiency: ami vs SAC, its MPPI planner or another setting")
    control.add_argument("overrides", nargs="*", help="config overrides for ami, as for train")
    control.add_argument("--env", default="pendulum", help="an env preset under configs/env/")
    control.add_argument("--steps", type=int, default=3000)
    control.add_argument("--peer-steps", type=int, default=None,
                         help="the peer's env steps, when longer than ami's (default: --steps)")
    control.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    control.add_argument("--vs", default="sac", metavar="PEER",
                         help="sac, mppi, none, or overrides KEY=VALUE[,KEY=VALUE] for a second ami run "
                              "(train.num_envs=1, agent.configurator.mode=mode2, ...)")
    control.add_argument("--jobs", type=int, default=1, help="runs at once, in separate processes")
    control.add_argument("--procs", type=int, default=None, metavar="N",
                         help="instead of --vs: the same ami trained by torchrun in N processes")
    control.add_argument("--eval-every", type=int, default=500)
    control.add_argument("--episodes", type=int, default=10)
    control.add_argument("--threshold", type=float, default=None, help="return to reach (steps-to table)")
    control.add_argument("--oracle", action="store_true",
                         help="also score the same planner on the true dynamics (Pendulum-v1)")
    control.add_argument("--mppi-budget", type=int, nargs=2, default=[256, 6], metavar=("CANDIDATES", "ITERS"),
                         help="MPPI's samples and iterations for --vs mppi (the rest is ami's config)")
    control.add_argument("--no-progress", action="store_true")
    control.add_argument("--out", default=None, help="output folder (default runs/bench/control__<stamp>)")
    control.add_argument("--resume", action="store_true",
                         help="take on the bench in --out: ami runs go on from their checkpoints (to a longer "
                              "--steps too), a finished SAC run is read back, the rest start again")
    safety = bench.add_parser("safety", help="guarded vs unguarded vs random: return and ground-truth cost")
    safety.add_argument("overrides", nargs="*", help="config overrides for the agents, as for train")
    safety.add_argument("--env", default="hazard_nav", help="an env preset with guardrail terms")
    safety.add_argument("--steps", type=int, default=5000, help="training steps per run")
    safety.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    safety.add_argument("--episodes", type=int, default=100, help="evaluation episodes per run")
    safety.add_argument("--jobs", type=int, default=1, help="runs at once, in separate processes")
    safety.add_argument("--no-progress", action="store_true")
    safety.add_argument("--out", default=None, help="output folder (default runs/bench/safety__<env>__<stamp>)")
    goals = bench.add_parser("goals", help="zero-shot goal reaching on reward-free world models: planners side by side")
    goals.add_argument("--runs", nargs="+", required=True, metavar="RUN_DIR",
                       help="reward-free runs (ami train env=two_rooms), one per seed")
    goals.add_argument("--variants", nargs="+", default=None,
                       help="planner variants (default: gradient mppi; 'all' adds the ablations)")
    goals.add_argument("--episodes", type=int, default=100, help="start/goal pairs per run and variant")
    goals.add_argument("--jobs", type=int, default=1, help="evaluations at once, in separate processes")
    goals.add_argument("--no-progress", action="store_true")
    goals.add_argument("--out", default=None, help="output folder (default runs/bench/goals__<stamp>)")
    return parser


def _bench(args: argparse.Namespace) -> int:
    import time

    import torch

    from ami.bench import control, goals, planner, safety

    if args.bench == "goals":
        for name in ("episodes", "jobs"):
            if getattr(args, name) < 1:
                raise ConfigError(f"--{name}={getattr(args, name)}: expected a positive number")
        variants = args.variants or list(goals.DEFAULT_VARIANTS)
        if variants == ["all"]:
            variants = list(goals.VARIANTS)
        unknown = [v for v in variants if v not in goals.VARIANTS]
        if unknown:
            raise ConfigError(f"--variants {unknown}: expected some of {list(goals.VARIANTS)} or 'all'")
        out = Path(args.out) if args.out else Path("runs") / "bench" / f"goals__{time.strftime('%Y%m%d-%H%M%S')}"
        goals.run(args.runs, variants, args.episodes, out, not args.no_progress, args.jobs)
        return 0

    if args.bench == "safety":
        for name in ("steps", "episodes", "jobs"):
            if getattr(args, name) < 1:
                raise ConfigError(f"--{name}={getattr(args, name)}: expected a positive number")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = Path(args.out) if args.out else Path("runs") / "bench" / f"safety__{args.env}__{stamp}"
        safety.run(args.env, args.steps, args.seeds, args.episodes, args.overrides, out, not args.no_progress,
                   args.jobs)
        return 0
    if args.bench == "control":
        for name in ("steps", "eval_every", "episodes", "peer_steps", "jobs", "procs"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)}: expected a positive number")
        # A run shorter than one evaluation interval is never evaluated: the bench would have nothing to show.
        shortest = min(args.steps, args.peer_steps or args.steps) if args.vs != "none" else args.steps
        if args.eval_every > shortest:
            raise ConfigError(f"--eval-every={args.eval_every}: expected at most the shortest run's steps "
                              f"({shortest}, --steps or --peer-steps), else that run is never evaluated")
        if args.vs not in control.PEERS and args.procs is None:
            load_config([f"env={args.env}", *args.overrides, *args.vs.split(",")])  # a bad override fails here
        if args.resume and not args.out:
            raise ConfigError("--resume: expected --out, the folder of the bench to take on")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = Path(args.out) if args.out else Path("runs") / "bench" / f"control__{args.env}__{stamp}"
        control.run(args.env, args.steps, args.seeds, args.vs, args.eval_every, args.episodes, args.threshold,
                    args.overrides, out, not args.no_progress, args.oracle, tuple(args.mppi_budget),
                    args.peer_steps, args.jobs, args.procs, args.resume)
        return 0
    if args.repeats < 1:
        raise ConfigError(f"--repeats={args.repeats}: expected a positive number")
    cfg = load_config(args.overrides)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = Path(args.out) if args.out else Path(cfg.runs_dir) / "bench" / f"planner__{time.strftime('%Y%m%d-%H%M%S')}"
    modes = {"off": ["off"], "on": ["on"], "plan": ["plan"], "both": ["off", "on"], "all": ["off", "on", "plan"]}[
        args.compile]
    planner.run(cfg, out, args.grid, args.repeats, modes, args.device)
    return 0


def _train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + (["progress=false"] if args.no_progress else [])
    if args.resume:
        from ami.runs import run_config

        run_dir = Path(args.resume)
        cfg = run_config(run_dir, overrides)
    else:
        cfg, run_dir = load_config(overrides), None  # a configuration error stops here, before torch is imported
    from ami.api import AMI

    model = AMI.from_config(cfg, run_dir, resume=bool(args.resume))
    trainer, run_dir = model.trainer, model.trainer.group_dir
    say = print if trainer.group.main else (lambda *_: None)  # a torchrun group speaks through rank 0
    say(describe(trainer))
    say(f"run directory: {run_dir}" + (f" (resuming at {trainer.position()})" if args.resume else ""))
    result = model.train()
    say(f"done: {result['step']} env steps, {result['updates']} updates in {result['train_seconds']:.0f} s; "
        f"checkpoint {run_dir / 'checkpoints' / 'latest.pt'}")
    if not trainer.group.main:
        return 0
    if cfg.reward_free.enabled:
        print(f"plan to goals with: ami bench goals --runs {run_dir}")
    else:
        print(f"evaluate with: ami eval {run_dir}")
    return 0


def describe(trainer: Trainer) -> str:
    """The start-up summary: env, agent, parameters, planner, shield (the whole config is the run's config.yaml)."""
    from ami.build import parameter_counts

    counts = parameter_counts(trainer.agent)
    parts = ", ".join(f"{k} {v:,}" for k, v in counts.items())
    actor = trainer.agent.actor
    planning = f"planner: {actor.config.planner}, {trainer.loop.num_envs} env(s) planned as one batch"
    if actor.energy.compiled:
        planning += "; torch.compile'd (each new batch size compiles on first use: about a minute cold)"
    if actor.config.compile_plan:
        planning += "; the whole plan one compiled graph (a CUDA graph on a GPU; one per batch size and horizon)"
    if trainer.cfg.agent.learner.compile:
        planning += "\nlearner: each update's losses and their backward torch.compile'd (compiled on the first update)"
    shield = trainer.agent.shield
    if shield.active:
        checks = ["ego model " + trainer.cfg.agent.shield.ego.kind] if shield.ego is not None else []
        trusted = f"once its error on fresh transitions is below {shield.trust_error:g}" if shield.trust_error \
            else "once trained"
        if shield.check_world_model and shield.recovery_horizon:
            checks += [f"world model ({trainer.agent.world_model.ensemble_size} member(s), {trusted}): a recovery "
                       f"for {shield.recovery_horizon} steps after each action"]
        elif shield.check_world_model:
            checks += [f"world model ({trusted}): the next state"]
        checks += ["the real observation"]
        fallback = "the recovery plan's first action" if shield.recovery_horizon else shield.fallback_kind
        guard = (f"shield: on, guardrails {sorted(trainer.agent.cost.intrinsic.guardrail_names)}, checked by "
                 f"{' and '.join(checks)}, fallback {fallback}")
        if shield.ego is None:
            before = [f"actions shrink within {shield.caution:g} of a guardrail's bound"] if shield.caution else []
            before += [f"recovery action {list(shield.recovery_action)} near or past it"] if shield.recovery_action \
                else []
            before_text = "; ".join(before) if before else "the guardrails are only read on the real observation"
            if shield.stand_in == "linear":
                ready = f"its error on fresh ones is below {shield.trust_error:g}" if shield.trust_error \
                    else "it is fitted"
                guard += ("\n  no ego model: until the world model is trusted the look-ahead runs on a linear model of "
                          "the observation fitted to the real transitions so far (the seed phase included), once "
                          f"{ready}; before that nothing predicts where an action leads; {before_text}")
            else:
                guard += ("\n  no ego model: until the world model is trusted (the seed phase included) nothing "
                          f"predicts where an action leads; {before_text}")
    else:
        guard = "shield: off" + ("" if trainer.agent.cost.intrinsic.guardrail_names else " (no guardrail terms)")
    cfg = trainer.cfg
    names = trainer.agent.world_model.observation_names
    observed = f"{len(names)} named quantities" if names else "pixels"
    group = trainer.group
    processes = f" in each of {group.world_size} processes (torchrun; rank 0 logs and evaluates)" \
        if group.distributed else ""
    text = (f"env {cfg.env.name} ({cfg.env.id}, {observed}), agent {cfg.agent.name}, seed {cfg.seed}, "
            f"{trainer.loop.num_envs} env(s){processes}; full config: {trainer.run_dir / 'config.yaml'}\n"
            f"parameters: {sum(counts.values()):,} ({parts}); device: {trainer.device}\n{planning}\n{guard}")
    rf = trainer.cfg.reward_free
    if rf.enabled:
        text += (f"\nreward-free: {rf.transitions:,} random-action transitions, {rf.updates} joint updates, then "
                 f"{rf.predictor_updates} of the predictor alone and {rf.critic_updates} of the goal critic (no "
                 "reward stored or used)")
    return text


def _eval(args: argparse.Namespace) -> int:
    from ami.evaluate import EVAL_SEED, evaluate, record_video
    from ami.runs import load_agent

    run_dir = Path(args.run_dir)
    if args.episodes < 1:
        raise ConfigError(f"--episodes={args.episodes}: expected a positive number")
    agent, cfg, step = load_agent(run_dir, args.overrides)
    seed = EVAL_SEED if args.seed is None else args.seed
    result = evaluate(agent, cfg.env, args.episodes, seed)
    print(f"{run_dir}: step {step}, {args.episodes} episodes from seed {seed}: "
          f"return {result.mean:.1f} ± {result.std:.1f} (min {result.returns.min():.1f}, "
          f"max {result.returns.max():.1f})")
    if args.video:
        path = run_dir / "videos" / f"eval_step{step}_seed{seed}.mp4"
        episode_return = record_video(agent, cfg.env, path, seed)
        print(f"video: {path} (return {episode_return:.1f})")
    return 0


def _config(args: argparse.Namespace) -> int:
    print(OmegaConf.to_yaml(load_config(args.overrides)), end="")
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    """argv -> arguments; key=value overrides may follow or precede flags (argparse alone takes only the first
    run of them)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    command = args.bench if args.command == "bench" else args.command
    unknown = [item for item in extra if item.startswith("-") or "=" not in item or command not in TAKES_OVERRIDES]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        commands = {"train": _train, "eval": _eval, "bench": _bench, "config": _config}
        return commands[args.command](args)
    except KeyboardInterrupt:  # a run has saved its checkpoint and printed how to resume
        print("ami: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        for module, name, status, prefix in USER_ERRORS:
            loaded = sys.modules.get(module)
            if loaded is not None and isinstance(error, getattr(loaded, name)):
                print(f"ami: {prefix}{one_line(error)}", file=sys.stderr)
                return status
        raise  # a bug: its traceback


if __name__ == "__main__":
    sys.exit(main())
