"""
Train a GPT. One process:

    python train.py config/train_shakespeare_char.py --batch_size=32

DDP on one node of 8 GPUs (or CPU processes, with gloo):

    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

Every setting below can be set by a config file or a --key=value override; `--help`
lists them. Stop it any time (Ctrl-C, SIGTERM, preemption, kill -9): `--init_from=resume`
(or 'auto') continues exactly where the last checkpoint left off.
"""
import os
import random
import re
import sys
import time
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import (ANY, ConfigError, UserError, at_least, check_settings, configure, in_range,
                          install_error_hook, one_of)
from gpt_trainer import checkpoint
from gpt_trainer.checkpoint import (capture_rng, claim_out_dir, last_saved,
                                    load_resume_point, model_config, restore_rng, resume_training,
                                    save_training_state, save_weights, start_over)
from gpt_trainer.dataloader import BatchLoader, check_same_tokenizer, data_vocab_size, open_dataset
from gpt_trainer.evaluation import (TASKS, Interrupted, estimate_loss, estimate_masked_loss, eval_tokenizer,
                                    format_results, load_tasks, parse_tasks, score_tasks, split_tasks,
                                    token_byte_lengths)
from gpt_trainer.hf import GPT2_NAMES, check_start_tokenizer
from gpt_trainer.loading import build_any_model
from gpt_trainer.lora import TARGETS as LORA_TARGETS, add_lora, base_fingerprint
from gpt_trainer.metrics import MetricsLogger
from gpt_trainer.nanogpt import checkpoint_fields, config_fields
from gpt_trainer.optim import clip_gradients, configure_optimizers, get_lr, step_optimizers, tally_skips
from gpt_trainer.resume_config import resume_settings, saved_run
from gpt_trainer.runtime import (StopSignal, derive_grad_accum, keep_freed_memory, peak_flops, peak_gpu_memory_mb,
                                 report_dead_ranks, set_grad_sync, setup, shard_model, teardown, try_compile)
from gpt_trainer.sft import ChatBatchLoader, open_masks, sft_loss
from model import GPT, GPTConfig, RECOMPUTE

# -----------------------------------------------------------------------------
# settings: defaults train GPT-2 124M on OpenWebText on 8 GPUs, as nanoGPT
# I/O
out_dir = "out"  # checkpoints, metrics.jsonl and logs go here
eval_interval = 2000  # iterations between evaluations of train and val loss
log_interval = 1  # iterations between log lines (each costs a host sync)
eval_iters = 200  # batches per split in each evaluation (a fixed set, the same every time)
eval_tasks = ""  # tasks scored during training, comma-separated: 'hellaswag', then 'lm_eval:NAME' (this and all after it: lm-evaluation-harness tasks or task YAML paths); '' = none
eval_tasks_interval = 0  # iterations between scorings of eval_tasks; 0 = eval_interval
eval_tasks_max = 0  # examples per task in each scoring (the first ones, the same every time); 0 = all
hellaswag_path = "data/hellaswag/hellaswag_val.jsonl"  # HellaSwag's validation set; downloaded when missing
eval_only = False  # evaluate once and exit
ckpt_interval = 0  # iterations between saves of ckpt.pt (the resume point); 0 = eval_interval
always_save_checkpoint = True  # False: also keep best.pt, the weights with the best val loss
init_from = "scratch"  # 'scratch', 'resume', 'auto' (resume if out_dir has ckpt.pt), 'gpt2*' or an HF dir
overwrite = False  # True: a run that does not resume deletes out_dir's checkpoints and metrics first
max_bad_steps = 5  # stop after this many non-finite losses/gradients in a row
# wandb logging
wandb_log = False  # log to Weights & Biases as well as out_dir/metrics.jsonl
wandb_project = "owt"  # wandb project name
wandb_run_name = "gpt2"  # wandb run name
tensorboard_log = False  # also write the logged numbers to out_dir/tensorboard for TensorBoard
plot = False  # write out_dir/metrics.png (plot.py's figure of metrics.jsonl) after every eval
# data
dataset = "openwebtext"  # a prepared dataset under data/
data_dir = ""  # explicit path to a dataset directory; overrides dataset when set
gradient_accumulation_steps = 5 * 8  # micro-steps per optimizer step, summed over all ranks
total_batch_size = 0  # tokens per optimizer step; when set, gradient_accumulation_steps is derived
batch_size = 12  # sequences per micro-step per rank
block_size = 1024  # context length in tokens
loss_mask = True  # chat data (data/chat/prepare.py): loss only on the assistant's tokens; False = on every token
sampling = "random"  # 'random' windows (nanoGPT) or 'epoch' (each window once per epoch)
# model (see model.GPTConfig)
n_layer = 12  # transformer blocks
n_head = 12  # attention heads
n_embd = 768  # embedding width
dropout = 0.0  # 0 for pretraining, try 0.1+ for finetuning
bias = True  # bias in Linear and LayerNorm layers (GPT-2 has them)
vocab_size = 0  # 0 = from the dataset's meta.json, else 50304 (GPT-2, padded)
n_kv_head = 0  # key/value heads for grouped-query attention; 0 = n_head
pos_emb = "learned"  # 'learned' (GPT-2) or 'rope'
rope_theta = 10000.0  # RoPE base frequency
norm = "layernorm"  # 'layernorm' (GPT-2) or 'rmsnorm'
mlp = "gelu"  # 'gelu' (GPT-2's tanh), 'gelu_exact' (erf, nanoGPT's), 'relu2' or 'swiglu'
multiple_of = 64  # SwiGLU hidden size rounds up to a multiple of this
qk_norm = False  # normalise queries and keys before attention
tie_embeddings = True  # share the token embedding with the output head (GPT-2)
logit_softcap = 0.0  # soft-cap logits at this value; 0 = off
# optimizer
optimizer = "adamw"  # 'adamw', or 'muon' (Muon for hidden 2-D weights, AdamW for the rest)
learning_rate = 6e-4  # peak learning rate of AdamW
max_iters = 600000  # optimizer steps in the whole run
weight_decay = 1e-1  # decoupled weight decay on 2-D weights and embeddings
beta1 = 0.9  # AdamW beta1
beta2 = 0.95  # AdamW beta2
grad_clip = 1.0  # clip the global gradient norm to this; 0 = no clipping
muon_lr = 0.02  # peak learning rate of Muon (optimizer='muon')
muon_momentum = 0.95  # Muon momentum
# learning rate schedule
decay_lr = True  # False = constant learning_rate, no warmup
lr_schedule = "cosine"  # 'cosine', 'wsd' (warmup-stable-decay), 'linear' or 'constant'
warmup_iters = 2000  # linear warmup steps
lr_decay_iters = 600000  # step at which the decay reaches min_lr (usually max_iters)
min_lr = 6e-5  # floor of the decay, ~learning_rate / 10
decay_frac = 0.2  # wsd: fraction of the post-warmup steps spent decaying
# system
backend = "auto"  # DDP backend: 'nccl' on CUDA, 'gloo' on CPU
ddp_timeout = 600  # seconds a collective waits for a missing or dead rank before failing
fsdp = False  # shard weights, gradients and optimizer state with FSDP2 instead of DDP (torchrun)
device = "auto"  # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"  # 'auto' (bf16 on CUDA if supported, else fp16; fp32 elsewhere), 'float32', 'bfloat16', 'float16'
compile = "auto"  # torch.compile the model; 'auto' = on CUDA only
# LoRA (lora.py): low-rank adapters on a frozen pretrained model (init_from an HF dir or gpt2*)
lora_rank = 0  # adapter rank r; 0 = off (full fine-tuning)
lora_alpha = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
lora_dropout = 0.0  # dropout on the adapters' input
lora_targets = "attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj"  # which Linears of each block get adapters
activation_checkpointing = "none"  # recompute activations in backward to save memory: 'none', 'block', 'attn' or 'mlp'
seed = 1337  # seeds the data order and every RNG
# -----------------------------------------------------------------------------
SETTINGS = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
MODEL_KEYS = [k for k in GPTConfig.field_names() if k in SETTINGS]  # the settings that are GPTConfig's
POSITIVE, NON_NEGATIVE, FRACTION = at_least(1), at_least(0), in_range(0.0, 1.0)
BY_GPTCONFIG = (lambda v: True, "what model.GPTConfig accepts (check_model_settings)")  # each rule once
# what each setting accepts, checked before anything is created (a test asks for one per setting)
RULES = dict(
    out_dir=(lambda v: v != "", "a directory path"), eval_interval=POSITIVE, log_interval=POSITIVE,
    eval_iters=POSITIVE, eval_only=ANY, ckpt_interval=NON_NEGATIVE, always_save_checkpoint=ANY,
    init_from=(lambda v: v in ("scratch", "resume", "auto", *GPT2_NAMES) or os.path.isdir(v),
               "'scratch', 'resume', 'auto', 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' or a "
               "Hugging Face model directory that exists"),
    eval_tasks=(lambda v: parse_tasks(v, "eval_tasks") is not None,  # names the bad task itself
                f"comma-separated task names from {', '.join(TASKS)}, then lm_eval:NAME entries, or ''"), eval_tasks_interval=NON_NEGATIVE, eval_tasks_max=NON_NEGATIVE, hellaswag_path=ANY,
    tensorboard_log=ANY, plot=ANY, overwrite=ANY, max_bad_steps=POSITIVE, wandb_log=ANY, wandb_project=ANY, wandb_run_name=ANY,
    dataset=(lambda v: v != "", "a directory name under data/"), data_dir=ANY,
    gradient_accumulation_steps=POSITIVE, total_batch_size=NON_NEGATIVE, batch_size=POSITIVE,
    sampling=one_of("random", "epoch"), loss_mask=ANY,
    **{k: BY_GPTCONFIG for k in MODEL_KEYS},
    optimizer=one_of("adamw", "muon"), learning_rate=NON_NEGATIVE, max_iters=NON_NEGATIVE,
    weight_decay=NON_NEGATIVE, beta1=FRACTION, beta2=FRACTION, grad_clip=NON_NEGATIVE,
    muon_lr=NON_NEGATIVE, muon_momentum=FRACTION,
    decay_lr=ANY, lr_schedule=one_of("cosine", "wsd", "linear", "constant"), warmup_iters=NON_NEGATIVE,
    lr_decay_iters=NON_NEGATIVE, min_lr=NON_NEGATIVE,
    decay_frac=(lambda v: 0 < v <= 1, "in (0, 1]: the fraction of post-warmup steps that decay"),
    activation_checkpointing=one_of(*RECOMPUTE), lora_rank=NON_NEGATIVE, lora_alpha=(lambda v: v > 0, "> 0"),
    lora_dropout=FRACTION, lora_targets=(lambda v: set(v.split(",")) <= set(LORA_TARGETS), f"a comma-separated "
                                         f"subset of {','.join(LORA_TARGETS)}"),
    backend=one_of("auto", "nccl", "gloo"), ddp_timeout=POSITIVE, fsdp=ANY,
    device=(lambda v: re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None,
            "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
    dtype=one_of("auto", "float32", "bfloat16", "float16"), compile=one_of("auto", True, False),
    seed=(lambda v: 0 <= v < 2**31, "in [0, 2**31): it seeds numpy's generator too, which takes 32 bits"),
)
DECAYS = lambda c: c["decay_lr"] and c["lr_schedule"] != "constant"  # noqa: E731 (min_lr, lr_decay_iters are used)
# rules between settings, checked after each setting's own
RELATIONS = [
    (lambda c: not DECAYS(c) or c["min_lr"] <= c["learning_rate"],
     lambda c: f"min_lr={c['min_lr']!r} is above learning_rate={c['learning_rate']!r}: the schedule would "
               f"raise the learning rate as it decays; set --min_lr lower (nanoGPT uses learning_rate / 10)"),
    (lambda c: not DECAYS(c) or c["warmup_iters"] <= c["lr_decay_iters"],
     lambda c: f"warmup_iters={c['warmup_iters']} is past lr_decay_iters={c['lr_decay_iters']}: the decay "
               f"would end before the warmup does; set --lr_decay_iters to at least warmup_iters (usually max_iters)"),
]


def check_model_settings(config):
    """GPTConfig's own checks of the model settings (vocab_size 0: from the dataset, later), as
    a ConfigError before anything is created or written."""
    try:
        GPTConfig(**{**{k: config[k] for k in MODEL_KEYS}, "vocab_size": config["vocab_size"] or 1})
    except ValueError as e:
        raise ConfigError(str(e))


class TrainingError(UserError):
    """The run cannot go on for a reason the user can fix."""


if __name__ == "__main__":
    install_error_hook()
    defaults, given = {k: globals()[k] for k in SETTINGS}, set()
    settings = configure(defaults, sys.argv[1:], __file__, given)
    # a resume continues the checkpoint's run: its settings, with this launch's overrides said
    saved = saved_run(settings["out_dir"], settings["fsdp"]) if settings["init_from"] in ("resume", "auto") else None
    resume_notes = []
    if saved:
        settings, resume_notes = resume_settings(defaults, settings, given, saved, MODEL_KEYS)
    globals().update(settings)
    config = {k: globals()[k] for k in SETTINGS}  # what this run used, saved in checkpoints
    check_settings(config, RULES, __file__, RELATIONS)
    if not saved:  # (a resumed model is the checkpoint's, whose fields may go beyond MODEL_KEYS)
        check_model_settings(config)
    explicit = {k for k in SETTINGS if config[k] != defaults[k]}

    # -------------------------------------------------------------------------
    # device, dtype, DDP: decided once, the loop below has no device branches
    ddp, rank, local_rank, world_size, device, device_type, dtype, ctx = setup(device, dtype, backend, ddp_timeout)
    master_process = rank == 0
    if device_type == "cpu":
        keep_freed_memory()
    if fsdp and not ddp:
        raise ConfigError("fsdp=True needs torchrun (e.g. torchrun --nproc_per_node=2 train.py ...)")
    if fsdp and lora_rank:
        raise ConfigError("lora_rank > 0 is not supported with fsdp; use DDP (fsdp=False)")
    if fsdp and split_tasks(eval_tasks)[1]:  # the harness's ranks run different numbers of forwards
        raise ConfigError("eval_tasks with lm_eval: tasks cannot run under fsdp=True; use DDP, or evaluate.py on a checkpoint")
    if fsdp and optimizer == "muon":
        raise ConfigError("optimizer='muon' needs whole weight matrices; use it without fsdp")
    grad_accum = derive_grad_accum(gradient_accumulation_steps, total_batch_size, batch_size,
                                   block_size, world_size)
    tokens_per_iter = grad_accum * world_size * batch_size * block_size
    if ddp:
        report_dead_ranks(rank, lambda: last_saved(out_dir, fsdp))
    # from here a stop signal is heard: the loop saves at its first chance and exits 0
    stop = StopSignal(ddp)
    # what the settings name must exist and fit before anything is created, deleted or
    # downloaded into out_dir: the dataset, the tokenizer and the files of eval_tasks
    data_dir = data_dir or os.path.join("data", dataset)
    _, meta = open_dataset(data_dir, block_size, check_ids=False)
    task_names = parse_tasks(eval_tasks, "eval_tasks")
    tok = eval_tokenizer(meta, data_dir, required=bool(task_names), quiet=not master_process)
    if init_from not in ("scratch", "resume", "auto"):  # pretrained weights: their ids must mean the data's
        check_start_tokenizer(init_from, meta, tok, data_dir, quiet=not master_process)
    tasks = load_tasks(task_names, {"hellaswag": hellaswag_path}, tok, block_size, eval_tasks_max, rank, ddp)
    # out_dir is this run's alone until it exits (a lock that dies with it); a run that does not
    # resume stops here, before writing anything, if out_dir holds another run's checkpoints
    auto = init_from == "auto"
    init_from = claim_out_dir(out_dir, init_from, overwrite, fsdp)  # 'auto' resolved
    if master_process:
        if auto and init_from == "scratch":
            print(f"init_from='auto': no checkpoint in {out_dir}, starting from scratch")
        for note in resume_notes:
            print(note)
        print(f"device {device}, dtype {dtype}, world size {world_size}, {grad_accum} micro-steps "
              f"per rank, {tokens_per_iter:,} tokens per iteration")
    torch.manual_seed(seed)  # the same initial weights on every rank (FSDP shards them as they are)

    # -------------------------------------------------------------------------
    # model: from scratch, a checkpoint, or GPT-2 weights
    ckpt_path = checkpoint.ckpt_path(out_dir)
    resume_path = os.path.join(out_dir, checkpoint.SHARDED) if fsdp else ckpt_path
    ckpt, iter_num, best_val_loss, bad_steps = None, 0, 1e9, 0
    if init_from == "scratch":
        meta_vocab = data_vocab_size(meta)
        model_args = {k: config[k] for k in MODEL_KEYS}
        model_args["vocab_size"] = vocab_size or meta_vocab or 50304
        model = GPT(model_config(model_args, "settings"))
    elif init_from == "resume":
        ckpt = load_resume_point(out_dir, fsdp)
        if master_process:
            print(f"resuming from {resume_path} at iter {ckpt['iter_num']}")
        if fsdp:  # weights are loaded after sharding, below
            model = GPT(model_config({**config_fields(ckpt), "dropout": dropout}, resume_path))
        else:
            model = build_any_model(ckpt, resume_path, dropout=dropout if saved else None)  # saved: the run's
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        bad_steps = ckpt.get("bad_steps", 0)
    else:
        from gpt_trainer.hf import check_hf_overrides, gpt_from_hf
        check_hf_overrides({k: config[k] for k in explicit & set(MODEL_KEYS) - {"block_size"}})
        model = gpt_from_hf(init_from, dropout=dropout)
        if block_size < model.config.block_size:
            model.crop_block_size(block_size)
    if init_from not in ("scratch", "resume") and model.grow_vocab(data_vocab_size(meta) or 0) and master_process:
        print(f"vocab_size grown to {model.config.vocab_size} for the dataset's chat template's special tokens")
    if block_size != model.config.block_size:
        raise ConfigError(f"block_size={block_size} but the model has block_size {model.config.block_size}")
    lora_info = ckpt.get("lora") if ckpt is not None else None
    if lora_rank and init_from == "scratch":
        raise ConfigError("lora_rank > 0 adapts a pretrained model: set init_from to an HF dir or gpt2* (for "
                          "a checkpoint of yours, python export.py --ckpt=OUT_DIR/ckpt.pt writes that dir)")
    if lora_rank and init_from not in ("scratch", "resume"):
        add_lora(model, lora_rank, lora_alpha, lora_dropout, lora_targets)  # the base frozen
        lora_info = {**model.lora, "base": os.path.abspath(init_from) if os.path.isdir(init_from) else init_from,
                     "base_fingerprint": base_fingerprint(model)}
    elif ckpt is not None and (lora_info or {}).get("rank", 0) != lora_rank and "lora_rank" in explicit:
        raise ConfigError(f"lora_rank={lora_rank} but {resume_path} was trained with lora_rank="
                          f"{(lora_info or {}).get('rank', 0)}; drop the setting to resume")
    model.set_recompute(activation_checkpointing)
    model.to(device)
    if master_process:
        print(f"{model.get_num_params() / 1e6:.2f}M parameters")
    torch.manual_seed(seed + rank)  # dropout differs per rank; the data order does not
    np.random.seed(seed + rank)
    random.seed(seed + rank)
    if fsdp:
        model = shard_model(model)  # before the optimizer, which must see the sharded parameters

    # -------------------------------------------------------------------------
    # data: validated up front; batches depend only on (seed, step, micro-batch)
    splits, meta = open_dataset(data_dir, block_size, model.config.vocab_size)  # meta embeds a bpe/hf tokenizer
    if ckpt is not None:
        check_same_tokenizer(ckpt.get("meta"), meta, resume_path, data_dir)
    masks = open_masks(data_dir, meta, splits) if loss_mask else None  # a chat data dir: the loss only on assistant tokens
    loader = (BatchLoader if masks is None else partial(ChatBatchLoader, masks["train"]))(
        splits["train"], block_size, batch_size, seed, grad_accum * world_size, sampling=sampling, device=device,
        rank_first_index=rank * grad_accum, rank_num_micro=grad_accum)

    # -------------------------------------------------------------------------
    # optimizer and GradScaler (only fp16 needs loss scaling)
    optimizers = configure_optimizers(model, weight_decay, learning_rate, (beta1, beta2), device_type,
                                      optimizer, muon_lr, muon_momentum)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    if ckpt is not None:
        # optimizer state mapped to parameters by name and checked; this run's lr, betas and
        # weight_decay win over the checkpoint's (e.g. a lower lr to recover)
        resume_training(ckpt, resume_path, model, optimizers, scaler, loader, fsdp)
        ckpt = None  # free the memory
    elif master_process:
        start_over(out_dir)  # what claim_out_dir allowed to go: nothing left is mistaken for this run's

    # -------------------------------------------------------------------------
    # compile and wrap for DDP
    raw_model = model
    if compile == "auto" and device_type == "cuda" or compile is True:
        x, y = loader.get(iter_num, rank * grad_accum)
        model = try_compile(model, x, y, ctx)
    eval_model = model
    if ddp and not fsdp:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
    peak = peak_flops(torch.cuda.get_device_name(device) if device_type == "cuda" else "",
                      {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype])

    # -------------------------------------------------------------------------
    # logging: metrics.jsonl in out_dir always, wandb and TensorBoard when asked; what evaluations need
    token_bytes = token_byte_lengths(tok, raw_model.config.vocab_size) if tok else None  # for val bpb
    logger = MetricsLogger(out_dir, iter_num, config, wandb_log, wandb_project, wandb_run_name,
                           tensorboard_log) if master_process else None

    # in every checkpoint of this run; model_args is nanoGPT's when nanoGPT can express the model
    run_info = dict(**checkpoint_fields(raw_model.config), config=config, meta=meta, lora=lora_info)

    # -------------------------------------------------------------------------
    # training loop
    start_iter = iter_num
    ckpt_every = ckpt_interval or eval_interval

    def checkpoint_due(it):
        return it > start_iter and (it % ckpt_every == 0 or it >= max_iters)

    def save_resume_point(it, where=None):
        """A stop signal: save the state at iteration `it` on every rank (the run exits 0)."""
        if where and master_process:
            print(f"stopped {where} iter {it}", file=sys.stderr)
        save_training_state(ckpt_path, raw_model, optimizers, scaler, loader.state_dict(it), fsdp,
                            **run_info, iter_num=it, best_val_loss=best_val_loss, bad_steps=bad_steps)
        if master_process:
            print(f"saved {resume_path} at iter {it}; resume with --init_from=resume")

    # the loss an evaluation reports: of every target, or of the assistant's tokens (chat data)
    if masks is None:
        evaluate_loss = partial(estimate_loss, eval_model, splits, block_size, batch_size, eval_iters, ctx,
                                device, rank, world_size, token_bytes, stop.any_rank)
    else:
        evaluate_loss = partial(estimate_masked_loss, eval_model, splits, masks, block_size, batch_size,
                                eval_iters, ctx, device, rank, world_size, stop.any_rank)

    finite_flags = []  # one per step since the host last counted skipped updates
    t0 = time.perf_counter()
    while True:
        # evaluate, keep the best weights
        lr_scale = get_lr(iter_num, 1.0, min_lr / learning_rate if learning_rate else 0.0, warmup_iters,
                          lr_decay_iters, lr_schedule, decay_frac) if decay_lr else 1.0  # lr 0 is allowed
        eval_due = iter_num % eval_interval == 0 or iter_num == max_iters or eval_only
        tasks_due = bool(tasks) and (iter_num % (eval_tasks_interval or eval_interval) == 0
                                     or iter_num == max_iters or eval_only)
        if eval_due or tasks_due:
            try:  # a stop signal is heard between batches: a long eval never outlasts a grace period
                results = evaluate_loss() if eval_due else {}
                if tasks_due:
                    results.update(score_tasks(tasks, eval_model, batch_size, ctx, device, rank, world_size,
                                               stop.any_rank))
            except Interrupted:
                if eval_only:
                    raise TrainingError("stopped by a signal during the evaluation; no results")
                save_resume_point(iter_num, "during the evaluation of")  # the state before it: exact
                break
            if master_process:
                print(f"step {iter_num}: {format_results(results)}")
                logger.log({"iter": iter_num, **results})
                if plot:
                    from gpt_trainer.plotting import plot as plot_runs
                    plot_runs([out_dir])
            if eval_only:
                break
            if eval_due and results["val_loss"] < best_val_loss:
                best_val_loss = results["val_loss"]
                if not always_save_checkpoint and iter_num > start_iter:
                    save_weights(checkpoint.best_path(out_dir), raw_model, fsdp, **run_info, iter_num=iter_num,
                                 best_val_loss=best_val_loss, bad_steps=bad_steps)
            t0 = time.perf_counter()

        # save the resume point
        # (not while updates are being skipped: the last good checkpoint stays the resume point)
        if checkpoint_due(iter_num) and bad_steps == 0:
            save_training_state(ckpt_path, raw_model, optimizers, scaler, loader.state_dict(iter_num), fsdp,
                                **run_info, iter_num=iter_num, best_val_loss=best_val_loss, bad_steps=bad_steps)
            if master_process:
                print(f"saved {resume_path} at iter {iter_num}")
        if iter_num >= max_iters:
            break

        # forward/backward over the micro-steps; gradients sync only on the last one
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_scale
        loss_sum = torch.zeros((), device=device)
        rng = capture_rng() if grad_accum > 1 else None  # a step stopped part way leaves no trace
        for micro_step in range(grad_accum):
            if micro_step and stop.any_rank():  # a long step (many micro-steps) is cut short
                break
            set_grad_sync(model, micro_step == grad_accum - 1)
            x, y = loader.get(iter_num, rank * grad_accum + micro_step)
            with ctx:
                _, loss = model(x, y) if masks is None else (None, sft_loss(model, x, y, loader.loss_scale(iter_num)))
            loss_sum += loss.detach().float()
            scaler.scale(loss / grad_accum).backward()
        else:
            rng = None
        if rng is not None:  # stopped between micro-steps: drop them, save the state before the step
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            restore_rng(rng)
            save_resume_point(iter_num, "in the middle of")
            break

        # clip the unscaled gradients; skip the update if the loss or gradients are not finite,
        # decided on the device: the host learns of it at the next log or checkpoint step
        for opt in optimizers:
            scaler.unscale_(opt)
        grad_norm = clip_gradients(raw_model, grad_clip)
        # with fp16, inf gradients are the GradScaler's business: it skips the step and rescales
        finite = (torch.isfinite(loss_sum) & (torch.isfinite(grad_norm) | scaler.is_enabled())).float()
        if ddp:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        step_optimizers(optimizers, scaler, finite)
        scaler.update()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        finite_flags.append(finite)

        # count skipped updates where the host waits for the device anyway; stop after too many
        stopping = stop.any_rank()
        if iter_num % log_interval == 0 or stopping or checkpoint_due(iter_num + 1):
            skipped, bad_steps = tally_skips(finite_flags, iter_num + 1 - len(finite_flags), bad_steps)
            finite_flags = []
            for it, run in skipped:
                if master_process:
                    print(f"iter {it}: non-finite loss or gradient, update skipped "
                          f"({run}/{max_bad_steps} in a row)", file=sys.stderr)
                    logger.log({"iter": it, "skipped_step": True, "bad_steps": run})
                if run >= max_bad_steps:
                    raise TrainingError(f"{run} non-finite steps in a row at iter {it}; lower "
                                        f"learning_rate or check the data; {last_saved(out_dir, fsdp)}")

        # log
        if iter_num % log_interval == 0:
            if ddp:
                dist.all_reduce(loss_sum)  # gloo has no AVG
            dt = time.perf_counter() - t0
            lossf = loss_sum.item() / grad_accum / world_size
            mfu = raw_model.estimate_mfu(tokens_per_iter, dt, peak * world_size if peak else None)
            if master_process:
                norm = grad_norm.item()  # before clipping; the same on every rank
                print(f"iter {iter_num}: loss {lossf:.4f}, lr {lr_scale * learning_rate:.2e}, grad norm "
                      f"{norm:.4f}, time {dt * 1000:.1f}ms, {tokens_per_iter / dt:,.0f} tok/s, "
                      f"mfu {'n/a' if mfu is None else f'{mfu * 100:.1f}%'}")
                logger.log({"iter": iter_num, "loss": lossf, "lr": lr_scale * learning_rate, "grad_norm": norm,
                            "ms": dt * 1000, "tokens_per_s": tokens_per_iter / dt, "mfu": mfu,
                            "flops_per_iter": raw_model.flops_per_token() * tokens_per_iter,
                            "bad_steps": bad_steps, "data_wait_ms": loader.wait_time * 1000,
                            "peak_cuda_mem_mb": peak_gpu_memory_mb(device_type)})
        t0 = time.perf_counter()
        iter_num += 1

        # a signal on any rank: save at this step on every rank, exit 0
        if stopping:
            save_resume_point(iter_num)
            break

    if bad_steps and not eval_only:  # the last steps' updates were skipped: that is no finished run
        raise TrainingError(f"the run ended after {bad_steps} non-finite step(s) in a row (the last at iter "
                            f"{iter_num - 1}), so its weights were not saved; lower learning_rate or check "
                            f"the data; {last_saved(out_dir, fsdp)}")
    loader.close()
    if master_process:
        logger.close()
    teardown(ddp)
