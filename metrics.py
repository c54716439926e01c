"""
Where a run's numbers go: out_dir/metrics.jsonl, one JSON object per log line or eval,
always; Weights & Biases when asked.
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
