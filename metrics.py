"""
Where a run's numbers go: out_dir/metrics.jsonl, one JSON object per log line or eval,
always; Weights & Biases and TensorBoard when asked (MetricsLogger).
"""
import json
import math
import os


def append_metrics(path, record):
    # NaN/inf are not JSON: a skipped step's loss is written as null
    record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(out_dir):
    """The records of out_dir/metrics.jsonl, oldest first; [] before the first one."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(path, iter_num):
    """Drop records at or after iter_num, left by a run that died after its last checkpoint,
    so the resumed run's file reads as one history."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        # a line without its newline is torn (a kill or full disk mid-append): drop it
        kept = [line for line in f if line.strip() and line.endswith("\n")
                and json.loads(line).get("iter", 0) < iter_num]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


# where a record's keys go in wandb and TensorBoard: train/<key>, perf/<key>, else eval/<key>
GROUPS = {"loss": "train", "lr": "train", "grad_norm": "train", "bad_steps": "train",
          "ms": "perf", "tokens_per_s": "perf", "mfu": "perf", "data_wait_ms": "perf"}


def scalars(record):
    """{tag: value} of a record's numbers (not its iter, flags or missing values)."""
    return {f"{GROUPS.get(k, 'eval')}/{k}": float(v) for k, v in record.items()
            if k != "iter" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class MetricsLogger:
    """Every record goes to out_dir/metrics.jsonl, and its numbers to wandb and TensorBoard
    (out_dir/tensorboard) when asked, at step record['iter']. A run starting at start_iter first
    drops what an earlier run logged at or after it (steps it will redo), in the file and in
    TensorBoard (purge_step), so a resumed run continues the same curves."""

    def __init__(self, out_dir, start_iter, config=None, wandb_log=False, wandb_project="",
                 wandb_run_name="", tensorboard=False):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        truncate_metrics(self.path, start_iter)
        self.wandb = self.tb = None
        if wandb_log:
            import wandb
            wandb.init(project=wandb_project, name=wandb_run_name, config=config)
            for group in ("train", "perf", "eval"):
                wandb.define_metric(f"{group}/*", step_metric="iter")
            self.wandb = wandb
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=start_iter)

    def log(self, record):
        append_metrics(self.path, record)
        values = scalars(record)
        if self.wandb is not None:
            self.wandb.log({"iter": record["iter"], **values})
        if self.tb is not None:
            for tag, value in values.items():
                self.tb.add_scalar(tag, value, record["iter"])

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()
