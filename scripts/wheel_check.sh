#!/usr/bin/env bash
# The package as a user installs it: build the wheel, install it into a clean venv, and train and evaluate a
# tiny agent from a folder outside the checkout, with a preset by name and one from a file.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip wheel --quiet --no-deps --wheel-dir "$work/dist" "$repo"
rm -rf "$repo/build"
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --upgrade pip
"$work/venv/bin/python" -m pip install --quiet torch==2.13.0
"$work/venv/bin/python" -m pip install --quiet "$work"/dist/ami-*.whl
cd "$work"
printf 'agent:\n  actor: {horizon: 6}\n' > my_agent.yaml
"$work/venv/bin/ami" --version
"$work/venv/bin/ami" train env=pendulum agent=tiny train.total_steps=150 train.seed_steps=100 \
    train.eval_every=150 train.eval_episodes=1 runs_dir=runs --no-progress
"$work/venv/bin/ami" train agent=./my_agent.yaml train.num_envs=1 train.total_steps=120 train.seed_steps=100 \
    train.pretrain_updates=10 train.eval_every=120 train.eval_episodes=1 agent.actor.compile=false runs_dir=runs \
    --no-progress
"$work/venv/bin/ami" eval "$(ls -d runs/pendulum__tiny__*)" --episodes 1
echo "wheel check: ok"
