"""The trainer's parts: rollouts, teacher scoring, advantages, λ, the learner, checkpoints, evaluation."""
