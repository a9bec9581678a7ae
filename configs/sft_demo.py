"""
Offline demo of supervised fine-tuning, CPU, about a minute on 2 cores: the demo task's starting
policy (synthetic.py) learns the colour rule from the gold labels, the 4-way cross-entropy over its
choice scores. Accuracy on the synthetic val split should climb from chance (~0.25) to above 0.8.
    python train_sft.py configs/sft_demo.py
"""
out_dir = "out/sft_demo"
init_from = "synthetic"
synthetic = True
device = "cpu"
batch_size = 32
minibatch_size = 8  # 4 optimizer steps a step
micro_batch_size = 8
learning_rate = 3e-3
lr_decay_steps = 30
min_lr = 3e-4
max_steps = 30
eval_interval = 10
eval_batch_size = 64
checkpoint_interval = 10
sample_interval = 10
