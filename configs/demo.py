"""
Offline demo, CPU, a few minutes on 2 cores: a tiny policy built from scratch learns the synthetic colour task
(synthetic.py) from a tiny GPT-Neo teacher loaded through reward.py. Accuracy on the synthetic val split should
climb from chance (~0.25) to above 0.8 while the reward rises and the KL stays bounded.
    python train_ppo.py configs/demo.py
"""
out_dir = "out/demo"
init_from = "scratch"
n_layer = 2
n_head = 2
n_embd = 64
block_size = 64
synthetic = True
device = "cpu"
rollout = "choice"
reward_kind = "teacher"
teacher_temperature = 0.25
batch_size = 64
minibatch_size = 32
micro_batch_size = 32
ppo_epochs = 2
learning_rate = 3e-3
kl_coef = 0.01
vf_coef = 0.5
max_steps = 60
eval_interval = 10
eval_batch_size = 64
checkpoint_interval = 30
sample_interval = 10
