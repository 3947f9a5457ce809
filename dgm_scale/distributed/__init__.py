"""Distributed glue: launcher environment and strategies (one place for all of it)."""
from dgm_scale.distributed.env import LaunchEnv, launch_env, share_run_dir
from dgm_scale.distributed.strategy import STRATEGIES, GradientAllReduceDDP, all_reduce_gradients, build_strategy

__all__ = ["GradientAllReduceDDP", "LaunchEnv", "STRATEGIES", "all_reduce_gradients", "build_strategy",
           "launch_env", "share_run_dir"]
