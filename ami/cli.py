"""Command line: `ami train [overrides]`, `ami train --resume RUN_DIR`, `ami eval RUN_DIR`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ami.config import ConfigError, available, load_config, load_saved
from modules.cost import GuardrailError

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ami", description="Autonomous machine intelligence agents.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train an agent",
                           description=f"Overrides: env=NAME agent=NAME key=value. env: {available('env')}; "
                                       f"agent: {available('agent')}.")
    train.add_argument("overrides", nargs="*", help="env=pendulum agent=ami seed=3 agent.actor.horizon=20")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev = sub.add_parser("eval", help="evaluate a trained run")
    ev.add_argument("run_dir")
    ev.add_argument("--episodes", type=int, default=10)
    ev.add_argument("--video", action="store_true", help="also write an mp4 of one episode into the run")
    ev.add_argument("--seed", type=int, default=None, help="first start seed (default: the fixed eval seed)")
    return parser


def _train(args: argparse.Namespace) -> int:
    from ami.train import Trainer, describe, new_run_dir

    overrides = list(args.overrides) + (["progress=false"] if args.no_progress else [])
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume {run_dir}: no config.yaml there; expected an ami run directory")
        cfg = load_saved(run_dir / "config.yaml", overrides)
    else:
        cfg = load_config(overrides)
        run_dir = new_run_dir(cfg)
    print(OmegaConf.to_yaml(cfg), end="")
    trainer = Trainer(cfg, run_dir, resume=bool(args.resume))
    print(describe(trainer))
    print(f"run directory: {run_dir}" + (f" (resuming at step {trainer.step})" if args.resume else ""))
    trainer.train()
    print(f"done: {trainer.step} steps; checkpoint {run_dir / 'checkpoints' / 'latest.pt'}")
    print(f"evaluate with: ami eval {run_dir}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ami.evaluate import EVAL_SEED, evaluate, record_video
    from ami.train import Trainer

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: no config.yaml there; expected an ami run directory")
    if args.episodes < 1:
        raise ConfigError(f"--episodes={args.episodes}: expected a positive number")
    cfg = load_saved(run_dir / "config.yaml", ["progress=false"])
    trainer = Trainer(cfg, run_dir, resume=True, read_only=True)
    seed = EVAL_SEED if args.seed is None else args.seed
    result = evaluate(trainer.agent, cfg.env, args.episodes, seed)
    print(f"{run_dir}: step {trainer.step}, {args.episodes} episodes from seed {seed}: "
          f"return {result.mean:.1f} ± {result.std:.1f} (min {result.returns.min():.1f}, "
          f"max {result.returns.max():.1f})")
    if args.video:
        path = run_dir / "videos" / f"eval_step{trainer.step}_seed{seed}.mp4"
        episode_return = record_video(trainer.agent, cfg.env, path, seed)
        print(f"video: {path} (return {episode_return:.1f})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return _train(args) if args.command == "train" else _eval(args)
    except (OmegaConfBaseException, ConfigError, GuardrailError) as error:
        print(f"ami: configuration error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except FileNotFoundError as error:
        print(f"ami: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
