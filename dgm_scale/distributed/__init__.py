"""Distributed glue: launcher environment, strategies and what modules ask of them (one place)."""
from dgm_scale.distributed.env import LaunchEnv, launch_env, share_run_dir
from dgm_scale.distributed.interface import StepInterface, step_interface
from dgm_scale.distributed.strategy import STRATEGIES, GradientAllReduceDDP, all_reduce_gradients, build_strategy

__all__ = ["GradientAllReduceDDP", "LaunchEnv", "STRATEGIES", "StepInterface", "all_reduce_gradients",
           "build_strategy", "launch_env", "share_run_dir", "step_interface"]
