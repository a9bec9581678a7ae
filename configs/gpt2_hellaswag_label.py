"""
Choice rollouts rewarded by the gold label (1 for the right ending, 0 otherwise): the simplest RL
signal on HellaSwag's train split, and no reward model to load.
    torchrun --standalone --nproc_per_node=8 train_ppo.py configs/gpt2_hellaswag_label.py
"""
out_dir = "out/gpt2_hellaswag_label"
init_from = "gpt2"
rollout = "choice"
reward_kind = "label"
batch_size = 64
minibatch_size = 32
micro_batch_size = 16
ppo_epochs = 2
learning_rate = 1e-5
warmup_steps = 10
kl_coef = 0.05
vf_coef = 0.1
max_steps = 300
eval_interval = 25
eval_batch_size = 64
checkpoint_interval = 50
sample_interval = 25
# advantages: GAE over the value head (the default). To try (not measured at this size):
# adv_estimator = "expected" (the exact expected reward over the 4 endings as the baseline, no value
# head) and kl_estimator = "exact" (the KL over the 4 endings, in the loss)
