"""
Plot runs from their out_dir/metrics.jsonl: train loss, val loss, val bits per byte, learning
rate, gradient norm and tokens/s, one line per run, into one PNG (matplotlib's Agg backend: no
display needed; the file's path is printed).

    python plot.py out-shakespeare-char                         # -> out-shakespeare-char/metrics.png
    python plot.py out-a out-b --x=tokens --out=compare.png     # two runs against tokens seen
    python plot.py out-a --x=time --html=out-a/metrics.html     # also an HTML page (SVG + a table)

--x: what was done before a record's iteration: 'iter' (optimizer steps), 'tokens' (steps x tokens
per step) or 'time' (training seconds: each logged step's time stands for the steps since the
previous log line; evals and checkpoint saves are left out). A resumed run is one curve; damaged
lines are dropped with a warning naming them. The figure is gpt_trainer/plotting.py's.
"""
import sys

from configurator import ArgumentParser
from gpt_trainer.errors import install_error_hook
from gpt_trainer.plotting import XLABELS, plot


def main(argv):
    parser = ArgumentParser(description="Plot runs' metrics.jsonl: losses, bpb, lr, grad norm, tokens/s.")
    parser.add_argument("runs", nargs="+", help="out_dirs of runs (each holds a metrics.jsonl)")
    parser.add_argument("--x", default="iter", choices=sorted(XLABELS), help="the x axis (default: iter)")
    parser.add_argument("--out", default="", help="PNG to write (default: RUN/metrics.png for one run, "
                                                  "compare.png for several)")
    parser.add_argument("--html", default="", help="also write this HTML page (the figure as SVG and a table)")
    args = parser.parse_args(argv)
    print(plot(args.runs, args.out, args.x, args.html))
    if args.html:
        print(args.html)


if __name__ == "__main__":
    install_error_hook()
    main(sys.argv[1:])
