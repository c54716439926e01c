"""
Evaluation: loss and bits per byte over a fixed set of windows of each split, and
multiple-choice tasks (HellaSwag) scored by the loss of each ending. train.py calls
estimate_loss and score_tasks at its evaluations; on its own this script evaluates any
checkpoint or Hugging Face GPT-2:

    python evaluate.py --out_dir=out-shakespeare-char          # val loss, bpb and HellaSwag
    python evaluate.py --init_from=gpt2 --tasks=hellaswag      # OpenAI's GPT-2 124M
    torchrun --standalone --nproc_per_node=8 evaluate.py --init_from=gpt2-xl --tasks=hellaswag

Work is shared out across ranks by a fixed rule and each batch's sums are gathered, never
re-added per rank, so every number is bitwise the same at any world size. Settings are set
like train.py's: a config file, then --key=value overrides; --help lists them.
"""
import os
import sys

# -----------------------------------------------------------------------------
# settings of the standalone command
init_from = "resume"  # 'resume' (a checkpoint in out_dir), 'gpt2*', or a local HF GPT-2 dir
out_dir = "out"  # where init_from='resume' finds its checkpoint
ckpt = "auto"  # 'auto' = out_dir/best.pt if it exists, else out_dir/ckpt.pt; or a path
tasks = "val,hellaswag"  # comma-separated: 'val' (loss and bits per byte of the val split), 'hellaswag'
dataset = ""  # data/<dataset> for 'val'; '' = the checkpoint's own (HF models have none: 'val' is skipped)
data_dir = ""  # explicit path to a dataset directory; overrides dataset
eval_iters = 200  # 'val': batches of batch_size windows of the model's block_size
batch_size = 8  # sequences per forward pass
max_examples = 0  # multiple-choice tasks: score the first this many examples; 0 = all
hellaswag_path = "data/hellaswag/hellaswag_val.jsonl"  # HellaSwag's validation set; downloaded when missing
results = ""  # also write the results to this JSON file
device = "auto"  # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"  # 'auto' (bf16/fp16 on CUDA, fp32 elsewhere), 'float32', 'bfloat16', 'float16'
compile = False  # torch.compile the model
backend = "auto"  # under torchrun: 'nccl' on CUDA, 'gloo' on CPU
# -----------------------------------------------------------------------------
SETTINGS = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]

import json  # noqa: E402

from configurator import configure, install_error_hook  # noqa: E402
from gpt_trainer.dataloader import open_dataset  # noqa: E402
from gpt_trainer.evaluation import (estimate_loss, format_results, load_tasks, parse_tasks, score_tasks,  # noqa: E402
                                    token_byte_lengths)
from gpt_trainer.loading import checkpoint_data_dir  # noqa: E402
from gpt_trainer.loading import load_model as load_model_for_inference  # noqa: E402
from gpt_trainer.runtime import setup, teardown  # noqa: E402
from gpt_trainer.tokenizer import tokenizer_from_meta  # noqa: E402

# -----------------------------------------------------------------------------
# the standalone command

def load_model(s):
    """(model, tokenizer, where it came from, data dir for 'val' or '')."""
    model, tok, source, config = load_model_for_inference(s["init_from"], s["out_dir"], s["ckpt"])
    explicit_dir = s["data_dir"] or (os.path.join("data", s["dataset"]) if s["dataset"] else "")
    own_dir = checkpoint_data_dir(config) if config else ""
    return model, tok, source, explicit_dir or (own_dir if os.path.isdir(own_dir) else "")


def main(s):
    names = parse_tasks(s["tasks"], "tasks", extra=("val",))
    ddp, rank, _, world_size, device, _, _, ctx = setup(s["device"], s["dtype"], s["backend"])
    model, tok, source, data_dir = load_model(s)
    cfg = model.config
    model.eval().to(device)
    if s["compile"]:
        model.compile(dynamic=True)
    out = {}
    if "val" in names and not data_dir and rank == 0:
        print(f"note: 'val' skipped: no dataset found for {source}; set --dataset or --data_dir", file=sys.stderr)
    if "val" in names and data_dir:
        splits, meta = open_dataset(data_dir, cfg.block_size, cfg.vocab_size)
        token_bytes = token_byte_lengths(tokenizer_from_meta(meta, data_dir), cfg.vocab_size)
        out.update(estimate_loss(model, {"val": splits["val"]}, cfg.block_size, s["batch_size"], s["eval_iters"],
                                 ctx, device, rank, world_size, token_bytes))
    paths = {"hellaswag": s["hellaswag_path"]}
    loaded = load_tasks([n for n in names if n != "val"], paths, tok, cfg.block_size, s["max_examples"], rank, ddp)
    out.update(score_tasks(loaded, model, s["batch_size"], ctx, device, rank, world_size))
    if rank == 0:
        print(f"{source}: {format_results(out)}")
        for name in loaded:
            print(f"{name}: {out[f'{name}_n']:,} examples scored")
        if s["results"]:
            with open(s["results"], "w") as f:
                json.dump(out, f, indent=1)
    teardown(ddp)


if __name__ == "__main__":
    install_error_hook()
    main(configure({k: globals()[k] for k in SETTINGS}, sys.argv[1:], __file__))
