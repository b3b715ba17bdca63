"""Reward-free world-model training: exploratory random actions, no reward, perception and world model only.

`ami train` runs this instead of the agent loop when `reward_free.enabled` (the TwoRooms preset sets it). The
dataset is collected once from a gymnasium vector env, then the JEPA (encoder + predictor) trains on it. The
TensorBoard x-axis is the update count: no env steps happen while training. A checkpoint holds the modules,
the optimiser, the RNGs and the update count; the dataset is not in it (hundreds of MB of images) but is
collected again, identically, from the seed on resume.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from ami.build import build_agent, parameter_counts, resolve_device
from ami.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ami.config import ConfigError
from ami.envs import UnsupportedEnvError, make_env, observation_names
from ami.goals import batched
from ami.latent_health import encode, health_report, nearest_frames, side_by_side
from ami.logger import Logger
from ami.messages import Record


def _image(obs: dict | np.ndarray) -> np.ndarray:
    return obs["image"] if isinstance(obs, dict) else obs


def episode_bounds(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids: (N,) episode id per stored index, episodes contiguous -> (first, last): (N,) each, the first and
    last index of each index's episode, and the indices whose next frame is in the same episode."""
    new_episode = torch.ones_like(ids, dtype=torch.bool)
    new_episode[1:] = ids[1:] != ids[:-1]
    starts = new_episode.nonzero().squeeze(1)
    lengths = torch.diff(starts, append=torch.tensor([len(ids)]))
    first = starts.repeat_interleave(lengths)
    last = first + lengths.repeat_interleave(lengths) - 1
    return first, last, (torch.arange(len(ids)) < last).nonzero().squeeze(1)


def hindsight_goals(index: torch.Tensor, first: torch.Tensor, last: torch.Tensor, discount: float,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """A goal for each transition index: (B,) -> (B,) stored indices, from the transition's own episode (the
    only frames that share its walls), [first, last] per index: itself (a fifth of them: reached), a frame a
    geometric(1 - discount) number of steps on (half), or any frame of the episode (the rest: the dot can
    walk back)."""
    batch = index.shape[0]
    kind = torch.rand(batch, generator=generator)
    ahead = torch.ceil(torch.log(torch.rand(batch, generator=generator).clamp_min(1e-12)) / math.log(discount))
    future = torch.minimum(index + ahead.long().clamp_min(1), last[index])
    anywhere = first[index] + (torch.rand(batch, generator=generator) * (last[index] - first[index] + 1)).long()
    return torch.where(kind < 0.2, index, torch.where(kind < 0.7, future, anywhere))


class RewardFreeTrainer:
    """Owns one reward-free run: its dataset (in the agent's short-term memory), agent, optimiser, logger."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path, resume: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.device = resolve_device(cfg.device)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.env = make_env(cfg.env)
        space = self.env.observation_space
        if isinstance(space, gym.spaces.Dict) and "vector" in space.spaces:
            raise UnsupportedEnvError(f"env.id={cfg.env.id!r}: reward-free training stores images only; its "
                                      "observation's 'vector' would be lost")
        if len(space.shape or ()) == 1:
            raise UnsupportedEnvError(f"env.id={cfg.env.id!r}: reward-free training is for image observations; "
                                      "set env.pixels=true to observe the rendered frames")
        agent_cfg = OmegaConf.to_object(cfg.agent)
        self.agent = build_agent(agent_cfg, space, self.env.action_space.shape[0],
                                 observation_names(cfg.env, self.env), self.device)
        rf = cfg.reward_free
        if self.agent.memory.capacity < rf.transitions:
            raise ConfigError(f"reward_free.transitions={rf.transitions} exceeds agent.memory.capacity="
                              f"{self.agent.memory.capacity}; expected a memory that holds the whole dataset")
        self.optimiser = torch.optim.Adam(
            [*self.agent.perception.encoder.parameters(), *self.agent.world_model.parameters()],
            lr=cfg.agent.world_model.lr)
        self.predictor_optimiser = torch.optim.Adam(self.agent.world_model.predictor.parameters(),
                                                    lr=cfg.agent.world_model.lr)
        self.goal_critic = self.agent.cost.goal_critic
        if rf.critic_updates and self.goal_critic is None:
            raise ConfigError(f"reward_free.critic_updates={rf.critic_updates}: the goal critic needs observations "
                              f"with a goal, and env.id={cfg.env.id!r} has none; set reward_free.critic_updates=0")
        self.critic_optimiser = None if self.goal_critic is None else torch.optim.Adam(
            self.goal_critic.net.parameters(), lr=cfg.agent.cost.goal.critic_lr)
        self.latents: torch.Tensor | None = None  # (capacity, D): the frozen encoder's, after the joint phase
        self.bounds: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.positions = torch.full((self.agent.memory.capacity, 2), float("nan"))
        self.updates = 0
        self.collect()
        self._fix_probe_set()
        if resume:
            self.load(latest_checkpoint(self.run_dir))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # On resume too: overrides given there (more updates, a critic phase) are part of the run now.
        OmegaConf.save(cfg, self.run_dir / "config.yaml", resolve=True)
        self.logger = Logger(self.run_dir, purge_step=self.updates + 1 if resume else None)
        if not resume:
            self.logger.hparams({key: OmegaConf.select(cfg, key) for key in (
                "seed", "env.id", "agent.perception.latent_dim", "agent.world_model.rollout_horizon",
                "agent.world_model.variance_weight", "agent.world_model.covariance_weight",
                "agent.world_model.inverse_dynamics_weight", "agent.world_model.smoothness_weight",
                "reward_free.transitions", "reward_free.updates")}, {"world_model/probe_rmse": float("nan")})

    # -- data ---------------------------------------------------------------------------------------------
    def collect(self) -> None:
        """Fill memory with rf.transitions random-action transitions, each episode written contiguously."""
        rf, memory = self.cfg.reward_free, self.agent.memory
        envs = gym.vector.SyncVectorEnv([lambda: make_env(self.cfg.env) for _ in range(rf.num_envs)])
        mode = envs.metadata.get("autoreset_mode", gym.vector.AutoresetMode.NEXT_STEP)
        if mode not in (gym.vector.AutoresetMode.NEXT_STEP, gym.vector.AutoresetMode.SAME_STEP):
            raise UnsupportedEnvError(f"vector env autoreset_mode={mode}: expected NEXT_STEP or SAME_STEP")
        rng = np.random.default_rng(self.cfg.seed)
        action_dim = envs.single_action_space.shape[0]
        obs, info = envs.reset(seed=self.cfg.seed)
        actions = rng.uniform(-1, 1, (rf.num_envs, action_dim)).astype(np.float32)
        buffers: list[list] = [[] for _ in range(rf.num_envs)]
        restarting = np.zeros(rf.num_envs, dtype=bool)  # NEXT_STEP: this step only resets the env
        positions = info.get("position")
        self.episodes = 0
        bar = tqdm(total=rf.transitions, desc="collect (random actions)", unit="step", disable=not self.cfg.progress)
        while len(memory) < rf.transitions:
            change = rng.random(rf.num_envs) < 1.0 / rf.action_hold
            actions[change] = rng.uniform(-1, 1, (int(change.sum()), action_dim))
            next_obs, _, terminated, truncated, info = envs.step(actions)
            next_positions = info.get("position")
            for i in range(rf.num_envs):
                if restarting[i]:
                    continue
                if mode == gym.vector.AutoresetMode.SAME_STEP and (terminated[i] or truncated[i]):
                    end_image = _image(info["final_obs"][i])  # next_obs already starts the next episode
                else:
                    end_image = _image(next_obs)[i]
                buffers[i].append((_image(obs)[i].copy(), actions[i].copy(), end_image.copy(),
                                   bool(terminated[i]), bool(truncated[i]),
                                   None if positions is None else positions[i].copy()))
                if terminated[i] or truncated[i]:
                    self._write_episode(buffers[i])
                    buffers[i] = []
                    bar.update(len(memory) - bar.n)
            restarting = (terminated | truncated) if mode == gym.vector.AutoresetMode.NEXT_STEP \
                else np.zeros_like(restarting)
            obs, positions = next_obs, next_positions
        bar.close()
        envs.close()

    def _write_episode(self, transitions: list) -> None:
        memory = self.agent.memory
        latent = torch.zeros(self.agent.perception.latent_dim)
        terms = torch.zeros(len(self.agent.cost.intrinsic.term_names))
        for step, (image, action, next_image, terminated, truncated, position) in enumerate(transitions):
            if len(memory) >= self.cfg.reward_free.transitions:
                truncated = True  # the dataset is full: this episode ends here
            # No reward is stored: the world model never sees one.
            memory.write(Record(step, self.episodes, torch.from_numpy(image), torch.from_numpy(next_image), latent,
                                torch.from_numpy(action), 0.0, terms, terminated, truncated, False))
            if position is not None:
                self.positions[(memory.cursor - 1) % memory.capacity] = torch.as_tensor(position)
            if truncated and len(memory) >= self.cfg.reward_free.transitions:
                break
        self.episodes += 1

    def _fix_probe_set(self) -> None:
        """The frames (with true positions) for the probe and the nearest-frame bank, and the sequences for
        the prediction error by horizon: drawn once, so every log reads the same data."""
        rf, memory = self.cfg.reward_free, self.agent.memory
        generator = torch.Generator().manual_seed(self.cfg.seed + 7)
        index = torch.randperm(len(memory), generator=generator)[: rf.probe_frames]
        self.probe_frames = memory.obs[index]
        self.probe_positions = self.positions[index]
        horizon = 2 * self.cfg.agent.world_model.rollout_horizon
        batch = memory.sample_sequences(256, horizon, generator)
        self.probe_sequences = (batch.obs, batch.actions)

    # -- training -----------------------------------------------------------------------------------------
    def update(self) -> dict:
        agent, wm_cfg = self.agent, self.cfg.agent.world_model
        batch = agent.memory.sample_sequences(wm_cfg.batch_size, wm_cfg.rollout_horizon, self.generator)
        losses = agent.world_model.loss(agent.perception, batch.obs.to(self.device), batch.actions.to(self.device))
        self.optimiser.zero_grad(set_to_none=True)
        losses.total.backward()
        params = [p for group in self.optimiser.param_groups for p in group["params"]]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, wm_cfg.grad_clip))
        self.optimiser.step()
        agent.perception.update_target()
        agent.world_model_trained = True
        self.updates += 1
        return {"world_model/loss": losses.total.item(), "world_model/prediction_loss": losses.prediction.item(),
                "world_model/prediction_loss_by_horizon": losses.prediction_by_horizon,
                "world_model/variance_loss": losses.variance.item(),
                "world_model/covariance_loss": losses.covariance.item(),
                "world_model/inverse_dynamics_loss": losses.inverse_dynamics.item(),
                "world_model/smoothness_loss": losses.smoothness.item(),
                "world_model/temporal_variance_loss": losses.temporal_variance.item(),
                "world_model/grad_norm": grad_norm}

    @torch.no_grad()
    def encode_dataset(self) -> torch.Tensor:
        """(capacity, D) latents of every stored image, by the encoder as it is now (frozen from here on)."""
        memory = self.agent.memory
        latents = torch.zeros(memory.capacity, self.agent.perception.latent_dim)
        chunk = 2048
        for start in tqdm(range(0, len(memory), chunk), desc="encode dataset", unit="chunk",
                          disable=not self.cfg.progress, leave=False):
            latents[start:start + chunk] = encode(self.agent.perception, memory.obs[start:start + chunk])
        return latents

    def update_predictor(self) -> dict:
        """One predictor-only update: rollouts of predictor_horizon steps on the frozen encoder's latents."""
        rf, agent = self.cfg.reward_free, self.agent
        if self.latents is None:
            self.latents = self.encode_dataset()
        idx = agent.memory.sample_indices(rf.predictor_batch_size, rf.predictor_horizon + 1, self.generator)
        states = self.latents[idx].to(self.device)  # (K + 1, B, D)
        actions = agent.memory.action[idx[:-1]].to(self.device)
        _, loss, by_horizon = agent.world_model.prediction_loss(states[0], actions, states[1:])
        self.predictor_optimiser.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(agent.world_model.predictor.parameters(),
                                                         self.cfg.agent.world_model.grad_clip))
        self.predictor_optimiser.step()
        self.updates += 1
        return {"world_model/prediction_loss": loss.item(), "world_model/prediction_loss_by_horizon": by_horizon,
                "world_model/grad_norm": grad_norm}

    def update_goal_critic(self) -> dict:
        """One goal-critic update on the frozen latents, each transition s_t -> s_t+1 with a hindsight goal."""
        if self.latents is None:
            self.latents = self.encode_dataset()
        if self.bounds is None:
            self.bounds = episode_bounds(self.agent.memory.episode[: len(self.agent.memory)])
        first, last, transitions = self.bounds
        index = transitions[torch.randint(len(transitions), (self.cfg.reward_free.critic_batch_size,),
                                          generator=self.generator)]
        goal = hindsight_goals(index, first, last, self.cfg.agent.cost.goal.critic_discount, self.generator)
        states, next_states, goals = (self.latents[i].to(self.device) for i in (index, index + 1, goal))
        loss, stats = self.goal_critic.loss(states, next_states, goals, (goal == index).to(self.device))
        self.critic_optimiser.zero_grad(set_to_none=True)
        loss.backward()
        self.critic_optimiser.step()
        self.goal_critic.update_target()
        self.goal_critic.trained.fill_(True)
        self.updates += 1
        return {f"cost/critic/{key}": value for key, value in stats.items()}

    def log_health(self) -> dict[str, float]:
        agent = self.agent
        report = health_report(agent.perception, agent.world_model, self.probe_frames, self.probe_positions,
                               self.probe_sequences)
        step = self.updates
        self.logger.scalar("world_model/effective_rank", report.effective_rank, step)
        self.logger.scalar("world_model/probe_rmse", report.probe_rmse, step)
        self.logger.scalars({"world_model/latent_std": report.latent_std,
                             "world_model/relative_error_by_horizon": report.relative_error_by_horizon}, step)
        return {"rank": report.effective_rank, "probe_px": report.probe_rmse,
                "rel_err_h1": float(report.relative_error_by_horizon[0])}

    @torch.no_grad()
    def log_picture(self, seed: int = 12345) -> None:
        """Plan once from a fixed start to its goal, run the plan's actions open-loop in the env, and show the
        real frames over the nearest stored frames of the imagined latents (and the goal)."""
        agent, env = self.agent, self.env
        obs, _ = env.reset(seed=seed)
        agent.reset()
        _, _, _, plan, _ = agent.act(batched(obs))
        agent.reset()
        real = [_image(obs)]
        for action in plan.actions[:, 0].cpu().numpy():
            obs, _, terminated, truncated, _ = env.step(action)
            real.append(_image(obs))
            if terminated or truncated:
                break
        bank = encode(agent.perception, self.probe_frames)
        imagined = nearest_frames(plan.states[:, 0], bank, self.probe_frames)
        self.logger.writer.add_image("world_model/real_vs_imagined", side_by_side(real, imagined), self.updates)
        if isinstance(obs, dict) and "goal" in obs:
            self.logger.writer.add_image("world_model/goal", side_by_side([obs["goal"]], imagined[-1:]), self.updates)

    def train(self) -> dict[str, float]:
        rf = self.cfg.reward_free
        total = rf.updates + rf.predictor_updates + rf.critic_updates
        bar = tqdm(total=total, initial=self.updates, desc=f"{self.cfg.env.name} world model s{self.cfg.seed}",
                   unit="update", disable=not self.cfg.progress)
        start, start_updates, health = time.perf_counter(), self.updates, {}
        try:
            while self.updates < total:
                if self.updates < rf.updates:
                    stats = self.update()
                elif self.updates < rf.updates + rf.predictor_updates:
                    stats = self.update_predictor()
                else:
                    stats = self.update_goal_critic()
                bar.update(1)
                if self.updates % rf.log_every == 0 or self.updates == total:
                    self.logger.scalars(stats, self.updates)
                    rate = (self.updates - start_updates) / (time.perf_counter() - start)
                    self.logger.scalar("charts/updates_per_s", rate, self.updates)
                    health = self.log_health()
                    loss = next(f"{v:.3f}" for k, v in stats.items() if k.endswith("_loss"))
                    bar.set_postfix(loss=loss, **{k: f"{v:.2f}" for k, v in health.items()})
                if self.updates % rf.picture_every == 0 or self.updates == total:
                    self.log_picture()
                if self.updates % rf.checkpoint_every == 0:
                    self.save()
            self.save()
        except KeyboardInterrupt:
            self.save()
            bar.write(f"interrupted at update {self.updates}; resume with: ami train --resume {self.run_dir}")
            raise
        finally:
            bar.close()
            self.logger.close()
            self.env.close()
        return {"updates": self.updates, "train_seconds": time.perf_counter() - start, **health}

    # -- checkpoints --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"version": 1, "kind": "reward_free", "config": OmegaConf.to_container(self.cfg, resolve=True),
                "perception": self.agent.perception.state_dict(), "world_model": self.agent.world_model.state_dict(),
                "optimiser": self.optimiser.state_dict(), "predictor_optimiser": self.predictor_optimiser.state_dict(),
                "updates": self.updates,
                **({} if self.goal_critic is None else {"goal_critic": self.goal_critic.state_dict(),
                                                        "critic_optimiser": self.critic_optimiser.state_dict()}),
                "rng": {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}}

    def save(self) -> Path:
        return save_checkpoint(self.state_dict(), self.run_dir / "checkpoints" / "latest.pt")

    def load(self, path: Path) -> None:
        state = load_checkpoint(path, self.device)
        self.agent.perception.load_state_dict(state["perception"])
        self.agent.world_model.load_state_dict(state["world_model"])
        self.optimiser.load_state_dict(state["optimiser"])
        if "predictor_optimiser" in state:
            self.predictor_optimiser.load_state_dict(state["predictor_optimiser"])
        if self.goal_critic is not None and "goal_critic" in state:
            self.goal_critic.load_state_dict(state["goal_critic"])
            self.critic_optimiser.load_state_dict(state["critic_optimiser"])
        self.updates = int(state["updates"])
        self.generator.set_state(state["rng"]["generator"].cpu())
        torch.set_rng_state(state["rng"]["torch"].cpu())
        self.agent.world_model_trained = self.updates > 0


def describe(trainer: RewardFreeTrainer) -> str:
    counts = parameter_counts(trainer.agent)
    rf = trainer.cfg.reward_free
    critic = f", goal critic {counts['goal_critic']:,}" if "goal_critic" in counts else ""
    return (f"reward-free: {len(trainer.agent.memory):,} random-action transitions in {trainer.episodes} episodes, "
            f"{rf.updates} joint updates, then {rf.predictor_updates} of the predictor alone and {rf.critic_updates} "
            "of the goal critic (no reward stored or used)\n"
            f"parameters: perception {counts['perception']:,}, world model {counts['world_model']:,}{critic}; "
            f"device: {trainer.device}")
