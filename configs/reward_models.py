"""
The runs of benchmarks/reward_models.py, CPU: a small GPT (4 layers, 128 wide) pretrained by that
script on real HellaSwag text learns HellaSwag's multiple choice from a reward: the gold label, or a
judge's (the teacher's) probability of the chosen ending. The script sets init_from, train_data,
val_data, reward_kind, reward_model, teacher_cache, seed and out_dir; the rest is here, the same
for every reward.
    python benchmarks/reward_models.py --data hellaswag_val.jsonl
"""
device = "cpu"
rollout = "choice"
reward_kind = "teacher"
teacher_mode = "prob"
teacher_temperature = 0.25  # the judges' normalised ending scores differ by tenths of a nat
batch_size = 64
minibatch_size = 16
micro_batch_size = 16
ppo_epochs = 2  # two passes a step: the whole comparison in about two hours on a 2-core CPU
learning_rate = 3e-4
target_kl = 0.2  # end a step's PPO epochs early when the policy moved this far
kl_coef = 0.01
vf_coef = 0.5
max_steps = 30
eval_interval = 10
eval_limit = 0  # the whole held-out subset
eval_batch_size = 64
checkpoint_interval = 30
sample_interval = 10
export_hf = False
