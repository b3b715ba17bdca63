"""What TensorBoard shows beside the scalars: the imagined-vs-observed plot of a plan and the evaluation video,
written by a real tiny run on Pendulum-v1 and read back from its event file."""

import io

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ami.config import load_config
from ami.figures import gif, prediction_against_memory
from ami.train import Trainer

# 60-step episodes: the evaluation (and its video) is one of them.
RUN = ["agent=tiny", "train.total_steps=200", "train.seed_steps=100", "train.pretrain_updates=20",
       "train.eval_every=200", "train.eval_episodes=1", "env.max_episode_steps=60", "progress=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("figures")
    trainer = Trainer(load_config([*RUN, "train.eval_video=true"]), run_dir)
    trainer.train()
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    return trainer, events


def test_the_model_predicts_a_stretch_of_real_experience_open_loop(trained):
    trainer, _ = trained
    agent, horizon = trainer.agent, trainer.cfg.agent.actor.horizon
    observed, imagined = prediction_against_memory(agent, horizon, seed=5)
    assert observed.shape == imagined.shape == (horizon + 1, 3)
    # Consecutive real Pendulum states of one episode: cos² + sin² = 1, and the angle moves by at most
    # max_speed * dt = 0.4 rad a step.
    np.testing.assert_allclose(observed[:, 0] ** 2 + observed[:, 1] ** 2, 1.0, atol=1e-5)
    angles = np.arctan2(observed[:, 1], observed[:, 0])
    assert np.abs(np.angle(np.exp(1j * np.diff(angles)))).max() <= 0.4 + 1e-4
    # The imagined line starts at the model's reading of the first observed state (Pendulum's readout is not
    # anchored to the observation), then follows the model, not the data.
    with torch.no_grad():
        start = agent.world_model.readout(agent.perception(torch.as_tensor(observed[:1])))
    np.testing.assert_allclose(imagined[0], start[0].numpy(), atol=1e-5)
    assert np.abs(imagined[1:] - observed[1:]).max() > 0
    # Its own generator: the same seed draws the same stretch, and training's random state is untouched.
    state = torch.get_rng_state()
    again = prediction_against_memory(agent, horizon, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    np.testing.assert_array_equal(again[0], observed)
    assert not np.array_equal(prediction_against_memory(agent, horizon, seed=6)[0], observed)


def test_a_run_writes_the_plot_and_the_video_at_its_evaluation(trained):
    _, events = trained
    tags = events.Tags()["images"]
    assert {"world_model/imagined_vs_real", "eval/video"} <= set(tags), tags
    (plot,) = events.Images("world_model/imagined_vs_real")
    assert plot.step == 200
    picture = iio.imread(io.BytesIO(plot.encoded_image_string))
    assert picture.ndim == 3 and picture.shape[2] in (3, 4) and picture.std() > 10  # drawn, not blank
    (video,) = events.Images("eval/video")
    frames = iio.imread(io.BytesIO(video.encoded_image_string), index=None, extension=".gif")
    # A Pendulum episode of 60 steps (GIF writers merge identical frames), shrunk to 240 pixels a side.
    assert 30 < frames.shape[0] <= 61 and frames.shape[1:3] == (240, 240) == (video.height, video.width)
    assert np.abs(frames[1:].astype(int) - frames[:-1]).max() > 0  # it moves


def test_without_eval_video_there_is_no_video(tmp_path):
    trainer = Trainer(load_config([*RUN, "train.total_steps=100", "train.eval_every=100"]), tmp_path)
    trainer.train()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == ["world_model/imagined_vs_real"]


def test_gif_pads_a_wide_frame_rather_than_stretch_it():
    frames = [np.full((100, 400, 3), value, dtype=np.uint8) for value in (0, 255)]
    data, height, width = gif(frames, fps=10, max_side=200)
    decoded = iio.imread(io.BytesIO(data), index=None, extension=".gif")
    assert decoded.shape[:3] == (2, height, width) == (2, 200, 200)
    assert decoded[1, :50].min() > 200 and decoded[1, 150:].max() < 20  # the frame on top, padding below
