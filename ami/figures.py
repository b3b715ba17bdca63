"""What TensorBoard shows beside the scalars of an agent run: an evaluation episode as video, and the world
model's open-loop prediction of a stretch of real experience against what happened (the model seen, not only
read)."""

from __future__ import annotations

import io

import numpy as np
import torch

from ami.agent import Agent
from ami.envs import make_vector_env
from ami.loop import EnvLoop
from ami.messages import Percept
from ami.schema import EnvConfig

MAX_PANELS = 8  # quantities shown: the first ones of the observation


def imagined_vs_real(agent: Agent, horizon: int, seed: int) -> np.ndarray | None:
    """One panel per observation quantity over `horizon` steps of the agent's own experience: as the world model
    predicts them open-loop from the first state under the actions taken (dashed), and as they came (solid)
    -> (H, W, 3) uint8; None for an image observation, or while memory holds no stretch of a few steps."""
    memory = agent.memory
    if memory.vector is not None or memory.obs.dtype == torch.uint8 or not agent.world_model.observation_names:
        return None
    while horizon >= 2:
        try:
            return _plot(*prediction_against_memory(agent, horizon, seed), agent.world_model.observation_names)
        except ValueError:  # no stretch that long yet (short episodes): a shorter one
            horizon //= 2
    return None


def prediction_against_memory(agent: Agent, horizon: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stretch of `horizon` transitions from memory (drawn with a generator of its own: training's draws are
    untouched) -> (its observed quantities (H + 1, Q), the readout of the states the world model imagines from
    its first observation under its actions (H + 1, Q)). ValueError when memory has no stretch that long."""
    batch = agent.memory.sample_sequences(1, horizon, torch.Generator().manual_seed(seed))
    device = agent.device
    observed = batch.obs[:, 0].float()  # (H + 1, Q)
    with torch.no_grad():
        first = observed[:1].to(device)
        state = agent.perception(first)
        offset = agent.world_model.readout_offset(Percept(state, None, first))
        states = agent.world_model.rollout(state, batch.actions.to(device))  # (H + 1, 1, D)
        imagined = (agent.world_model.readout(states) + offset)[:, 0].cpu().numpy()
    return observed.numpy(), imagined


def _plot(real: np.ndarray, imagined: np.ndarray, names: list[str]) -> np.ndarray:
    """real: (T, Q), imagined: (H + 1, Q) -> an RGB image of one panel per quantity."""
    # A Figure on its own Agg canvas: no display, and the user's pyplot backend (a notebook's) left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = min(len(names), MAX_PANELS)
    columns = min(panels, 4)
    rows = -(-panels // columns)
    figure = Figure(figsize=(3.2 * columns, 2.4 * rows), dpi=80)
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False)
    for index, axis in enumerate(axes.flat):
        if index >= panels:
            axis.axis("off")
            continue
        axis.plot(np.arange(len(real)), real[:, index], "k-", label="observed")
        axis.plot(np.arange(len(imagined)), imagined[:, index], "C1--", label="imagined")
        axis.set_title(names[index], fontsize=9)
        axis.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=7)
    figure.supxlabel("steps, open-loop from the first", fontsize=8)
    figure.tight_layout()
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def render_episode(agent: Agent, env_config: EnvConfig, seed: int, generator: torch.Generator
                   ) -> tuple[list[np.ndarray], float]:
    """One evaluation episode, rendered: its frames (T × (H, W, 3) uint8) and its return. NEXT_STEP autoreset:
    after the episode's last step the env still shows its final state."""
    import gymnasium as gym

    from ami.envs import UnsupportedEnvError

    loop = EnvLoop(make_vector_env(env_config, 1, "rgb_array", gym.vector.AutoresetMode.NEXT_STEP),
                   env_config.nonfinite)
    render = loop.envs.envs[0].render
    with agent.fresh_episodes():
        try:
            loop.reset(seed=seed)
            frames = [render()]
            if not isinstance(frames[0], np.ndarray):
                raise UnsupportedEnvError(f"env.id={env_config.id!r} renders {type(frames[0]).__name__} with "
                                          "render_mode='rgb_array'; expected an image (or set train.eval_video"
                                          "=false)")
            while True:
                step = loop.step(lambda obs: agent.act(obs, generator=generator))
                frames.append(render())
                if step.finished:
                    break
        finally:
            loop.envs.close()
    return frames, step.finished[0].stats["return"]


def gif(frames: list[np.ndarray], fps: int, max_side: int = 240) -> tuple[bytes, int, int]:
    """frames -> (an animated GIF, its height, its width), shrunk to at most max_side pixels a side (TensorBoard
    plays GIFs in its images tab)."""
    import imageio.v3 as iio

    from ami.envs.pixels import resize_frame

    height, width = frames[0].shape[:2]
    if max(height, width) > max_side:  # resize_frame makes squares: keep the aspect by padding first
        side = max(height, width)
        padded = [np.pad(f, ((0, side - height), (0, side - width), (0, 0))) for f in frames]
        frames = [resize_frame(f, max_side) for f in padded]
    buffer = io.BytesIO()
    iio.imwrite(buffer, np.stack(frames), extension=".gif", duration=1000 / fps, loop=0)
    return buffer.getvalue(), *frames[0].shape[:2]
