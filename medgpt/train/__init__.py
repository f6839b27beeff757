"""Training machinery under the stages (layer: train; imports data, model, args, utils/config).

run.py         the run lifecycle every trainer stage shares: output dir, seed, logging, checkpoints, resume, artifacts
ppo.py         our PPO trainer (TRL dropped it): rollouts, GAE, clipped policy and value losses
preference.py  the trainer of ORPO and SimPO (reference-free preference losses; rows from data/pairs.py)
rewards.py     the reward model wrapper and the rule rewards of grpo/rloo/ppo
losses.py      the pure loss functions (ORPO, SimPO, PPO pieces), checked against hand-computed values
online.py      the recipe GRPO and RLOO share (prompts, reward sources, policy, TRL trainer, save)
checkpoint.py  the checkpoint and loop kit of our own loops (pretrain, ppo): checkpoint-N, RNGs, rotation, resume
"""
