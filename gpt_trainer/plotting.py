"""
plot.py's figure of runs' metrics.jsonl (train.py's plot=True draws it too): one panel per
PANELS entry, one line per run, matplotlib's Agg backend (no display needed). A resumed run is
one curve (metrics.series); damaged lines are dropped with a warning naming them.
"""
import io
import os
import sys

from gpt_trainer.errors import UserError
from gpt_trainer.metrics import read_metrics, series

# (metrics.jsonl key, panel title); train.py logs the first one per step and val_* per eval
PANELS = [("loss", "train loss"), ("val_loss", "val loss"), ("val_bpb", "val bits per byte"),
          ("lr", "learning rate"), ("grad_norm", "gradient norm"), ("tokens_per_s", "tokens/s")]
XLABELS = {"iter": "iteration", "tokens": "tokens", "time": "training time (s)"}


def load_runs(dirs):
    """{run dir: records} for every run, or a UserError naming the first one without metrics."""
    runs = {}
    for d in dirs:
        if not os.path.exists(os.path.join(d, "metrics.jsonl")):
            what = "does not exist" if not os.path.exists(d) else "has no metrics.jsonl (train.py writes one)"
            raise UserError(f"{d} {what}; give the out_dir of a run")
        runs[d] = read_metrics(d)
    empty = [d for d, records in runs.items() if not records]
    if len(empty) == len(runs):
        raise UserError(f"{empty[0]}/metrics.jsonl has no records yet (train.py appends one per logged "
                        f"iteration); nothing to plot")
    for d in empty:
        print(f"warning: {d}/metrics.jsonl has no records yet; plotting the other runs", file=sys.stderr)
    return runs


def x_of(records, x):
    """A function iter -> the x coordinate for --x of a record at that iter: the steps done before
    it (the iteration), the tokens they saw, or the seconds they took (each logged step's time
    standing for itself and the unlogged steps since the log line before)."""
    if x == "iter":
        return lambda it: it
    steps, ms = series(records, "ms")
    _, tps = series(records, "tokens_per_s")
    if x == "tokens":
        per_iter = round(tps[0] * ms[0] / 1000) if tps else 0  # tokens_per_s = tokens per iter / seconds
        return lambda it: it * per_iter
    ends, total, prev = [], 0.0, -1  # (step, seconds of training once it was done)
    for it, m in zip(steps, ms):
        total += m / 1000 * (it - prev)
        ends.append((it, total))
        prev = it
    return lambda it: max([t for i, t in ends if i < it], default=0.0)


def make_figure(runs, x="iter"):
    """A matplotlib figure, one panel per PANELS entry and one line per run, labelled by its dir."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), squeeze=False)
    for ax, (key, title) in zip(axes.flat, PANELS):
        for name, records in runs.items():
            iters, values = series(records, key)
            if iters:
                to_x = x_of(records, x)
                ax.plot([to_x(i) for i in iters], values, label=name, marker="o" if len(iters) < 30 else None,
                        markersize=3)
        ax.set_title(title)
        ax.set_xlabel(XLABELS[x])
        ax.grid(alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        elif key in ("loss", "val_loss", "val_bpb") or len(runs) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def summary_rows(runs):
    rows = []
    for name, records in runs.items():
        steps, loss = series(records, "loss")
        _, val = series(records, "val_loss")
        _, bpb = series(records, "val_bpb")
        rows.append((name, steps[-1] if steps else "", f"{loss[-1]:.4f}" if loss else "",
                     f"{min(val):.4f}" if val else "", f"{bpb[-1]:.4f}" if bpb else ""))
    return rows


def write_html(fig, runs, path):
    """An HTML page: the figure as inline SVG (zooms without blurring) and a table of each run's last
    iteration, last train loss, best val loss and last val bpb."""
    import html
    svg = io.StringIO()
    fig.savefig(svg, format="svg")
    head = ("run", "last iter", "train loss", "best val loss", "val bpb")
    table = "".join(f"<tr>{''.join(f'<td>{html.escape(str(c))}</td>' for c in row)}</tr>" for row in summary_rows(runs))
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"<!doctype html><meta charset='utf-8'><title>{html.escape(', '.join(runs))}</title>"
                f"<table border=1 cellpadding=4><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr>{table}</table>"
                f"{svg.getvalue()[svg.getvalue().index('<svg'):]}")


def plot(dirs, out="", x="iter", html_path=""):
    """Write the PNG (and the HTML page) of the runs in dirs; returns the PNG's path."""
    runs = load_runs(dirs)
    out = out or (os.path.join(dirs[0], "metrics.png") if len(dirs) == 1 else "compare.png")
    fig = make_figure(runs, x)
    try:
        fig.savefig(out, dpi=100)
        if html_path:
            write_html(fig, runs, html_path)
    except OSError as e:
        raise UserError(f"cannot write {e.filename or out}: {e.strerror}")
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)
    return out
