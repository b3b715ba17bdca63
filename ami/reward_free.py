"""The reward-free run: its schedule (run by the Trainer), what it asks of its env, the frozen encoder's latents of
the dataset, and its figures (latent health and a planned trajectory).

`ami train` runs a reward-free schedule when `reward_free.enabled` (the TwoRooms preset sets it): random-action
collection into short-term memory, with no reward stored, then encoder and predictor, the predictor alone, and
the goal critic, all on that data. Offline phases log against the update count: no env steps happen there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import gymnasium as gym
import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from ami.agent import Agent, storable_observation
from ami.config import ConfigError
from ami.envs import UnsupportedEnvError, make_vector_env, observation_kind
from ami.latent_health import encode, health_report, nearest_frames, side_by_side
from ami.logger import Logger
from ami.loop import EnvLoop

if TYPE_CHECKING:
    from ami.train import Trainer

PROBE_SEED = 2_000_000  # the probe's own episodes: never the dataset's, never the goal benchmark's
PICTURE_SEED = 12345


def check_env(cfg: DictConfig, space: gym.Space, agent: Agent) -> None:
    """A reward-free run learns from images; its memory must hold the whole dataset."""
    kind = observation_kind(space)
    if kind == "vector":
        raise UnsupportedEnvError(f"env.id={cfg.env.id!r}: reward-free training is for image observations; set "
                                  "env.pixels=true to observe the rendered frames")
    if kind == "dict" and "vector" in space.spaces:
        raise UnsupportedEnvError(f"env.id={cfg.env.id!r}: reward-free training encodes images only; its "
                                  "observation's 'vector' would be ignored")
    rf = cfg.reward_free
    if agent.memory.capacity < rf.transitions:
        raise ConfigError(f"reward_free.transitions={rf.transitions} exceeds agent.memory.capacity="
                          f"{agent.memory.capacity}; expected a memory that holds the whole dataset")
    if rf.critic_updates and agent.cost.goal_critic is None:
        raise ConfigError(f"reward_free.critic_updates={rf.critic_updates}: the goal critic needs observations "
                          f"with a goal, and env.id={cfg.env.id!r} has none; set reward_free.critic_updates=0")


def collect_dataset(trainer: Trainer, bar: tqdm | None = None) -> None:
    """The run's data: reward_free.transitions random-action transitions (no reward stored), every stretch ended
    with its last observation; checkpointed once complete."""
    rf, memory, loop = trainer.cfg.reward_free, trainer.agent.memory, trainer.loop
    while len(memory) < rf.transitions:
        trainer.check_stop()
        before = loop.env_steps
        if memory.rows_left < 3:  # a transition, an episode's final frame, the last stretch's end
            raise ConfigError(f"agent.memory.capacity={trainer.cfg.agent.memory.capacity} is full after "
                              f"{len(memory)} of reward_free.transitions={rf.transitions} and their episodes' final "
                              "frames; raise agent.memory.capacity")
        trainer.env_step(random=True, limit=rf.transitions - len(memory))
        if bar is not None:
            bar.update(loop.env_steps - before)
        if len(memory) >= rf.transitions:
            memory.end_segments(torch.ones(loop.num_envs, dtype=torch.bool), *storable_observation(loop.obs))
            trainer.save()


def train_offline(trainer: Trainer, bar: tqdm) -> None:
    """The run's schedule: collect the data, then train on it, encoder and predictor together, the predictor alone
    on the frozen encoder's latents, then the goal critic; logged, pictured and checkpointed by update count."""
    rf, learner, logger = trainer.cfg.reward_free, trainer.learner, trainer.logger
    collect_dataset(trainer, bar)
    figures = Figures(trainer.cfg, trainer.agent, logger)
    bar.unit = "update"
    total = rf.updates + rf.predictor_updates + rf.critic_updates
    stats: dict = {}
    latents = goal_data = None
    while learner.updates < total:
        trainer.check_stop()
        if learner.updates < rf.updates:
            stats = learner.update()
        else:
            if latents is None:
                latents = encode_memory(trainer.agent, trainer.cfg.progress)
                goal_data = learner.goal_critic_data()
            stats = learner.update_predictor(latents) if learner.updates < rf.updates + rf.predictor_updates \
                else learner.update_goal_critic(latents, goal_data)
        bar.update(1)
        updates = learner.updates
        if updates % rf.log_every == 0 or updates == total:
            logger.scalars(stats, updates)
            logger.scalar("charts/updates_per_s", trainer.current_rate(), updates)
            health = figures.log_health(updates)
            loss = next((f"{v:.3f}" for k, v in stats.items() if k.endswith("_loss") and v is not None), "")
            bar.set_postfix(loss=loss, **{k: f"{v:.2f}" for k, v in health.items()})
            trainer.health = health
        if updates % rf.picture_every == 0 or updates == total:
            with trainer.agent.fresh_episodes():
                figures.log_picture(updates)
        if updates % rf.checkpoint_every == 0:
            trainer.save()


@torch.no_grad()
def encode_memory(agent: Agent, progress: bool, chunk: int = 2048) -> torch.Tensor:
    """(rows, D) latents of every stored image by flat row index, by the encoder as it is now (frozen from here
    on); zeros for rows never written."""
    memory = agent.memory
    frames = memory.obs.flatten(0, 1)
    latents = torch.zeros(len(frames), agent.perception.latent_dim)
    filled = min(int(memory.written.max()), memory.rows) * memory.num_envs
    for start in tqdm(range(0, filled, chunk), desc="encode dataset", unit="chunk", disable=not progress,
                      leave=False):
        end = min(start + chunk, filled)
        latents[start:end] = encode(agent.perception, frames[start:end])
    return latents


def probe_set(cfg: DictConfig, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """frames images from random-action episodes of their own, with the env's true positions (info["position"];
    NaN where the env gives none): (frames, H, W, C) uint8, (frames, 2)."""
    loop = EnvLoop(make_vector_env(cfg.env, cfg.train.num_envs), cfg.env.nonfinite)
    rng = np.random.default_rng(PROBE_SEED)
    shape = (loop.num_envs, *loop.envs.single_action_space.shape)
    actions = rng.uniform(-1, 1, shape).astype(np.float32)

    def policy(obs: object) -> np.ndarray:
        change = rng.random(loop.num_envs) < 1.0 / cfg.agent.actor.random_hold
        actions[change] = rng.uniform(-1, 1, (int(change.sum()), shape[1]))
        return actions

    images, positions = [], []
    loop.reset(seed=PROBE_SEED)
    while sum(len(i) for i in images) < frames:
        step = loop.step(policy)
        image = step.next_obs["image"] if isinstance(step.next_obs, dict) else step.next_obs
        images.append(image[step.valid])
        where = step.info.get("position")
        positions.append(where[step.valid] if where is not None else np.full((int(step.valid.sum()), 2), np.nan))
    loop.envs.close()
    return (torch.as_tensor(np.concatenate(images)[:frames]),
            torch.as_tensor(np.concatenate(positions)[:frames], dtype=torch.float32))


class Figures:
    """The latent-health scalars and the planned-trajectory picture of a reward-free run, on data fixed once:
    every log reads the same probe frames and the same stored sequences."""

    def __init__(self, cfg: DictConfig, agent: Agent, logger: Logger) -> None:
        self.cfg, self.agent, self.logger = cfg, agent, logger
        self.probe_frames, self.probe_positions = probe_set(cfg, cfg.reward_free.probe_frames)
        batch = agent.memory.sample_sequences(256, 2 * cfg.agent.world_model.rollout_horizon,
                                              torch.Generator().manual_seed(cfg.seed + 7))
        self.probe_sequences = (batch.obs, batch.actions)

    def log_health(self, step: int) -> dict[str, float]:
        agent = self.agent
        report = health_report(agent.perception, agent.world_model, self.probe_frames, self.probe_positions,
                               self.probe_sequences)
        self.logger.scalar("world_model/effective_rank", report.effective_rank, step)
        self.logger.scalar("world_model/probe_rmse", report.probe_rmse, step)
        self.logger.scalars({"world_model/latent_std": report.latent_std,
                             "world_model/relative_error_by_horizon": report.relative_error_by_horizon}, step)
        return {"rank": report.effective_rank, "probe_px": report.probe_rmse,
                "rel_err_h1": float(report.relative_error_by_horizon[0])}

    @torch.no_grad()
    def log_picture(self, step: int) -> None:
        """Plan once from a fixed start to its goal, run the plan's actions open-loop in the env, and show the
        real frames over the nearest stored frames of the imagined latents (and the goal)."""
        agent = self.agent
        loop = EnvLoop(make_vector_env(self.cfg.env, 1), self.cfg.env.nonfinite)
        obs = loop.reset(seed=PICTURE_SEED)
        plan = agent.act(obs, generator=torch.Generator().manual_seed(PICTURE_SEED)).plan
        image = lambda o: o["image"][0] if isinstance(o, dict) else o[0]  # noqa: E731
        real = [image(obs)]
        for action in plan.actions[:, 0].cpu().numpy():
            moved = loop.step(lambda _, a=action: a[None])
            real.append(image(moved.next_obs))
            if moved.terminated[0] or moved.truncated[0]:
                break
        loop.envs.close()
        bank = encode(agent.perception, self.probe_frames)
        imagined = nearest_frames(plan.states[:, 0], bank, self.probe_frames)
        self.logger.writer.add_image("world_model/real_vs_imagined", side_by_side(real, imagined), step)
        if isinstance(obs, dict) and "goal" in obs:
            self.logger.writer.add_image("world_model/goal", side_by_side([obs["goal"][0]], imagined[-1:]), step)
