# Supervised fine-tuning on a synthetic skill, small enough for a laptop CPU (docs/chat.md):
#   python data/chat/synthetic.py --out=data/reverse.jsonl --held_out=data/reverse_held_out.json
#   python data/chat/prepare.py --input=data/reverse.jsonl --encoding=char --out_dir=data/reverse
#   python train.py config/sft_reverse_char.py
#   python chat.py --out_dir=out-reverse --prompt="reverse hello"
# The loss is on the assistant's tokens only (loss_mask=True, the default for a chat data dir).
out_dir = "out-reverse"
data_dir = "data/reverse"
device = "cpu"
compile = False
eval_interval = 500
eval_iters = 20
log_interval = 100
always_save_checkpoint = False  # keep best.pt, the best val loss (chat.py prefers it)

n_layer = 2
n_head = 4
n_embd = 64
dropout = 0.0
block_size = 32  # a conversation is 13 to 15 tokens
batch_size = 32
gradient_accumulation_steps = 1

learning_rate = 3e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 3e-4
warmup_iters = 50
weight_decay = 0.0
