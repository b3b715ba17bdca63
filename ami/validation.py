"""The checks a run's configuration gets once the schema has typed it: choices, ranges, and cost terms and weights
that agree with each other. Each error names the key, the value and what was expected."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration value that the schema accepts but the framework cannot use."""


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: expected one of {list(allowed)}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key}={value!r}: expected a positive number")


def validate(cfg: DictConfig) -> None:
    """Checks the schema cannot express: choices, ranges, and consistent cost terms."""
    a = cfg.agent
    _choice("agent.perception.target", a.perception.target, ("ema", "stopgrad"))
    _choice("agent.actor.planner", a.actor.planner, ("gradient", "mppi"))
    _choice("agent.cost.goal.metric", a.cost.goal.metric, ("l2", "squared", "critic"))
    if not 0 < a.cost.goal.critic_discount < 1:
        raise ConfigError(f"agent.cost.goal.critic_discount={a.cost.goal.critic_discount!r}: expected a number "
                          "in (0, 1)")
    if not 0 < a.cost.goal.critic_expectile < 1:
        raise ConfigError(f"agent.cost.goal.critic_expectile={a.cost.goal.critic_expectile!r}: expected a "
                          "number in (0, 1)")
    _choice("agent.configurator.mode", a.configurator.mode, ("mode1", "mode2", "auto"))
    _choice("env.nonfinite", cfg.env.nonfinite, ("error", "skip"))
    if a.configurator.mode1_gap < 0:
        raise ConfigError(f"agent.configurator.mode1_gap={a.configurator.mode1_gap!r}: expected a relative energy "
                          "gap >= 0")
    if not 0 <= a.cost.value_weight <= 1:
        raise ConfigError(f"agent.cost.value_weight={a.cost.value_weight!r}: expected a number in [0, 1] (the "
                          "share of the last state's price that the critic's value gives)")
    if a.actor.random_hold < 1:
        raise ConfigError(f"agent.actor.random_hold={a.actor.random_hold!r}: expected a mean of at least 1 step")
    if a.configurator.stall_patience < 0:
        raise ConfigError(f"agent.configurator.stall_patience={a.configurator.stall_patience}: expected steps >= 0 "
                          "(0 turns the stall rule off)")
    budget = a.configurator
    if budget.max_iterations < 0 or budget.min_iterations < 1 or budget.converged < 0:
        raise ConfigError(f"agent.configurator.max_iterations={budget.max_iterations}, min_iterations="
                          f"{budget.min_iterations}, converged={budget.converged}: expected max_iterations >= 0 (0: "
                          "a fixed budget), min_iterations >= 1 and converged >= 0")
    if a.actor.compile_plan and (a.actor.planner != "gradient" or budget.max_iterations):
        raise ConfigError(f"agent.actor.compile_plan=true with agent.actor.planner={a.actor.planner!r} and "
                          f"agent.configurator.max_iterations={budget.max_iterations}: the whole-plan graph is the "
                          "gradient planner's at a fixed iteration count (planner gradient, max_iterations 0); a "
                          "budget that moves the count would compile one graph per count")
    if budget.max_iterations and not budget.min_iterations <= a.actor.iterations <= budget.max_iterations:
        raise ConfigError(f"agent.actor.iterations={a.actor.iterations}: the planning budget starts there, so it "
                          f"must lie in agent.configurator.min_iterations..max_iterations = "
                          f"{budget.min_iterations}..{budget.max_iterations}")
    if a.configurator.stall_margin < 0:
        raise ConfigError(f"agent.configurator.stall_margin={a.configurator.stall_margin}: expected a latent "
                          "distance >= 0")
    _choice("agent.shield.fallback", a.shield.fallback, ("zero", "brake"))
    _choice("agent.shield.ego.kind", a.shield.ego.kind, ("none", "point_mass"))
    _choice("agent.shield.stand_in", a.shield.stand_in, ("none", "linear"))
    _choice("agent.world_model.z_kind", a.world_model.z_kind, ("gaussian", "discrete"))
    if a.world_model.z_kind == "discrete" and a.world_model.z_dim == 1:
        raise ConfigError("agent.world_model.z_dim=1 with z_kind='discrete' is one class, a z that says nothing: "
                          "expected 0 (none) or at least 2 classes")
    if a.shield.stand_in != "none" and not a.shield.recovery_horizon:
        raise ConfigError(f"agent.shield.stand_in={a.shield.stand_in!r} stands in for the world model in the "
                          "look-ahead; set agent.shield.recovery_horizon > 0")
    if a.shield.fallback == "brake" and a.shield.ego.kind == "none":
        raise ConfigError("agent.shield.fallback='brake' needs an ego model that knows how to stop; "
                          "set agent.shield.ego.kind (e.g. point_mass) or use fallback=zero")
    for key in ("tolerance", "recovery_horizon", "trust_error", "caution", "checked_alternatives", "error_band"):
        if a.shield[key] < 0:
            raise ConfigError(f"agent.shield.{key}={a.shield[key]!r}: expected a number >= 0")
    if a.shield.recovery_horizon:
        for key in ("recovery_iterations", "recovery_lr", "recovery_candidates"):
            _positive(f"agent.shield.{key}", a.shield[key])
    if any(not -1 <= value <= 1 for value in a.shield.recovery_action):
        raise ConfigError(f"agent.shield.recovery_action={list(a.shield.recovery_action)}: expected actions in "
                          "[-1, 1] (the env's bounds are mapped there)")
    for key in ("agent.actor.screen_samples", "reward_free.predictor_updates", "reward_free.critic_updates",
                "agent.cost.boredom_weight", "agent.cost.imagined_horizon", "agent.cost.value_pessimism",
                "agent.cost.value_optimism", "agent.actor.policy_value_weight", "agent.world_model.z_dim",
                "agent.world_model.z_weight"):
        if OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)!r}: expected a number >= 0 (0 turns it off)")
    for key in ("agent.perception.latent_dim", "agent.perception.conv_layers", "agent.perception.conv_channels",
                "agent.actor.horizon", "agent.actor.iterations",
                "agent.actor.candidates", "agent.world_model.batch_size",
                "agent.world_model.rollout_horizon", "agent.memory.capacity", "agent.memory.trail_capacity",
                "agent.memory.trail_every",
                "agent.cost.boredom_radius",
                "train.total_steps", "train.eval_episodes", "train.update_every", "train.num_envs",
                "train.eval_every", "train.checkpoint_every", "train.log_every", "agent.configurator.audit_every",
                "agent.actor.replan_every", "agent.actor.fresh_segments",
                "reward_free.transitions", "reward_free.updates",
                "reward_free.predictor_batch_size", "reward_free.predictor_horizon",
                "reward_free.critic_batch_size",
                "reward_free.log_every", "reward_free.picture_every", "reward_free.checkpoint_every",
                "reward_free.probe_frames", "env.image_size", "env.frame_stack", "env.action_repeat",
                "agent.cost.value_ensemble",
                "agent.world_model.ensemble_size",
                "agent.shield.trust_window", "agent.shield.stand_in_refit"):
        _positive(key, OmegaConf.select(cfg, key))
    if not 0 < a.cost.discount <= 1:
        raise ConfigError(f"agent.cost.discount={a.cost.discount!r}: expected a number in (0, 1]")
    if not 0 <= a.cost.imagined_lambda <= 1:
        raise ConfigError(f"agent.cost.imagined_lambda={a.cost.imagined_lambda!r}: expected a number in [0, 1]")
    if a.cost.imagined_horizon and a.cost.discount == 1:
        raise ConfigError(f"agent.cost.imagined_horizon={a.cost.imagined_horizon!r} trains the value, which needs "
                          "agent.cost.discount < 1")
    if a.cost.termination_cost and a.cost.discount == 1:
        raise ConfigError(f"agent.cost.termination_cost={a.cost.termination_cost!r} needs "
                          "agent.cost.discount < 1 (the cost is paid forever after termination)")
    if a.cost.value_weight and a.cost.discount == 1:
        raise ConfigError(f"agent.cost.value_weight={a.cost.value_weight!r} needs agent.cost.discount < 1: with "
                          "discount 1 an endless episode has no finite value to price a plan's end with; set "
                          "agent.cost.value_weight=0")
    if a.cost.value_optimism and (a.cost.value_ensemble < 2 or not a.cost.value_weight):
        raise ConfigError(f"agent.cost.value_optimism={a.cost.value_optimism!r} rewards the value heads' spread, which "
                          "needs agent.cost.value_ensemble >= 2 and agent.cost.value_weight > 0 (got "
                          f"{a.cost.value_ensemble} and {a.cost.value_weight})")
    names, guardrails = set(), set()
    for i, term in enumerate(a.cost.terms):
        key = f"agent.cost.terms[{i}]"
        _choice(f"{key}.kind", term.kind, ("analytic", "measured"))
        if term.name in names:
            raise ConfigError(f"{key}.name={term.name!r}: duplicate term name")
        names.add(term.name)
        if term.guardrail and term.kind != "analytic":
            raise ConfigError(f"{key}.guardrail=True: guardrails must be analytic terms")
        if term.guardrail:
            guardrails.add(term.name)
    for name in a.configurator.weights:
        if name not in names:
            raise ConfigError(f"agent.configurator.weights.{name}: no cost term of that name; "
                              f"expected one of {sorted(names)}")
        if name in guardrails:
            raise ConfigError(f"agent.configurator.weights.{name}: {name!r} is a guardrail; its weight "
                              "is fixed and the configurator cannot set it")
