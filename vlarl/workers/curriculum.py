"""Task curriculum: pick which LIBERO tasks (and init states) to roll out next.

Tasks the policy solves about half the time carry the most learning signal: a task that always
fails or always succeeds gives GRPO groups with zero advantage and PPO little to correct. So the
manager keeps an exponential moving average (EMA) of each task's success rate and samples tasks
with weight 4 * s * (1 - s), mixed with a floor so no task is ever starved (its EMA could be stale).

An arm is one task id; on a mixture of LIBERO suites (env.train_suites) the ids enumerate (suite,
task) pairs, so each has its own EMA, and `arm_names` ("libero_spatial/3") label them in the state
and on the dashboard.

This is a plain Python class, testable without Ray. The trainer makes it an actor at the call
site: `ray.remote(num_cpus=0)(CurriculumManager).remote(...)`.

Sampling is a pure function of (seed, iteration, EMA state): there is no hidden RNG state, so a
run resumed at iteration k from `state_dict()` draws exactly what an uninterrupted run would have.
"""

from __future__ import annotations

import numpy as np

# Added to every weight so that all-solved or all-failed EMAs (all weights 0) still normalise.
_EPS = 1e-6
# EMA value for a task never reported: the prior "coin flip" gives it the highest weight,
# so unseen tasks are tried early.
_UNSEEN_EMA = 0.5


class CurriculumManager:
    """Per-task success EMAs and the sampling distribution derived from them."""

    def __init__(
        self,
        num_tasks: int,
        num_init_states: int,
        ema_alpha: float = 0.9,
        floor_prob: float = 0.02,
        seed: int = 0,
        arm_names: list[str] | None = None,
    ) -> None:
        """Validate the configuration and start every task at the unseen EMA of 0.5."""
        if num_tasks < 1:
            raise ValueError(f"num_tasks is {num_tasks}; set it to the number of tasks in the suite (at least 1).")
        if num_init_states < 1:
            raise ValueError(
                f"num_init_states is {num_init_states}; set it to the number of init states per task (at least 1)."
            )
        if not 0.0 <= ema_alpha < 1.0:
            raise ValueError(f"ema_alpha is {ema_alpha}; choose a value in [0, 1) (0.9 is a good default).")
        if floor_prob < 0.0 or floor_prob * num_tasks > 1.0:
            raise ValueError(
                f"floor_prob={floor_prob} with {num_tasks} tasks gives a total floor of {floor_prob * num_tasks:.3g} "
                f"> 1; set floor_prob to at most 1/num_tasks = {1.0 / num_tasks:.3g}."
            )
        if arm_names is not None and len(arm_names) != num_tasks:
            raise ValueError(f"{len(arm_names)} arm names for {num_tasks} tasks; name every task once.")
        # Config is kept as plain values so state_dict() is JSON-able and load can check it matches.
        self.num_tasks = int(num_tasks)  # number of tasks the ids index into: 0 .. num_tasks-1
        self.num_init_states = int(num_init_states)  # init-state ids per task: 0 .. num_init_states-1
        self.ema_alpha = float(ema_alpha)  # weight kept by the old EMA on each report
        self.floor_prob = float(floor_prob)  # minimum sampling probability of every task
        self.seed = int(seed)  # combined with the iteration to seed each draw
        self.arm_names = [str(n) for n in arm_names] if arm_names is not None else [str(t) for t in range(num_tasks)]
        self._ema = [_UNSEEN_EMA] * self.num_tasks  # success EMA per task, in [0, 1]
        self._counts = [0] * self.num_tasks  # episodes reported per task (for stats and debugging)

    def probs(self) -> np.ndarray:
        """Sampling probabilities (num_tasks,), summing to 1, each at least floor_prob."""
        ema = np.asarray(self._ema, dtype=np.float64)  # (num_tasks,)
        # 4 s (1 - s) peaks at 1 for s = 0.5 and is 0 at s in {0, 1}: favour tasks at the frontier.
        weights = 4.0 * ema * (1.0 - ema) + _EPS  # (num_tasks,)
        spread = 1.0 - self.num_tasks * self.floor_prob  # mass left after every task's floor
        probs = self.floor_prob + spread * weights / weights.sum()
        # Renormalise away float rounding so rng.choice accepts it.
        return probs / probs.sum()

    def sample(self, iteration: int, num_groups: int, group_size: int) -> tuple[list[int], list[int]]:
        """Draw num_groups (task, init state) pairs, each repeated group_size times consecutively.

        Returns (task_ids, init_state_ids), both of length num_groups * group_size. GRPO normalises
        advantages within a group, so a group's episodes must share task and init state and sit
        next to each other.
        """
        if iteration < 0:
            raise ValueError(f"iteration is {iteration}; pass the trainer's iteration counter (0 or more).")
        if num_groups < 1 or group_size < 1:
            raise ValueError(
                f"num_groups={num_groups}, group_size={group_size}; both must be at least 1 (check the rollout config)."
            )
        # Seeding from (seed, iteration) rather than a stored Generator makes a resumed run
        # reproduce the uninterrupted one given the same EMA state.
        rng = np.random.default_rng((self.seed, int(iteration)))
        tasks = rng.choice(self.num_tasks, size=num_groups, p=self.probs())  # (num_groups,)
        inits = rng.integers(0, self.num_init_states, size=num_groups)  # (num_groups,)
        task_ids = [int(t) for t in tasks for _ in range(group_size)]
        init_state_ids = [int(i) for i in inits for _ in range(group_size)]
        return task_ids, init_state_ids

    def report(self, task_ids: list[int], successes: list[float]) -> None:
        """Fold one batch of episode outcomes into the per-task EMAs.

        Successes are averaged per task first, so a task with many episodes in the batch moves
        its EMA once (by its batch mean), not once per episode.
        """
        if len(task_ids) != len(successes):
            raise ValueError(
                f"report got {len(task_ids)} task ids and {len(successes)} successes; pass one success per episode."
            )
        sums: dict[int, float] = {}
        counts: dict[int, int] = {}
        for task, success in zip(task_ids, successes):
            task = int(task)
            if not 0 <= task < self.num_tasks:
                raise ValueError(f"task id {task} is outside 0..{self.num_tasks - 1}; report ids returned by sample().")
            sums[task] = sums.get(task, 0.0) + float(success)
            counts[task] = counts.get(task, 0) + 1
        for task, total in sums.items():
            batch_mean = total / counts[task]
            self._ema[task] = self.ema_alpha * self._ema[task] + (1.0 - self.ema_alpha) * batch_mean
            self._counts[task] += counts[task]

    def success_ema(self) -> list[float]:
        """Current per-task success EMAs (a copy), e.g. for per-task logging."""
        return list(self._ema)

    def stats(self) -> dict[str, float]:
        """Scalar metrics for the logger, namespaced curriculum/."""
        probs = self.probs()
        return {
            "curriculum/min_success_ema": float(min(self._ema)),
            "curriculum/mean_success_ema": float(np.mean(self._ema)),
            "curriculum/max_success_ema": float(max(self._ema)),
            "curriculum/min_prob": float(probs.min()),
            "curriculum/max_prob": float(probs.max()),
            "curriculum/tasks_seen": float(sum(1 for c in self._counts if c > 0)),
        }

    def task_stats(self) -> dict[str, list]:
        """Per task: its name, sampling probability and success EMA (for the dashboard)."""
        return {"names": list(self.arm_names), "prob": self.probs().tolist(),
                "success_ema": [float(e) for e in self._ema]}

    def state_dict(self) -> dict:
        """JSON-able state: EMAs, episode counts and the config they were built under."""
        return {
            "ema": list(self._ema),
            "counts": list(self._counts),
            "arms": list(self.arm_names),
            "config": {
                "num_tasks": self.num_tasks,
                "num_init_states": self.num_init_states,
                "ema_alpha": self.ema_alpha,
                "floor_prob": self.floor_prob,
                "seed": self.seed,
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore EMAs and counts saved by state_dict(); the tasks (and their names, when saved) must match."""
        ema, counts = list(state["ema"]), list(state["counts"])
        if len(ema) != self.num_tasks or len(counts) != self.num_tasks:
            raise ValueError(
                f"curriculum state has {len(ema)} tasks but this run has {self.num_tasks}; "
                "resume with the same task suite or start a fresh run."
            )
        if "arms" in state and list(state["arms"]) != self.arm_names:
            differ = [f"{a} -> {b}" for a, b in zip(state["arms"], self.arm_names) if a != b][:3]
            raise ValueError(f"curriculum state's tasks differ from this run's ({', '.join(differ)}); resume with the "
                             "same env.name / env.train_suites order or start a fresh run.")
        # The current config (e.g. a changed floor_prob) wins; only the learned statistics load.
        self._ema = [float(v) for v in ema]
        self._counts = [int(c) for c in counts]
