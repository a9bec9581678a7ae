"""
Offline demo, CPU, a few minutes on 2 cores: a tiny GPT that knows the format of the synthetic
colour task (synthetic.py) but not its rule learns the rule from a tiny GPT-Neo teacher loaded
through reward.py. Accuracy on the synthetic val split should climb from chance (~0.25) to above 0.8
while the reward rises and the KL stays bounded.
    python train_ppo.py configs/demo.py
"""
out_dir = "out/demo"
init_from = "synthetic"
synthetic = True
device = "cpu"
rollout = "choice"
reward_kind = "teacher"
teacher_temperature = 0.25
batch_size = 64
minibatch_size = 16
micro_batch_size = 16
ppo_epochs = 4
learning_rate = 1e-3
lr_decay_steps = 40  # cosine to min_lr: calmer updates once the rule is learned
min_lr = 1e-4
target_kl = 0.2  # end a step's PPO epochs early when the policy moved this far
kl_coef = 0.01
vf_coef = 0.5
max_steps = 40
eval_interval = 10
eval_batch_size = 64
checkpoint_interval = 20
sample_interval = 10
