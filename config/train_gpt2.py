# GPT-2 (124M) on OpenWebText on one node of 8 GPUs, as nanoGPT:
#   python data/openwebtext/prepare.py
#   torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
# ~0.5M tokens per step (12 sequences x 1024 tokens x 40 micro-steps over 8 GPUs);
# reaches a val loss of ~2.85 in ~600k steps.
wandb_log = False  # nanoGPT turns this on; set True after `wandb login`
wandb_project = "owt"
wandb_run_name = "gpt2-124M"
dataset = "openwebtext"
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8
max_iters = 600000
lr_decay_iters = 600000
eval_interval = 1000
eval_iters = 200
log_interval = 10
weight_decay = 1e-1
