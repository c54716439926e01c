"""
Evaluation: loss and bits per byte over a fixed set of windows of each split, and
multiple-choice tasks (HellaSwag) scored by the loss of each ending. train.py calls
estimate_loss and score_tasks at its evaluations; on its own this script evaluates any
checkpoint or Hugging Face GPT-2:

    python evaluate.py --out_dir=out-shakespeare-char          # val loss, bpb and HellaSwag
    python evaluate.py --init_from=gpt2 --tasks=hellaswag      # OpenAI's GPT-2 124M
    python evaluate.py --out_dir=out --tasks=val,lm_eval:arc_easy,piqa   # any lm-evaluation-harness task (gpt_trainer/harness.py)
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
tasks = "val,hellaswag"  # comma-separated: 'val' (loss and bits per byte of the val split), 'hellaswag', then 'lm_eval:NAME' (this entry and all after it: lm-evaluation-harness task names or task YAML paths)
dataset = ""  # data/<dataset> for 'val'; '' = the checkpoint's own (HF models have none: 'val' is skipped)
data_dir = ""  # explicit path to a dataset directory; overrides dataset
eval_iters = 200  # 'val': batches of batch_size windows of the model's block_size
batch_size = 8  # sequences per forward pass
max_examples = 0  # multiple-choice tasks: score the first this many examples; 0 = all
hellaswag_path = "data/hellaswag/hellaswag_val.jsonl"  # HellaSwag's validation set; downloaded when missing
lm_eval_include_path = ""  # a directory of your own lm-evaluation-harness task YAMLs, to name them in tasks
lm_eval_num_fewshot = -1  # lm_eval tasks: few-shot examples in each prompt; -1 = each task's own (0 if it has none)
results = ""  # also write the results to this JSON file
device = "auto"  # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"  # 'auto' (bf16/fp16 on CUDA, fp32 elsewhere), 'float32', 'bfloat16', 'float16'
compile = False  # torch.compile the model
backend = "auto"  # under torchrun: 'nccl' on CUDA, 'gloo' on CPU
# -----------------------------------------------------------------------------
SETTINGS = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]

import json  # noqa: E402

from configurator import ANY, at_least, check_settings, configure, install_error_hook  # noqa: E402
from gpt_trainer.dataloader import open_dataset  # noqa: E402
from gpt_trainer.errors import DataError  # noqa: E402
from gpt_trainer.evaluation import (TASKS, estimate_loss, format_results, load_tasks, parse_tasks,  # noqa: E402
                                    score_tasks, token_byte_lengths)
from gpt_trainer.fsutil import write_failure  # noqa: E402
from gpt_trainer.loading import checkpoint_data_dir  # noqa: E402
from gpt_trainer.loading import load_model as load_model_for_inference  # noqa: E402
from gpt_trainer.runtime import setup, teardown  # noqa: E402
from gpt_trainer.tokenizer import other_id, tokenizer_from_meta  # noqa: E402

# -----------------------------------------------------------------------------
# the standalone command

def load_model(s):
    """(model, tokenizer, where it came from, data dir for 'val' or '')."""
    model, tok, source, config = load_model_for_inference(s["init_from"], s["out_dir"], s["ckpt"])
    explicit_dir = s["data_dir"] or (os.path.join("data", s["dataset"]) if s["dataset"] else "")
    own_dir = checkpoint_data_dir(config) if config else ""
    return model, tok, source, explicit_dir or (own_dir if os.path.isdir(own_dir) else "")


def results_path_ok(path):
    """'' or a file this process can write (checked before the evaluation, not after it)."""
    if not path:
        return True
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(parent):
        return False
    return os.access(path if os.path.exists(path) else parent, os.W_OK)


RULES = dict(
    init_from=(lambda v: v in ("resume", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl") or os.path.isdir(v),
               "'resume', 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' or an HF directory that exists"),
    out_dir=ANY, ckpt=ANY, dataset=ANY, data_dir=ANY, hellaswag_path=ANY, device=ANY, dtype=ANY, compile=ANY,
    backend=ANY,
    tasks=(lambda v: bool(v.strip(" ,")), f"a comma-separated list of 'val', {', '.join(map(repr, TASKS))}"),
    eval_iters=at_least(1), batch_size=at_least(1), max_examples=at_least(0),
    results=(results_path_ok, "'' or a JSON file path in a writable directory (not a directory itself)"),
    lm_eval_include_path=(lambda v: v == "" or os.path.isdir(v), "'' or a directory of task YAML files that exists"),
    lm_eval_num_fewshot=at_least(-1),
)


def check_data_tokenizer(tok, meta, data_dir, source):
    """'val' on data encoded with another tokenizer than the model's gives a meaningless loss."""
    data_tok = tokenizer_from_meta(meta, data_dir)
    why = other_id(tok, data_tok)
    if why:
        raise DataError(f"{data_dir} was encoded with {data_tok.name} ({data_tok.vocab_size} tokens), but "
                        f"{source} was trained with {tok.name} ({tok.vocab_size} tokens), {why}: its val loss "
                        f"would mean nothing; pick a dataset prepared with the model's tokenizer")
    return data_tok


def write_results(path, out):
    try:
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
    except OSError as e:
        raise DataError(f"could not write --results={path}: {write_failure(e)} (the results are printed above)")


def main(s):
    check_settings(s, RULES, __file__)
    names = parse_tasks(s["tasks"], "tasks", extra=("val",))
    ddp, rank, _, world_size, device, _, _, ctx = setup(s["device"], s["dtype"], s["backend"])
    model, tok, source, data_dir = load_model(s)
    cfg = model.config
    model.eval().to(device)
    if s["compile"]:
        model.compile(dynamic=True)
    # the tasks' files first: a download that fails ends the run before any scoring, not after it
    paths = {"hellaswag": s["hellaswag_path"]}
    fewshot = None if s["lm_eval_num_fewshot"] < 0 else s["lm_eval_num_fewshot"]
    loaded = load_tasks([n for n in names if n != "val"], paths, tok, cfg.block_size, s["max_examples"], rank, ddp,
                        s["lm_eval_include_path"], fewshot)
    out = {}
    if "val" in names and not data_dir and rank == 0:
        print(f"note: 'val' skipped: no dataset found for {source}; set --dataset or --data_dir", file=sys.stderr)
    if "val" in names and data_dir:
        splits, meta = open_dataset(data_dir, cfg.block_size, cfg.vocab_size)
        token_bytes = token_byte_lengths(check_data_tokenizer(tok, meta, data_dir, source), cfg.vocab_size)
        out.update(estimate_loss(model, {"val": splits["val"]}, cfg.block_size, s["batch_size"], s["eval_iters"],
                                 ctx, device, rank, world_size, token_bytes))
    out.update(score_tasks(loaded, model, s["batch_size"], ctx, device, rank, world_size))
    if rank == 0:
        print(f"{source}: {format_results(out)}")
        for key in [k for k in out if k.endswith("_n")]:
            print(f"{key[:-2]}: {out[key]:,} examples scored")
        if s["results"]:
            write_results(s["results"], out)
    teardown(ddp)


if __name__ == "__main__":
    install_error_hook()
    main(configure({k: globals()[k] for k in SETTINGS}, sys.argv[1:], __file__))
