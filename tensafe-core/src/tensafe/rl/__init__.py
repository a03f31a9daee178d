"""Reinforcement learning with verifiable rewards (RLVR), on any ML backend with policy losses.

:mod:`tensafe.rl.rewards` holds the built-in reward functions and their
resolution, :mod:`tensafe.rl.rollouts` rollouts and advantages,
:mod:`tensafe.rl.loop` the REINFORCE/PPO step, and :mod:`tensafe.rl.privacy`
how DP-RLVR is clipped and accounted. The orchestrator runs it for
``mode: rlvr``.
"""
