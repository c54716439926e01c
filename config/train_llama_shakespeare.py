# A small Llama-style model (RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases,
# untied head) on Shakespeare with a 2048-token BPE vocabulary trained on the corpus itself:
#   python data/shakespeare_char/prepare.py     # fetches input.txt
#   python data/text/prepare.py --input=data/shakespeare_char/input.txt --encoding=bpe:2048 --out_dir=data/shakespeare_bpe
#   python train.py config/train_llama_shakespeare.py
out_dir = "out-llama-shakespeare"
dataset = "shakespeare_bpe"
eval_interval = 250
eval_iters = 50
log_interval = 10
always_save_checkpoint = False  # best.pt for sampling; the corpus is small and overfits

n_layer = 8
n_head = 8
n_kv_head = 4  # two query heads share each key/value head
n_embd = 288
block_size = 256
dropout = 0.1
bias = False
pos_emb = "rope"
norm = "rmsnorm"
mlp = "swiglu"
multiple_of = 32  # SwiGLU hidden 768 = 8/3 * 288
tie_embeddings = False

batch_size = 32
gradient_accumulation_steps = 1
learning_rate = 1e-3
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
max_iters = lr_decay_iters = 3000
weight_decay = 0.1
