"""
plot.py (gpt_trainer/plotting.py): the figure holds exactly the numbers of the runs' metrics.jsonl (read back from its
Line2D objects), a resumed run is one curve, and a damaged line or a missing run is one line.
"""
import json
import os
import subprocess
import sys

import pytest

from gpt_trainer.errors import UserError
from trainutil import REPO, child_env

pytest.importorskip("matplotlib")
from gpt_trainer import plotting as plot  # noqa: E402

PLOT = os.path.join(REPO, "plot.py")
TOKENS_PER_ITER = 768


def step_record(it, seed):
    ms = 20.0 + (it * 7 + seed) % 5
    return {"iter": it, "loss": 4.0 - 0.1 * it + 0.01 * seed, "lr": 1e-3 * min(1, (it + 1) / 4),
            "grad_norm": 1.5 / (it + 1) + seed, "ms": ms, "tokens_per_s": TOKENS_PER_ITER / (ms / 1000), "mfu": None,
            "bad_steps": 0, "data_wait_ms": 0.1}


def eval_record(it, seed):
    return {"iter": it, "train_loss": 3.9 - 0.1 * it, "val_loss": 4.1 - 0.1 * it + seed, "val_bpb": 5.9 - 0.14 * it}


def write_run(path, records, damaged=()):
    """metrics.jsonl as train.py writes it; damaged: raw lines appended after the records."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in damaged:
            f.write(line)
    return str(path)


def lines_of(fig):
    """{(panel title, run label): (xs, ys)} read back from the figure's Line2D objects."""
    out = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            out[(ax.get_title(), line.get_label())] = (list(line.get_xdata()), list(line.get_ydata()))
    return out


def expected(path, key):
    """(iters, values) of key straight from the file's JSON lines, the last record of an iter
    winning (a resumed run redid those steps)."""
    last = {}
    with open(os.path.join(path, "metrics.jsonl")) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if isinstance(r, dict) and r.get(key) is not None:
                last[r["iter"]] = r[key]
    return sorted(last), [last[i] for i in sorted(last)]


@pytest.fixture
def two_runs(tmp_path):
    # run a: 12 steps, evals every 4. run b: stopped at 9 after the eval at 8, resumed from its
    # checkpoint at 6: steps 6..9 written twice, the resumed values last; and a torn last line
    a = [r for it in range(12) for r in ([eval_record(it, 0)] if it % 4 == 0 else []) + [step_record(it, 0)]]
    first = [r for it in range(10) for r in ([eval_record(it, 1)] if it % 4 == 0 else []) + [step_record(it, 1)]]
    resumed = [r for it in range(6, 14) for r in ([eval_record(it, 2)] if it % 4 == 0 else []) + [step_record(it, 2)]]
    return (write_run(tmp_path / "out-a", a),
            write_run(tmp_path / "out-b", first + resumed, damaged=['{"iter": 14, "loss": 2.'])), tmp_path


def test_figure_holds_the_numbers_of_metrics_jsonl(two_runs, capsys):
    (a, b), _ = two_runs
    fig = plot.make_figure(plot.load_runs([a, b]))
    assert "dropped 1 damaged line" in capsys.readouterr().err
    lines = lines_of(fig)
    for key, title in plot.PANELS:
        for run in (a, b):
            iters, values = expected(run, key)
            assert lines[(title, run)] == (iters, values), (key, run)
    # the resumed run is one curve over every step, with the resumed run's numbers where it redid steps
    xs, ys = lines[("train loss", b)]
    assert xs == list(range(14))
    assert ys[6:] == [step_record(it, 2)["loss"] for it in range(6, 14)]
    assert lines[("val loss", b)][0] == [0, 4, 8, 12]


def test_x_axis_tokens_and_time(two_runs):
    (a, _), _ = two_runs
    lines = lines_of(plot.make_figure(plot.load_runs([a]), x="tokens"))
    iters, _ = expected(a, "val_loss")
    assert lines[("val loss", a)][0] == [it * TOKENS_PER_ITER for it in iters]
    lines = lines_of(plot.make_figure(plot.load_runs([a]), x="time"))
    _, ms = expected(a, "ms")
    seconds = [sum(ms[:k]) / 1000 for k in range(len(ms))]  # every step logged: the time of the steps before
    assert lines[("train loss", a)][0] == pytest.approx(seconds, rel=1e-12)
    assert lines[("val loss", a)][0] == pytest.approx([seconds[it] for it in iters], rel=1e-12)


def test_command_writes_png_and_html(two_runs):
    (a, b), tmp = two_runs
    out, page = str(tmp / "c.png"), str(tmp / "c.html")
    p = subprocess.run([sys.executable, PLOT, a, b, "--x=tokens", f"--out={out}", f"--html={page}"],
                       cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [out, page]
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(page) as f:
        text = f.read()
    assert "<svg" in text and os.path.basename(b) in text
    assert len([line for line in p.stderr.splitlines() if line.strip()]) == 1  # the damaged line's warning
    assert plot.plot([a]) == os.path.join(a, "metrics.png")  # one run: into its own dir
    assert os.path.exists(os.path.join(a, "metrics.png"))


def test_missing_run_is_named(two_runs):
    (a, _), tmp = two_runs
    for missing, words in ((str(tmp / "nope"), "does not exist"), (str(tmp), "has no metrics.jsonl")):
        with pytest.raises(UserError, match=f"{missing} {words}"):
            plot.plot([a, missing], out=str(tmp / "never.png"))
    assert not os.path.exists(tmp / "never.png")


def test_a_run_with_no_records_yet_is_said(two_runs, capsys):
    """A run started but not yet logged: alone it is an error (no empty picture), beside others a
    warning, and the others are plotted."""
    (a, _), tmp = two_runs
    empty = write_run(tmp / "out-new", [])
    with pytest.raises(UserError, match=f"{empty}/metrics.jsonl has no records yet"):
        plot.plot([empty], out=str(tmp / "never.png"))
    assert not os.path.exists(tmp / "never.png")
    plot.plot([a, empty], out=str(tmp / "both.png"))
    assert os.path.exists(tmp / "both.png")
    assert f"warning: {empty}/metrics.jsonl has no records yet" in capsys.readouterr().err
