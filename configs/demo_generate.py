"""
Offline demo of generate rollouts, CPU, a few minutes on 2 cores: the tiny GPT policy of the synthetic colour task
(synthetic.py) writes continuations of its contexts ("Everyone knows that the snow is" -> " white."), and the tiny
GPT-Neo teacher, as judge, scores them (mean log-prob per token). The judge's reward should rise and stay up
while the KL to the reference stays bounded. Sparse rewards (the score at the last token); dense per-token shares
(--likelihood_dense=True) did worse here on 3 seeds (README, "The generate demo").
    python train_ppo.py configs/demo_generate.py
"""
out_dir = "out/demo_generate"
init_from = "synthetic"
synthetic = True
device = "cpu"
rollout = "generate"
reward_kind = "likelihood"
likelihood_dense = False
reward_normalize = False  # the raw mean log-prob is already of order 1, and its curve reads directly
max_new_tokens = 4  # a colour and a full stop
batch_size = 32
minibatch_size = 8
micro_batch_size = 8
ppo_epochs = 4
learning_rate = 5e-4
target_kl = 0.05  # end a step's PPO epochs once the policy moved this far
kl_coef = 0.01
max_steps = 40
eval_interval = 10
eval_limit = 100
checkpoint_interval = 40
sample_interval = 5
