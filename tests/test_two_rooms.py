"""TwoRoomsEnv: gymnasium API, the wall and its door, sliding, success, seeding, images; and PixelObservation."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.envs.registration import EnvSpec
from gymnasium.utils.env_checker import check_env

import ami.envs  # noqa: F401  (registers ami/TwoRooms-v0)
from ami.envs import UnsupportedEnvError, make_env, observation_kind, observation_names
from ami.envs.pixels import PixelObservation, resize_frame
from ami.envs.two_rooms import DOT_VALUE, SIZE, WALL_VALUE, TwoRoomsEnv
from ami.schema import EnvConfig

LAYOUT = {"wall_x": 32.0, "door_y": 20.0}  # door band y in [15, 25]; the dot (radius 1.5) passes for y in [16.5, 23.5]


def test_check_env_passes_without_warnings():
    env = TwoRoomsEnv(render_mode="rgb_array")
    env.spec = EnvSpec("ami/TwoRoomsCheck-v0", entry_point="ami.envs.two_rooms:TwoRoomsEnv", max_episode_steps=200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env)


def test_registered_with_a_200_step_limit_and_the_goal_image_in_the_observation():
    env = gym.make("ami/TwoRooms-v0")
    assert env.spec.max_episode_steps == 200
    obs, info = env.reset(seed=3)
    assert set(obs) == {"image", "goal"} and obs["image"].shape == (SIZE, SIZE, 1) and obs["image"].dtype == np.uint8
    # Start and goal in different rooms, the goal image shows the dot at the goal, and the same walls.
    unwrapped = env.unwrapped
    assert unwrapped.room_of(info["position"]) != unwrapped.room_of(info["goal_position"])
    np.testing.assert_array_equal(obs["goal"], unwrapped.draw(info["goal_position"]))
    assert ((obs["image"] == WALL_VALUE) == (obs["goal"] == WALL_VALUE)).all()
    steps, truncated = 0, False
    while not truncated:
        _, _, terminated, truncated, _ = env.step(np.zeros(2, dtype=np.float32))
        assert not terminated
        steps += 1
    assert steps == 200


def test_same_seed_same_episode_and_layouts_vary():
    env = TwoRoomsEnv()
    first, info_a = env.reset(seed=5)
    again, info_b = env.reset(seed=5)
    np.testing.assert_array_equal(first["image"], again["image"])
    layouts = {(round(env.reset(seed=s)[1]["wall_x"], 3), round(env.reset(seed=s)[1]["door_y"], 3)) for s in range(20)}
    assert len(layouts) == 20
    for seed in range(50):
        _, info = env.reset(seed=seed)
        assert 24 <= info["wall_x"] <= 40 and 12 <= info["door_y"] <= 52


def test_the_wall_stops_the_dot_and_it_slides_along():
    env = TwoRoomsEnv()
    env.reset(seed=0, options={**LAYOUT, "start": (20.0, 40.0), "goal": (50.0, 40.0)})
    for _ in range(20):
        env.step(np.array([1.0, 0.0], dtype=np.float32))
    # Stopped against the wall's face (x = 32 - 1.5 - radius 1.5), below the door.
    np.testing.assert_allclose(env.position, [29.0, 40.0], atol=0.7)
    for _ in range(20):  # pushing right and up slides along the wall, through the door
        env.step(np.array([1.0, -1.0], dtype=np.float32))
    assert env.position[0] > 35.0, "the dot should have passed the door into the right room"


def test_steps_are_bounded_and_the_arena_contains_the_dot():
    env = TwoRoomsEnv()
    env.reset(seed=1, options={**LAYOUT, "start": (10.0, 50.0), "goal": (50.0, 50.0)})
    rng = np.random.default_rng(0)
    previous = env.position.copy()
    for _ in range(500):
        env.step(rng.uniform(-3, 3, 2).astype(np.float32))
        assert np.linalg.norm(env.position - previous) <= 2.5 + 1e-9
        assert env.is_free(env.position)
        previous = env.position.copy()


def test_success_within_the_radius_terminates_with_reward_one():
    env = TwoRoomsEnv()
    env.reset(seed=0, options={**LAYOUT, "start": (10.0, 40.0), "goal": (16.0, 40.0)})
    _, reward, terminated, _, info = env.step(np.array([0.5, 0.0], dtype=np.float32))  # 1.25 px: 4.75 away
    assert not terminated and reward == 0.0 and info["distance"] == pytest.approx(4.75)
    _, reward, terminated, _, info = env.step(np.array([0.5, 0.0], dtype=np.float32))  # 3.5 px away
    assert terminated and reward == 1.0 and info["success"]


def test_image_draws_the_wall_with_its_door_and_the_dot_at_its_position():
    env = TwoRoomsEnv()
    obs, _ = env.reset(seed=0, options={**LAYOUT, "start": (10.3, 40.6), "goal": (50.0, 40.0)})
    image = obs["image"][:, :, 0]
    assert (image[:, 31] == WALL_VALUE).sum() == SIZE - 10  # a 10-pixel door in the wall's column
    assert (image[15:25, 31] == 0).all()
    row, column = np.unravel_index(image.argmax(), image.shape)
    assert (column, row) == (10, 40) and image.max() >= 0.8 * DOT_VALUE
    assert env.render() is None
    frame = TwoRoomsEnv(render_mode="rgb_array")
    frame.reset(seed=0)
    assert frame.render().shape == (SIZE, SIZE, 3)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"max_step": 0}, "max_step"), ({"door_width": 3.0}, "door_width"), ({"wall_range": (5, 40)}, "wall_range"),
    ({"render_mode": "human"}, "render_mode")])
def test_invalid_kwargs_raise_naming_the_kwarg(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TwoRoomsEnv(**kwargs)


def test_reset_options_are_checked():
    env = TwoRoomsEnv()
    with pytest.raises(ValueError, match="start"):
        env.reset(seed=0, options={**LAYOUT, "start": (32.0, 40.0)})  # inside the wall
    with pytest.raises(ValueError, match="reset options"):
        env.reset(seed=0, options={"door": 3})


def test_pixel_wrapper_gives_resized_uint8_frames_stacked_oldest_first():
    env = PixelObservation(gym.make("Pendulum-v1", render_mode="rgb_array"), size=64, frame_stack=3)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (64, 64, 9) and obs.dtype == np.uint8 and env.observation_space.contains(obs)
    np.testing.assert_array_equal(obs[:, :, :3], obs[:, :, 6:])  # reset fills the stack with the first frame
    nxt, *_ = env.step(np.array([2.0], dtype=np.float32))
    np.testing.assert_array_equal(nxt[:, :, :6], obs[:, :, 3:])  # the stack shifts by one frame
    assert not np.array_equal(nxt[:, :, 6:], obs[:, :, 6:])
    with pytest.raises(ValueError, match="render_mode"):
        PixelObservation(gym.make("Pendulum-v1"))


def test_resize_averages_areas():
    frame = np.zeros((128, 128, 3), dtype=np.uint8)
    frame[:64] = 200
    small = resize_frame(frame, 64)
    assert small.shape == (64, 64, 3) and (small[:32] == 200).all() and (small[32:] == 0).all()


def test_make_env_pixels_and_observation_kinds():
    env = make_env(EnvConfig(name="pendulum", id="Pendulum-v1", pixels=True, frame_stack=2))
    assert env.observation_space.shape == (64, 64, 6) and observation_kind(env.observation_space) == "image"
    assert observation_names(EnvConfig(id="Pendulum-v1", pixels=True), env) == []  # pixels only, no state
    rooms = make_env(EnvConfig(name="two_rooms", id="ami/TwoRooms-v0"))
    assert observation_kind(rooms.observation_space) == "dict"
    with pytest.raises(UnsupportedEnvError, match="observation space"):
        observation_kind(gym.spaces.Dict({"image": rooms.observation_space["image"], "other": gym.spaces.Discrete(2)}))
