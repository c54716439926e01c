"""
Where a run's numbers go: out_dir/metrics.jsonl, one JSON object per log line or eval,
always; Weights & Biases and TensorBoard when asked (MetricsLogger).
"""
import json
import math
import os
import sys

from gpt_trainer.errors import UserError
from gpt_trainer.fsutil import write_failure

METRICS = "metrics.jsonl"  # in out_dir: one JSON object per log line or eval


def append_metrics(path, record):
    # NaN/inf are not JSON: a skipped step's loss is written as null
    record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise UserError(f"could not append to {path}: {write_failure(e)}; the records before iter "
                        f"{record.get('iter')} and the checkpoints are intact; free some space and continue "
                        f"with --init_from=resume")


def parse_metrics(path):
    """[(line, record)] of a metrics.jsonl, oldest first, and whether lines were dropped. A
    damaged line (not a JSON object, NUL bytes from a crash, torn by a kill or a full disk
    mid-append) is dropped with one warning for the file, so that it never blocks a resume."""
    good, damaged = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line) if line.endswith("\n") else None
            except ValueError:
                record = None
            if isinstance(record, dict) and isinstance(record.get("iter", 0), int):
                good.append((line, record))
            elif line.strip():
                damaged.append(number)
    if damaged:
        shown = ", ".join(map(str, damaged[:5])) + (f" and {len(damaged) - 5} more" if len(damaged) > 5 else "")
        print(f"warning: {path}: dropped {len(damaged)} damaged line{'s' * (len(damaged) > 1)} "
              f"(line{'s' * (len(damaged) > 1)} {shown})", file=sys.stderr)
    return good, bool(damaged)


def read_metrics(out_dir):
    """The records of out_dir/metrics.jsonl, oldest first; [] before the first one."""
    path = os.path.join(out_dir, METRICS)
    return [record for _, record in parse_metrics(path)[0]] if os.path.exists(path) else []


def series(records, key):
    """([iter], [value]) of one logged number, in iteration order: where several records give it
    at the same iter (a run resumed before the steps it redid were dropped from the file), the
    last one written wins, so a resumed run reads as one curve. Missing and null values (a
    skipped step's loss) are left out."""
    last = {}
    for r in records:
        if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool):
            last[r.get("iter", 0)] = r[key]
    iters = sorted(last)
    return iters, [last[i] for i in iters]


def truncate_metrics(path, iter_num):
    """Drop records at or after iter_num, left by a run that died after its last checkpoint,
    and damaged lines, so the resumed run's file reads as one history. The file is rewritten only
    when something goes, atomically: a full disk leaves it as it was."""
    if not os.path.exists(path):
        return
    if not os.path.isfile(path):
        raise UserError(f"{path} is not a file (a directory?); move it away so that this run can log there")
    good, damaged = parse_metrics(path)
    kept = [line for line, record in good if record.get("iter", 0) < iter_num]
    if len(kept) == len(good) and not damaged:
        return
    try:
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
    except OSError as e:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        raise UserError(f"could not rewrite {path} to resume: {write_failure(e)}; "
                        f"it and the checkpoints are unchanged; free some space and run again")


# where a record's keys go in wandb and TensorBoard: train/<key>, perf/<key>, else eval/<key>
GROUPS = {"loss": "train", "lr": "train", "grad_norm": "train", "bad_steps": "train",
          "ms": "perf", "tokens_per_s": "perf", "mfu": "perf", "data_wait_ms": "perf"}


def scalars(record):
    """{tag: value} of a record's numbers (not its iter, flags or missing values)."""
    return {f"{GROUPS.get(k, 'eval')}/{k}": float(v) for k, v in record.items()
            if k != "iter" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def start_wandb(project, name, config):
    """wandb, with a run started; a run it cannot start (not logged in, offline) is a UserError
    naming the ways on, before the first step rather than a traceback."""
    import wandb
    try:
        wandb.init(project=project, name=name, config=config)
    except wandb.errors.Error as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UserError(f"wandb_log=True but wandb could not start a run ({reason}); run `wandb login`, "
                        f"or set WANDB_MODE=offline to keep the run in ./wandb for `wandb sync`, or drop "
                        f"wandb_log (metrics.jsonl in out_dir has every number)")
    for group in ("train", "perf", "eval"):
        wandb.define_metric(f"{group}/*", step_metric="iter")
    return wandb


class MetricsLogger:
    """Every record goes to out_dir/metrics.jsonl, and its numbers to wandb and TensorBoard
    (out_dir/tensorboard) when asked, at step record['iter']. A run starting at start_iter first
    drops what an earlier run logged at or after it (steps it will redo), in the file and in
    TensorBoard (purge_step), so a resumed run continues the same curves."""

    def __init__(self, out_dir, start_iter, config=None, wandb_log=False, wandb_project="",
                 wandb_run_name="", tensorboard=False):
        self.wandb = start_wandb(wandb_project, wandb_run_name, config) if wandb_log else None
        self.path = os.path.join(out_dir, METRICS)
        truncate_metrics(self.path, start_iter)
        self.tb = None
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
