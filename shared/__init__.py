"""Plumbing shared by the algorithm scripts: launch, DeepSpeed, data, rollout, rewards, logging.

No algorithm math lives here: losses, advantages and reward shaping stay in the scripts that use them.
"""
