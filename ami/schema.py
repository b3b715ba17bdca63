"""The configuration's schema: one dataclass per module, composed into a RunConfig. ami.config resolves one from
presets and overrides; every default is here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


@dataclass
class EnvConfig:
    """Which gymnasium environment, and the names of its observation quantities."""

    name: str = "pendulum"
    id: str = "Pendulum-v1"
    kwargs: dict[str, Any] = field(default_factory=dict)
    max_episode_steps: int | None = None
    # Names of the observation vector's entries; the world model's readout predicts them and the
    # analytic cost terms read them. Empty: obs_0, obs_1, ...
    observation_names: list[str] = field(default_factory=list)
    # Observe env.render() instead of the env's observation (PixelObservation): resized to
    # image_size x image_size, the last frame_stack frames on the channel axis.
    pixels: bool = False
    image_size: int = 64
    frame_stack: int = 1
    grayscale: bool = False
    # A non-finite observation or reward from the env: "error" stops the run with one line naming the env, the
    # step and the field; "skip" drops that transition (counted in charts/nonfinite_dropped) and goes on.
    nonfinite: str = "error"
    # info["cost"] = 1.0 on the step an episode terminates, for an env whose only failure is its termination (a
    # walker that falls): the ground-truth cost `ami bench safety` counts. An env's own info["cost"] is kept.
    cost_from_termination: bool = False
    # Each action held for this many env steps, their rewards (and info["cost"]) summed, stopping where the episode
    # ends: DeepMind Control's usual 2 (TD-MPC2, DreamerV3). Steps everywhere else count the agent's actions.
    action_repeat: int = 1


@dataclass
class PerceptionConfig:
    latent_dim: int = 64
    hidden_dim: int = 128
    # Image observations: a convolutional encoder of conv_layers stride-2 layers of conv_channels
    # channels (with x, y coordinate channels), then an MLP with any "vector" entries.
    conv_channels: int = 32
    conv_layers: int = 4
    keypoints: int = 0  # spatial-softmax keypoints on the second conv layer's map (0: none)
    # The latent from the keypoints alone (no flattened final map): a state that moves smoothly with
    # the objects in view, which a latent distance to a goal needs.
    keypoints_only: bool = False
    # "ema": target encoder is a slow average of the online one; "stopgrad": the online encoder,
    # detached.
    target: str = "ema"
    target_tau: float = 0.01


@dataclass
class WorldModelConfig:
    hidden_dim: int = 128
    lr: float = 1e-3
    batch_size: int = 256
    rollout_horizon: int = 5  # steps of multi-step prediction in the JEPA loss
    horizon_discount: float = 0.9  # weight of step k is horizon_discount**k
    readout_weight: float = 1.0
    # Imagined quantities as the observed ones plus the readout's predicted change,
    # q_k = q_obs + readout(s_k) - readout(s_0): the readout's error at the current state cancels
    # instead of biasing every analytic cost term (a goal that looks reached while it is 0.3 m away).
    anchor_readout: bool = False
    variance_weight: float = 1.0
    covariance_weight: float = 0.04
    # Anti-collapse terms that shape the latent's geometry for planning: an inverse-dynamics head
    # predicting a[t] from (s[t], s[t+1]) keeps what the agent controls; temporal smoothness,
    # mean ||s[t+1] - s[t]||^2, keeps one step a short distance.
    inverse_dynamics_weight: float = 0.0
    smoothness_weight: float = 0.0
    # Hinge on each sequence's latent std over time (mean over dims) below temporal_std_target: what
    # moves within an episode must show in the latent, not only what differs between episodes.
    temporal_variance_weight: float = 0.0
    temporal_std_target: float = 0.2
    grad_clip: float = 10.0
    # Predictors of the next latent: the planner uses the first, the shield checks the worst of them all.
    ensemble_size: int = 1
    # A latent variable z[t] in the predictor, E = D(s[t+1], Pred(s[t], a[t], z[t])): what the past cannot predict
    # about the next latent (a coin flip, a gust). Training infers it from the transition; planning draws it from a
    # learned prior p(z | s, a), its likeliest value unless samples are asked for. 0: none, the deterministic model.
    z_dim: int = 0
    z_kind: str = "gaussian"  # "gaussian": z in R^z_dim; "discrete": one of z_dim classes
    # Weight of KL(posterior || prior), the information z carries (nats per step), per latent dimension beside the
    # mean squared error: z is used where it removes more than z_weight of summed squared error per nat. Without it
    # the predictor would read the next state off z instead of predicting it.
    z_weight: float = 0.1


@dataclass
class CostTermConfig:
    """One hard-coded intrinsic-cost term.

    kind: "analytic" (computed on any state from the readout) or "measured" (known only on real
    transitions; the critic learns it). formula: a name in modules.cost.FORMULAS.
    """

    name: str = MISSING
    formula: str = MISSING
    kind: str = "analytic"
    weight: float = 1.0
    guardrail: bool = False
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class GoalConfig:
    """The intrinsic cost's goal term, on when the observation carries a goal: the configurator encodes the
    goal observation, and every imagined state pays weight * distance(s_t, goal), the plan's last
    state final_weight * distance more. metric: "l2" or "squared" (modules.cost.latent_goal_distance), or
    "critic": the goal critic's steps to the goal (modules.critic.GoalCritic, trained by the reward-free run)."""

    weight: float = 1.0
    final_weight: float = 10.0
    metric: str = "l2"
    # The goal critic's steps from the plan's last state, added at this weight whatever the metric: the
    # distance still to go beyond the horizon.
    critic_final_weight: float = 0.0
    # The goal critic (built when the observation carries a goal): steps(s, g) = log reach / log discount.
    critic_hidden_dim: int = 256
    critic_discount: float = 0.99
    critic_expectile: float = 0.9  # above 0.5: the best the data's moves reach, not the random walk's average
    critic_lr: float = 3e-4
    critic_tau: float = 0.005


@dataclass
class CostConfig:
    terms: list[CostTermConfig] = field(default_factory=list)
    goal: GoalConfig = field(default_factory=GoalConfig)
    discount: float = 0.99
    critic_hidden_dim: int = 128
    critic_lr: float = 3e-4
    critic_tau: float = 0.01  # EMA rate of the critic's target network
    # Value heads, differently initialised and trained on the same targets. A plan's last state (and a target's
    # bootstrap) is priced at their mean + value_pessimism x their spread (std over members): where they disagree,
    # on states unlike the data (as imagined ones can be), the value is no free lunch.
    value_ensemble: int = 1
    value_pessimism: float = 0.0
    # Optimism while training (an upper confidence bound, as ensemble explorers use): the plans that choose training
    # actions price their last state at the value minus value_optimism x the members' spread, so a state the
    # ensemble disagrees on draws the agent there and the data comes to cover it. Evaluation, the value's targets
    # and the policy's losses never use it. 0: off.
    value_optimism: float = 0.0
    # The value trained on imagined states as well: the policy rolled imagined_horizon steps through the world model
    # from each batch's encoded states, TD(imagined_lambda) targets on the plan's own step costs. 0: real states only.
    imagined_horizon: int = 0
    imagined_lambda: float = 0.95
    # The plan's last imagined state is priced by the critic's value at this weight (in [0, 1]) and by the analytic
    # terms at 1 - value_weight: 0 where the critic's value cannot be trusted (a goal that moves, a fall).
    value_weight: float = 1.0
    # Cost per step, forever, after the env terminates an episode (a fall, a crash): the critic's
    # price of ending early. 0 suits envs whose termination is success or that never terminate.
    termination_cost: float = 0.0
    # A continuation head, P(the episode goes on | s'), learned from the real transitions' terminations: each
    # imagined step of a plan counts as far as the episode is predicted to last, and a predicted end is priced at
    # termination_cost forever, as a real one is in the value's targets.
    continuation: bool = False
    # Boredom: every imagined state pays boredom_weight * sum_v exp(-|s - v|^2 / (2 boredom_radius^2)) over
    # the latents v this episode has already passed through (the short-term memory's EpisodeTrail). A place
    # the agent lingers in wears out, so a plan that keeps promising a way the world model gets wrong (through
    # a wall, near the door) gives way to another. 0 turns it off (and the trail with it).
    boredom_weight: float = 0.0
    boredom_radius: float = 0.5  # in latent units
    grad_clip: float = 10.0


@dataclass
class MemoryConfig:
    capacity: int = 100_000
    recall_k: int = 8
    # The current episode's latents kept for the boredom term: one every trail_every steps, the newest
    # trail_capacity of them.
    trail_capacity: int = 256
    trail_every: int = 1


@dataclass
class ActorConfig:
    planner: str = "gradient"  # "gradient" or "mppi"
    compile: bool = False  # torch.compile the plan energy and its gradient (the default agent turns it on)
    # The gradient planner's whole descent (every iteration's energy and gradient, the Adam steps and the best
    # iterate kept) as one compiled graph, captured as a CUDA graph on a GPU (mode "reduce-overhead"): no launch
    # per operation and no host read inside the plan. One graph per batch size, horizon and iteration count.
    compile_plan: bool = False
    horizon: int = 20
    iterations: int = 5
    candidates: int = 16
    lr: float = 0.1  # Adam step on the actions (gradient planner)
    init_std: float = 0.5  # spread of candidates around the warm start
    fresh_fraction: float = 0.125  # share of candidates started at a random constant action instead
    fresh_segments: int = 1  # constant pieces in a fresh candidate, each starting at a random step
    # When above the fresh candidates' count, that many fresh sequences are priced (forward only) and
    # the best become the fresh candidates: sampling finds the basin, gradient steps descend it.
    screen_samples: int = 0
    exploration_std: float = 0.1  # Gaussian noise on executed actions while training
    # Random proposals (the seed phase, reward-free collection) hold each uniform action for a geometric number
    # of steps with this mean: 1 draws a new one every step; 8 crosses rooms and presses against walls.
    random_hold: float = 1.0
    # Env steps each plan is followed before the next planning call (model-predictive control with
    # a receding horizon); 1 replans every step.
    replan_every: int = 1
    # MPPI
    mppi_temperature: float = 0.5
    mppi_elite: int = 64
    mppi_min_std: float = 0.05
    # Mode-1 policy
    policy_hidden_dim: int = 128
    policy_lr: float = 3e-4
    # The policy trained down the plan energy of its own action as well (a one-step plan: the step's cost, then the
    # value), at this weight beside its imitation of Mode-2's plans: 0 imitates alone. The energy is divided by its
    # spread over the batch, so the weight does not depend on the reward's scale.
    policy_value_weight: float = 0.0


@dataclass
class ConfiguratorConfig:
    # "mode2" (plan every step), "mode1" (the policy alone), or "auto": Mode-1 acts alone while Mode-2 measures
    # its proposals within mode1_gap of its own plans (relative plan energy), and Mode-2 takes back control once
    # the gap passes twice that, measured by a Mode-2 plan every audit_every steps.
    mode: str = "mode2"
    mode1_gap: float = 0.05
    audit_every: int = 10
    # Non-guardrail weight overrides by term name; guardrails cannot be listed here.
    weights: dict[str, float] = field(default_factory=dict)
    # With a goal and a boredom term (inert without one): each step the latent goal distance has not fallen
    # by stall_margin below its best this episode adds 1 / stall_patience to the factor on the boredom
    # weight (0 = off).
    stall_patience: int = 0
    stall_margin: float = 0.25
    # The planning budget: with max_iterations > 0 the configurator sets each plan's Adam steps (gradient planner)
    # from how the last one converged: to one past the last step that lowered the best energy by more than
    # `converged` (relative), between min_iterations and max_iterations, and up by half while the last step still
    # did; it starts at agent.actor.iterations. 0: every plan takes agent.actor.iterations.
    max_iterations: int = 0
    min_iterations: int = 1
    converged: float = 0.01


@dataclass
class EgoModelConfig:
    """A hard-coded model of the agent's own body, known rather than learned.

    kind "point_mass": a robot that accelerates by max_accel * action (norm clipped to 1), keeps
    (1 - drag * dt) of its velocity per step, never exceeds max_speed, and moves dt * velocity; it
    reads its velocity from the observation quantities named in `velocity` and a lidar of distances
    to hazard boundaries, bin k centred on angle 2 pi k / n, from those matching `ranges`.
    """

    kind: str = "none"  # "none" or "point_mass"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class ShieldConfig:
    """Guardrails at the actor's output: an action whose predicted next state breaks a guardrail is
    not sent. It checks the world model's prediction and, where one is declared, the ego model's
    worst case; a violating action is replaced by the planner's lowest-guardrail-cost candidate, or
    by the fallback when none passes the ego model. Active whenever the cost has guardrail terms."""

    enabled: bool = True
    world_model: bool = True  # also check the world model's predicted next state (once it has trained)
    tolerance: float = 0.0  # guardrail cost of a predicted state above which an action is replaced
    fallback: str = "zero"  # "zero": the zero action; "brake": the ego model's hardest stop
    # Add the ego model's guardrail cost of each plan's first action to the plan energy.
    guide_planner: bool = True
    ego: EgoModelConfig = field(default_factory=EgoModelConfig)
    # Look ahead: an action passes only if, after it, every ensemble member of the world model predicts a
    # recovery that keeps every guardrail for recovery_horizon steps; the fallback is the recovery plan's first
    # action. 0: the next state alone is checked.
    recovery_horizon: int = 0
    recovery_iterations: int = 5  # Adam steps on the recovery sequences, on the guardrail cost alone
    recovery_lr: float = 0.3
    recovery_candidates: int = 4  # free recovery sequences per env: the warm start, then constant random levels
    checked_alternatives: int = 3  # the planner's best other first actions checked when the proposal fails
    # The world model is checked once its mean error on fresh real transitions (each scored before it is trained
    # on), over the guardrail quantities in the observation's units, is below trust_error; 0: after its first
    # update. trust_window: how many recent transitions that mean is over.
    trust_error: float = 0.0
    trust_window: int = 200
    # The look-ahead's step t (1..N) must also keep error_band * t times the model's measured error (the 90th
    # percentile over the trust window) inside each bound: a tube around the prediction as wide as the model has
    # been wrong, growing with the steps looked ahead. 0: the prediction alone.
    error_band: float = 0.0
    # Until the model is trusted: within `caution` of a guardrail's bound (its slack, in the quantity's units, on
    # the real observation) actions shrink in proportion; within half of it the recovery action is sent.
    caution: float = 0.0
    recovery_action: list[float] = field(default_factory=list)  # a declared safe action; [] for none
    # Until the world model is trusted the look-ahead can run on a stand-in. "linear": the observation's next
    # value as a linear function of the observation and action, fitted by least squares to the real transitions
    # so far and refit every stand_in_refit of them, with as many bootstrap members as the world model has; used
    # once its own error on fresh transitions is below trust_error. "none": until then, the checks above alone.
    stand_in: str = "none"
    stand_in_refit: int = 20


@dataclass
class LearnerConfig:
    # torch.compile each update's losses with their backward (world model with perception, critic, policy; the
    # reward-free predictor and goal critic): one graph per loss and batch shape, compiled on the first update.
    compile: bool = False


@dataclass
class AgentConfig:
    name: str = "ami"
    perception: PerceptionConfig = field(default_factory=PerceptionConfig)
    world_model: WorldModelConfig = field(default_factory=WorldModelConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    configurator: ConfiguratorConfig = field(default_factory=ConfiguratorConfig)
    shield: ShieldConfig = field(default_factory=ShieldConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)


@dataclass
class TrainConfig:
    # Environments stepped at once (a gymnasium vector env): the agent plans for all of them in one batch. Every
    # count below is in env steps over all of them.
    num_envs: int = 4
    total_steps: int = 3000
    seed_steps: int = 200  # random actions (shielded) before the agent plans
    pretrain_updates: int = 200  # update rounds on the seed data before the agent first acts
    update_every: int = 1  # env steps between update rounds
    updates_per_round: int = 1
    eval_every: int = 500
    eval_episodes: int = 10
    # At each evaluation, one more episode rendered into TensorBoard (eval/video); the env must render rgb_array.
    eval_video: bool = False
    checkpoint_every: int = 1000  # a checkpoint at the first episode end after each multiple (or that many later)
    log_every: int = 100  # env steps between module-loss logs


@dataclass
class RewardFreeConfig:
    """World-model training without any reward: exploratory random actions, perception and world
    model only. `ami train` runs it instead of the agent loop when enabled."""

    enabled: bool = False
    # Random-action transitions collected first (train.num_envs at once; agent.actor.random_hold sets how long
    # each action is held), all kept: agent.memory.capacity must hold them and one final frame per episode.
    transitions: int = 200_000
    updates: int = 4000  # joint updates of encoder and predictor
    # Then the predictor alone on the frozen encoder's latents of the whole dataset, encoded once: many
    # cheap updates on long rollouts, where the joint phase pays for an image encoder at every step.
    predictor_updates: int = 0
    predictor_batch_size: int = 256
    predictor_horizon: int = 16
    # Then the goal critic on the same frozen latents (observations with a goal only): which frames of an
    # episode reach which, in how many steps.
    critic_updates: int = 0
    critic_batch_size: int = 1024
    log_every: int = 250  # updates between scalar logs (latent health, probe)
    picture_every: int = 1000  # updates between planned-trajectory pictures
    checkpoint_every: int = 1000  # updates between checkpoints (each holds the whole dataset)
    # Frames of their own random-action episodes, with the env's true positions (info["position"]), for the
    # linear probe and the nearest-frame bank.
    probe_frames: int = 4000


@dataclass
class RunConfig:
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    # torch CPU threads. 1 is fastest for these small networks (several threads spin against each
    # other and against parallel runs); 0 keeps torch's default.
    threads: int = 1
    runs_dir: str = "runs"
    progress: bool = True
    env: EnvConfig = field(default_factory=EnvConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reward_free: RewardFreeConfig = field(default_factory=RewardFreeConfig)
