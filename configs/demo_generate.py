"""
Offline demo of generate rollouts, CPU, 4-5 minutes on 2 cores: the tiny GPT policy of the
synthetic colour task (synthetic.py) writes continuations of its contexts ("Everyone knows that the
snow is" -> " white."), and the tiny GPT-Neo teacher, as judge, scores them (mean log-prob per
token). Each token gets its share of the score (dense rewards); scores are whitened with running
statistics, so the logged reward is in standard deviations and train/judge_score is the judge's raw
mean log-prob. The policy learns the colour rule: eval acc_norm climbs from about 0.28 and, on most
seeds, holds while the KL to the reference stays bounded (docs/results.md, "Training demos").
    python train_ppo.py configs/demo_generate.py
"""
out_dir = "out/demo_generate"
init_from = "synthetic"
synthetic = True
device = "cpu"
rollout = "generate"
reward_kind = "likelihood"
likelihood_dense = True
reward_normalize = True
max_new_tokens = 4  # a colour and a full stop
batch_size = 64
minibatch_size = 16
micro_batch_size = 16
ppo_epochs = 4
learning_rate = 5e-4  # 1e-3 learned no faster and let the KL spike higher
target_kl = 0.2  # end a step's PPO epochs once the policy moved this far
kl_coef = 0.1  # 0.01 let the policy drift into padding or a single colour
vf_coef = 0.5
max_steps = 240  # the judge's score makes half its gain by step 30-56 (docs/results.md)
eval_interval = 10
eval_limit = 100
checkpoint_interval = 60
sample_interval = 10
