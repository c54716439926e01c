# A baby GPT on Shakespeare's characters, picked for the machine it runs on:
# nanoGPT's GPU recipe (6x384, block 256, ~3 min on an A100) when CUDA is there, else
# nanoGPT's published CPU recipe (4x128, block 64, ~best val 1.88 in a few minutes),
# because the GPU recipe takes hours per hundred iterations on a laptop CPU.
import sys

import torch

_gpu = torch.cuda.is_available() and not any(a.startswith("--device=cpu") for a in sys.argv)
print(f"config/train_shakespeare_char.py: {'GPU' if _gpu else 'CPU'} recipe "
      f"({'6 layers x 384, block 256, 5000 iters' if _gpu else '4 layers x 128, block 64, 2000 iters'})")

out_dir = "out-shakespeare-char"
eval_interval = 250  # evaluations are cheap here and the run overfits, so watch val often
eval_iters = 200
log_interval = 10
always_save_checkpoint = False  # keep best.pt (best val) for sampling; ckpt.pt still resumes
wandb_log = False
wandb_project = "shakespeare-char"
wandb_run_name = "mini-gpt"
dataset = "shakespeare_char"
gradient_accumulation_steps = 1
learning_rate = 1e-3  # a small network can take a large step
min_lr = 1e-4
beta2 = 0.99  # few tokens per iteration, so a longer second-moment average
# nanoGPT's model for this recipe: no biases (its train.py default) and exact GELU (nn.GELU),
# which torch 2.13 computes 5x faster than GPT-2's tanh GELU on CPU
bias = False
mlp = "gelu_exact"
warmup_iters = 100

if _gpu:
    batch_size, block_size = 64, 256
    n_layer, n_head, n_embd, dropout = 6, 6, 384, 0.2
    max_iters = lr_decay_iters = 5000
else:
    # 1,200 eval windows: with nanoGPT's 240 (eval_iters=20) the val loss moves by about
    # +-0.02 with the windows drawn; 5 evals of 100 batches cost ~10 s of a ~65 s run here
    eval_interval, eval_iters = 500, 100
    log_interval = 1
    batch_size, block_size = 12, 64
    n_layer, n_head, n_embd, dropout = 4, 4, 128, 0.0
    max_iters = lr_decay_iters = 2000
