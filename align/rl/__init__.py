"""PPO-for-RLHF math as small pure torch functions (CleanRL style).

functional: masked statistics, log-probs, entropy; rollout: stop-token truncation and penalty;
kl: per-token KL estimators and KL controllers; rewards: per-token rewards; gae: advantages and
returns; losses: clipped policy and value losses. Conventions: docs/ppo-notes.md.
"""
