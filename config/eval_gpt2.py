# Loss of OpenAI's gpt2 on OpenWebText (python data/openwebtext/prepare.py first)
batch_size = 8
eval_iters = 500  # more batches for a tighter estimate
eval_only = True
wandb_log = False
init_from = "gpt2"
