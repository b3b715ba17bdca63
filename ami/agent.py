"""The agent: six modules composed by injection, and one step of the perception-action cycle."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from ami.messages import Action, Percept, Plan, Record, Step
from modules.actor import Actor, ActorEpisodes
from modules.configurator import Configurator
from modules.cost import Cost
from modules.ego import LinearStandIn
from modules.memory import EpisodeTrail, ShortTermMemory
from modules.nn import Repairs
from modules.perception import ImagePerception, Perception
from modules.shield import ModelTrust, Shield
from modules.world_model import WorldModel


class Agent:
    """obs -perception-> Percept -configurator-> Task -actor-> Plan -shield-> action, batched over B
    environments; real transitions -intrinsic cost-> terms -memory-> one Record per environment."""

    def __init__(self, perception: Perception | ImagePerception, world_model: WorldModel, cost: Cost,
                 memory: ShortTermMemory, actor: Actor, configurator: Configurator, shield: Shield,
                 device: torch.device, exploration_std: float = 0.0, trail: EpisodeTrail | None = None,
                 repairs: Repairs | None = None, trust: ModelTrust | None = None,
                 stand_in: LinearStandIn | None = None, stand_in_trust: ModelTrust | None = None,
                 stand_in_refit: int = 20) -> None:
        """trail: the short-term memory of this episode's latents, kept when the cost has a boredom term.
        repairs: where every module counts the values it mends (shared with the actor and its planner).
        trust: the world model's measured error on fresh transitions, which decides when the shield checks it.
        stand_in: the model the shield looks ahead with until then, fitted to the real transitions here and refit
        every stand_in_refit of them; stand_in_trust: its own measured error."""
        self.perception = perception
        self.world_model = world_model
        self.cost = cost
        self.memory = memory
        self.actor = actor
        self.configurator = configurator
        self.shield = shield
        self.device = device
        self.exploration_std = exploration_std
        self.trail = trail
        self.repairs = repairs or Repairs()
        self.trust = trust or ModelTrust(1)
        self.stand_in, self.stand_in_trust = stand_in, stand_in_trust or ModelTrust(1)
        self.stand_in_refit, self.stand_in_unfitted = stand_in_refit, 0  # transitions since the last fit
        # The world model's predictions are checked only once it has learned something (and, with a trust bound,
        # once its error on fresh transitions is below it); until then the shield rests on the ego model and the
        # real observation. The learner turns this on with its first update.
        self.world_model_trained = False
        self.recovery: torch.Tensor | None = None  # (N, B, A) the shield's recovery from each env's next state
        names = list(world_model.observation_names)
        self.guardrail_index = torch.tensor([names.index(n) for n in shield.intrinsic_cost.guardrail_quantities],
                                            dtype=torch.long)  # (Q',) where the guardrails read the observation

    # -- one step of the cycle ------------------------------------------------------------------------------
    def act(self, obs: Any, explore: bool = False, random: bool = False,
            generator: torch.Generator | None = None) -> Action:
        """obs: (B, ...) -> the actions to send (B, A) in [-1, 1], and the messages that chose them. random: uniform
        proposals instead of a plan (the seed phase), shielded like any other."""
        percept = self.perceive(obs, with_goal=not random)  # random proposals aim at nothing
        if self.trail is not None:
            self.trail.add(percept.state)
        task = self.configurator.configure(percept, None if self.trail is None else self.trail.view(), random, explore)
        plan = self.actor.act(percept, task, generator)
        self.configurator.report(plan)
        proposed = self._first_action(plan, explore, generator)
        trusted = self.shield.trusts(self.trust, self.world_model_trained)
        stand_in = self.stand_in if not trusted and self.shield.trusts_stand_in(self.stand_in, self.stand_in_trust) \
            else None
        looks_ahead = trusted or stand_in is not None
        warm = self.recovery if looks_ahead and self.recovery is not None \
            and self.recovery.shape[1] == proposed.shape[0] else None
        measured = self.trust if trusted else self.stand_in_trust
        decision = self.shield.filter(percept.observation, proposed, percept.state if trusted else None,
                                      self._alternatives(plan), percept.readout_offset, warm, generator,
                                      measured.quantile(0.9) if looks_ahead and self.shield.error_band else 0.0,
                                      stand_in)
        self.recovery = decision.recovery if looks_ahead else None
        return Action(decision.actions.cpu().numpy(), percept, task, plan, decision,
                      self._predict_guarded(percept, decision.actions))

    @torch.no_grad()
    def _predict_guarded(self, percept: Percept, actions: torch.Tensor) -> torch.Tensor | None:
        """(B, Q') the world model's first member's guardrail quantities after actions: (B, A); None before it has
        trained, without guardrail quantities, or where the shield reads no measured error."""
        if not (self.world_model_trained and self.shield.measures_model and len(self.guardrail_index)):
            return None
        quantities = self.world_model.readout(self.world_model.step(percept.state, actions.to(percept.state.dtype)))
        if percept.readout_offset is not None:
            quantities = quantities + percept.readout_offset
        return quantities[:, self.guardrail_index.to(quantities.device)].cpu()

    def perceive(self, obs: Any, with_goal: bool = True) -> Percept:
        """obs: (B, obs_dim) vectors, (B, H, W, C) images, or a dict of "image" with an optional "goal" image and
        "vector" -> Percept with state (B, D), goal (B, D) when there is one (and with_goal), the, the observation's
        named quantities (B, Q) (an image has none) and the readout offset. The observation crosses to the device
        once here."""
        device = self.device
        with torch.no_grad():
            if not isinstance(obs, Mapping) and np.ndim(obs) != 4:
                quantities = torch.as_tensor(obs, dtype=torch.float32, device=device)
                state, goal = self.perception(quantities), None
            else:
                parts = obs if isinstance(obs, Mapping) else {"image": obs}
                image = torch.as_tensor(parts["image"], device=device)
                vector = torch.as_tensor(parts["vector"], dtype=torch.float32, device=device) \
                    if "vector" in parts else None
                quantities = torch.zeros(image.shape[0], 0, device=device) if vector is None else vector
                state = self.perception(image, vector)
                if "goal" in parts and with_goal:  # the goal is an observation like any other: same encoder, same space
                    goal_vector = None if vector is None else torch.zeros_like(vector)
                    goal = self.perception(torch.as_tensor(parts["goal"], device=device), goal_vector)
                else:
                    goal = None
            if quantities.shape[-1]:
                self.repairs.count("clipped_observations", self.perception.normalizer.repaired(quantities))
            percept = Percept(state, goal, quantities)
            return Percept(state, goal, quantities, self.world_model.readout_offset(percept))

    def _first_action(self, plan: Plan, explore: bool, generator: torch.Generator | None) -> torch.Tensor:
        """(B, A): the plan's first action, with exploration noise while training; whatever the planner produced,
        what goes to the shield is finite and in bounds (a NaN entry is sent as 0, and counted)."""
        action = plan.actions[0].detach()
        if explore and self.exploration_std > 0 and plan.mode != "random":
            action = action + self.exploration_std * torch.randn(action.shape, generator=generator).to(action.device)
        self.repairs.count("nan_actions", ~torch.isfinite(action))
        return torch.nan_to_num(action, nan=0.0).clamp(-1.0, 1.0)

    @staticmethod
    def _alternatives(plan: Plan) -> torch.Tensor:
        """(B, N, A) the plan's candidates' first actions, best first: the shield's replacements."""
        order = plan.candidate_energy.argsort(dim=1)
        first = plan.candidates[0].detach()
        return first.gather(1, order[..., None].expand(-1, -1, first.shape[-1]))

    def observe(self, step: Step) -> Record:
        """Score each environment's real transition with the intrinsic cost and write it to memory. Images are
        stored as they came (uint8), a dict observation as its image and vector (its goal is the task's, not the
        world's); a dropped transition closes its environment's stretch in memory."""
        valid = torch.as_tensor(step.valid)
        obs, vector = storable_observation(step.obs)
        next_obs, next_vector = storable_observation(step.next_obs)
        if vector is not None:
            quantities = vector
        elif obs.dtype == torch.uint8:
            quantities = torch.zeros(obs.shape[0], 0)
        else:
            quantities = obs
        action = torch.as_tensor(step.action.actions, dtype=torch.float32)
        reward = torch.as_tensor(step.reward, dtype=torch.float32)
        terms = self.cost.intrinsic.real_terms(quantities, action, reward, step.info)
        predicted = step.action.predicted
        if predicted is not None and valid.any():  # a transition no model has trained on yet: held out, for now
            real_next = (next_vector if next_vector is not None else next_obs)[:, self.guardrail_index]
            self.trust.record((predicted - real_next.float()).abs().amax(-1)[valid])
        if self.stand_in is not None and valid.any():
            self._fit_stand_in(quantities[valid], action[valid], (next_vector if next_vector is not None
                                                                  else next_obs)[valid].float())
        if quantities.shape[-1] and valid.any():
            self.perception.normalizer.update(quantities[valid])
        percept, plan = step.action.percept, step.action.plan
        record = Record(obs, next_obs, percept.state.detach().cpu(), action, plan.actions[0].detach().cpu(),
                        torch.full_like(valid, plan.mode == "mode2"), reward, terms,
                        torch.as_tensor(step.terminated), torch.as_tensor(step.truncated),
                        plan.energy_after.detach().float().cpu(), torch.as_tensor(step.episode),
                        torch.as_tensor(step.env_step), vector, next_vector)
        self.memory.write(record, valid)
        if step.dropped.any():
            self.memory.end_segments(torch.as_tensor(step.dropped), obs, vector)
        return record

    def _fit_stand_in(self, quantities: torch.Tensor, actions: torch.Tensor, next_quantities: torch.Tensor) -> None:
        """(n, Q), (n, A), (n, Q) fresh real transitions: scored by the stand-in before it sees them (its trust),
        then kept, and the stand-in refit every stand_in_refit of them."""
        stand_in = self.stand_in
        if stand_in.fitted:
            index = self.guardrail_index
            predicted = stand_in.predict(quantities, actions)[:, index]
            self.stand_in_trust.record((predicted - next_quantities[:, index]).abs().amax(-1))
        stand_in.add(quantities, actions, next_quantities)
        self.stand_in_unfitted += len(quantities)
        if not stand_in.fitted or self.stand_in_unfitted >= self.stand_in_refit:
            stand_in.fit()
            self.stand_in_unfitted = 0 if stand_in.fitted else self.stand_in_unfitted

    # -- episodes ------------------------------------------------------------------------------------------
    def reset(self, done: torch.Tensor | np.ndarray | None = None) -> None:
        """A new episode, everywhere or where done: (B,) is True: no warm start, no trail, no stall."""
        done = None if done is None else torch.as_tensor(done)
        self.actor.reset(done)
        self.configurator.reset(done)
        if self.recovery is not None:
            self.recovery = None if done is None else torch.where(done.to(self.recovery.device)[None, :, None],
                                                                  0.0, self.recovery)
        if self.trail is not None:
            self.trail.reset(done)

    @contextmanager
    def fresh_episodes(self) -> Iterator[None]:
        """Act in episodes of their own (evaluation beside a training episode): no warm start, held plan, trail
        or stall count of the training episodes, which get theirs back afterwards, untouched."""
        saved = self.actor.episodes, self.configurator.state, self.trail, self.recovery
        self.actor.episodes = ActorEpisodes()
        self.configurator.state = self.configurator.state.fresh_episodes()
        self.trail = None if self.trail is None else self.trail.fresh()
        self.recovery = None
        try:
            yield
        finally:
            self.actor.episodes, self.configurator.state, self.trail, self.recovery = saved


def storable_observation(obs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An observation batch as memory keeps it: (the vector or image, a dict observation's vector or None)."""
    if isinstance(obs, Mapping):
        vector = obs.get("vector")
        return torch.as_tensor(obs["image"]), None if vector is None else torch.as_tensor(vector, dtype=torch.float32)
    obs = np.asarray(obs)
    return torch.as_tensor(obs) if obs.dtype == np.uint8 else torch.as_tensor(obs, dtype=torch.float32), None
