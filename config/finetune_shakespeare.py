# Fine-tune OpenAI's GPT-2 XL on Shakespeare (GPT-2 BPE):
#   python data/shakespeare/prepare.py && python train.py config/finetune_shakespeare.py
# Use init_from='gpt2' (124M) on a small machine, or a local Hugging Face GPT-2 directory.
out_dir = "out-shakespeare"
eval_interval = 5
eval_iters = 40
wandb_log = False
wandb_project = "shakespeare"
wandb_run_name = "ft-gpt2-xl"
dataset = "shakespeare"
init_from = "gpt2-xl"
always_save_checkpoint = False  # best.pt keeps the best val loss; the run overfits quickly
# 32 sequences of 1024 tokens per step; shakespeare has ~300k tokens, so ~9 steps an epoch
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20
learning_rate = 3e-5  # fine-tuning: a small constant learning rate
decay_lr = False
