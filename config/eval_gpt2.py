# Loss and bits per byte of OpenAI's gpt2 on OpenWebText (python data/openwebtext/prepare.py
# first), and its HellaSwag score (llm.c's reference for GPT-2 124M: acc_norm 0.2945; docs/evaluation.md)
batch_size = 8
eval_iters = 500  # more batches for a tighter estimate
eval_only = True
wandb_log = False
init_from = "gpt2"
eval_tasks = "hellaswag"  # all 10,042 validation examples (downloaded to hellaswag_path on first use)
