"""Environments. `make_env` is the registry: the name in `env.name` picks the implementation, which
is imported only when asked for (LIBERO pulls in MuJoCo and robosuite)."""

from __future__ import annotations


def make_env(env_cfg, num_envs: int, seed: int):
    """Build the vectorised environment named by `env_cfg.name`."""
    if env_cfg.name == "toy":
        from vlarl.envs.toy import ToyEnv, ToySpec

        spec = ToySpec(
            num_colours=env_cfg.num_tasks, num_blocks=env_cfg.num_blocks, grid=env_cfg.grid,
            image_size=env_cfg.image_size, max_steps=env_cfg.max_steps, max_move=env_cfg.max_move,
            success_radius=env_cfg.success_radius, num_init_states=env_cfg.num_init_states,
        )
        if env_cfg.action_chunk == 1:
            return ToyEnv(num_envs, spec, seed)
        from vlarl.envs.chunk import ChunkedEnv

        return ChunkedEnv(ToyEnv(num_envs, spec, seed), env_cfg.action_chunk, env_cfg.replan_steps)
    from vlarl.envs.libero import LiberoEnv, LiberoSpec

    spec = LiberoSpec(
        suite=env_cfg.name, num_tasks=env_cfg.num_tasks, num_init_states=env_cfg.num_init_states,
        max_steps=env_cfg.max_steps, action_chunk=env_cfg.action_chunk, replan_steps=env_cfg.replan_steps,
        camera_size=env_cfg.camera_size,
        image_size=env_cfg.image_size, settle_steps=env_cfg.settle_steps, wrist_camera=env_cfg.wrist_camera,
        invert_gripper=env_cfg.invert_gripper, step_timeout=env_cfg.step_timeout,
        reset_timeout=env_cfg.reset_timeout, sim_cache=env_cfg.sim_cache, render=env_cfg.render,
        suites=tuple(env_cfg.train_suites),
    )
    return LiberoEnv(num_envs, spec, seed)
