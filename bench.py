"""
Measure training and sampling speed. Training is measured by running train.py itself as a
subprocess (so the numbers are the trainer's, not a copy of its loop); sampling is measured
in-process on a randomly initialised GPT.

Training speed of a config (any train.py arguments pass through):

    python bench.py config/train_shakespeare_char.py --max_iters=60 [--key=value ...]

Two settings interleaved A B A B ... so a noisy, shared machine still gives a fair ratio.
A setting is train.py arguments, optionally led by NAME=value environment variables:

    python bench.py --compare "config/train_shakespeare_char.py --dtype=float32" \
                              "config/train_shakespeare_char.py --dtype=bfloat16" --max_iters=60
    python bench.py config/train_shakespeare_char.py --compare "OMP_NUM_THREADS=1" "" --max_iters=60

Against any command that prints nanoGPT-style `iter N: loss X, time Yms` lines (B), run
through the shell in this directory (e.g. nanoGPT):

    python bench.py config/train_shakespeare_char.py --max_iters=60 \
        --compare-cmd "cd /tmp/nanoGPT && python train.py config/train_shakespeare_char.py ..."

Time to quality: whole runs (their own schedules and evaluations), timed from launch to
their best val loss and to a target, A B A B ...:

    python bench.py --quality --target=1.886 --compare config/train_shakespeare_char.py \
        config/speedrun_shakespeare_char_cpu.py --device=cpu

Sampling speed with and without the KV cache (model size as --n_layer=... etc.), and
against nanoGPT's generate on the same weights (DIR is a karpathy/nanoGPT checkout); each
case runs in a fresh process, as sample.py would:

    python bench.py --sample [--num_samples=1] [--repeats=3] [--tokens=500] [--nanogpt=DIR]
    python bench.py --sample --profile      # where a token's time goes, by kind of op

LoRA against full fine-tuning (peak RSS and time per iteration, side by side) on a random
HF model of Qwen3-0.6B's shape (28 layers, hidden 1024, 16/8 heads of 128, MLP 3072; a small
vocabulary, ~0.44B parameters) written to --lora_dir with a chat dataset, block 512:

    python bench.py --lora=16 --max_iters=4 --warmup=1 --rounds=1

Every mode prints a table; --json PATH also writes the numbers.
"""
import argparse
import functools
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from configurator import UserError, at_least, install_error_hook, parse_value

REPO = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(REPO, "train.py")
HUGE = 10**9  # an interval that never comes
# ours: "iter 10: loss 3.2900, lr 7.52e-03, time 18.0ms, ..."; nanoGPT: "iter 10: loss 3.2900,
# time 18.00ms, mfu ..."
LOG_LINE = re.compile(r"^iter (\d+): loss [^,\s]+,.*?\btime ([\d.]+) ?ms", re.M)
# ours: "..., 768 tokens per iteration"; nanoGPT: "tokens per iteration will be: 768"
TOKENS_LINE = re.compile(r"(?:([\d,]+) tokens per iteration\b|tokens per iteration will be: ([\d,]+))")
EVAL_LINE = re.compile(r"^step (\d+): train loss [^,]+, val loss ([\d.]+|nan|inf)")
DTYPE_LINE = re.compile(r"^device \S+, dtype (\w+),", re.M)  # train.py's first line about the run
ENV_WORD = re.compile(r"^[A-Z_][A-Z0-9_]*=")
# the shakespeare_char GPU recipe's model, nanoGPT's architecture (exact GELU)
SAMPLE_MODEL = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65, dropout=0.0,
                    mlp="gelu_exact")


# -----------------------------------------------------------------------------
# running a command and measuring its memory

def process_table():
    """{pid: ppid} of every process (this kernel has no /proc/<pid>/task/*/children)."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    # the command name may hold spaces and parentheses; ppid follows the last ')'
                    table[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass  # the process ended while we looked
    return table


def proc_status(pid):
    """(VmHWM in KiB, command line) of a live process, or None once it is gone (a zombie, which
    has exited but is not yet reaped, has no VmHWM: its last sample stands)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            hwm = next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), None)
        if hwm is None:
            return None
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return hwm, f.read().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError):
        return None


def watch_descendants(root, seen, stop, interval=0.5):
    """Record {pid: (VmHWM KiB, cmdline)} of root's descendants, and under key None the root's
    own, until stop is set. VmHWM is a high-water mark, so a sample every `interval` loses at
    most the growth of a process's last half second; wait4 cannot do this job because it
    reports the max, not the sum, over a tree."""
    while True:
        table = process_table()
        frontier, tree = [root], []
        while frontier:
            pid = frontier.pop()
            kids = [c for c, p in table.items() if p == pid]
            tree += kids
            frontier += kids
        for key, pid in [(None, root)] + [(pid, pid) for pid in tree]:
            status = proc_status(pid)
            if status:
                seen[key] = status
        if stop.wait(interval):
            return


def run_command(argv, env=None, echo=False, shell=False, stamps=None):
    """Run to completion; return (exit code, output, peak RSS KiB of the process or of its
    largest descendant, {pid: (VmHWM, cmd)} of descendants, wall seconds). `stamps`, a list,
    receives (seconds since launch, line) for every line as it arrives."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, shell=shell, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    seen, stop = {}, threading.Event()
    watcher = threading.Thread(target=watch_descendants, args=(proc.pid, seen, stop), daemon=True)
    watcher.start()
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if stamps is not None:
            stamps.append((time.perf_counter() - t0, line))
        if echo:  # timed runs show when each line came, so a cut-off run still tells its times
            print(f"[{time.perf_counter() - t0:7.1f}s] " * (stamps is not None) + line, end="", flush=True)
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not reap it again
    stop.set()
    watcher.join()
    # wait4's ru_maxrss is exact (the kernel folds in the grandchildren it waited for) only
    # above this process's own peak: Linux carries the peak of the memory a child leaves at
    # exec into its ru_maxrss, and a child forked (or vforked) from here leaves ours. At or
    # below it (read now: it only grows), the sampled high-water marks of the tree are the
    # measurement: None for a command that ended before its first sample.
    peak = usage.ru_maxrss
    if peak <= proc_status(os.getpid())[0]:
        peak = max((hwm for hwm, _ in seen.values()), default=None)
    seen.pop(None, None)
    return proc.returncode, "".join(lines), peak, seen, time.perf_counter() - t0


# -----------------------------------------------------------------------------
# one training run: ours (train.py) or an external command

def split_setting(text):
    """'OMP_NUM_THREADS=1 config/x.py --dtype=bfloat16' -> ({env}, [files], [overrides])."""
    words = shlex.split(text)
    env = {}
    while words and ENV_WORD.match(words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    return env, [w for w in words if not w.startswith("--")], [w for w in words if w.startswith("--")]


# speed runs: no evaluations or checkpoints inside the timing, a log line every iteration
TIMING = [f"--eval_interval={HUGE}", "--eval_iters=1", "--log_interval=1", f"--ckpt_interval={HUGE}"]


def train_argv(setting, common, out_dir, nproc, forced=TIMING):
    """train.py's argv: config files first (common, then the setting's), then overrides
    (the setting's win over the common ones), then the bench's own, which must win."""
    env, files, overrides = split_setting(setting)
    _, cfiles, coverrides = split_setting(shlex.join(common))
    forced = [f"--out_dir={out_dir}", *forced]
    launcher = [sys.executable, TRAIN]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={nproc}", TRAIN]
    return env, launcher + cfiles + files + coverrides + overrides + forced


def log_records(output):
    """Per-iteration {'iter', 'ms', 'tokens_per_s'} parsed from stdout, for commands that
    write no metrics.jsonl; tokens/s only when the command says its tokens per iteration."""
    match = TOKENS_LINE.search(output)
    tokens = int((match.group(1) or match.group(2)).replace(",", "")) if match else None
    return [{"iter": int(it), "ms": float(ms), "tokens_per_s": tokens / float(ms) * 1000
             if tokens and float(ms) > 0 else None} for it, ms in LOG_LINE.findall(output)]


def median_of(records, key):
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(records, warmup, maxrss_kib, seen, wall_s):
    """Medians over the iterations after the first `warmup` logged ones."""
    steps = [r for r in records if "ms" in r]
    if len(steps) <= warmup:
        raise UserError(f"{len(steps)} iterations logged, not more than --warmup={warmup}; "
                         f"raise --max_iters")
    timed = steps[warmup:]
    waits = [r.get("data_wait_ms") for r in steps]
    wait = None
    if None not in waits:  # cumulative since the start: the difference over the timed window
        wait = (waits[-1] - (waits[warmup - 1] if warmup else 0.0)) / len(timed)
    workers = [hwm for hwm, cmd in seen.values() if "train.py" in cmd]
    cuda = [r["peak_cuda_mem_mb"] for r in records if r.get("peak_cuda_mem_mb") is not None]
    return {"iters_timed": len(timed), "ms_per_iter": median_of(timed, "ms"),
            "tokens_per_s": median_of(timed, "tokens_per_s"), "mfu": median_of(timed, "mfu"),
            "data_wait_ms_per_iter": wait, "peak_rss_mb": maxrss_kib / 1024 if maxrss_kib else None,
            "workers_rss_sum_mb": sum(workers) / 1024 if workers else None,
            "workers": len(workers), "peak_cuda_mem_mb": max(cuda) if cuda else None,
            "wall_s": wall_s, "flops_per_iter": next((r["flops_per_iter"] for r in records
                                                      if r.get("flops_per_iter")), None)}


def fail(rc, argv, output):
    cmd = argv if isinstance(argv, str) else shlex.join(argv)
    raise UserError(f"exited {rc}: {cmd}\n{output[-3000:]}")


def bench_ours(setting, common, args):
    """One train.py run of a setting; the numbers come from its metrics.jsonl."""
    with tempfile.TemporaryDirectory(prefix="bench-") as out_dir:
        env, argv = train_argv(setting, common, out_dir, args.nproc)
        rc, output, maxrss, seen, wall = run_command(argv, {**os.environ, **env}, args.verbose)
        if rc != 0:
            fail(rc, argv, output)
        from gpt_trainer.metrics import read_metrics
        records = read_metrics(out_dir) or log_records(output)
    result = summarize(records, args.warmup, maxrss, seen, wall)
    result["command"] = " ".join(f"{k}={v}" for k, v in env.items()) + " " * bool(env) + shlex.join(argv)
    match = DTYPE_LINE.search(output)
    result["dtype"] = match.group(1) if match else None
    return result


def bench_external(command, args):
    """One run of a shell command; the numbers come from its `iter N: ... time Yms` lines."""
    rc, output, maxrss, seen, wall = run_command(command, echo=args.verbose, shell=True)
    if rc != 0:
        fail(rc, command, output)
    result = summarize(log_records(output), args.warmup, maxrss, seen, wall)
    result["command"] = command
    result["dtype"] = None  # unknown; with_floor assumes it does A's work in fp32 (nanoGPT on a CPU)
    return result


# -----------------------------------------------------------------------------
# training: one setting, or two interleaved

def spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None, None
    return statistics.median(values), min(values), max(values)


def fmt(value, spec, missing="n/a"):
    return missing if value is None else format(value, spec)


def fmt_spread(values, spec):
    mid, lo, hi = spread(values)
    if mid is None:
        return "n/a"
    return fmt(mid, spec) + ("" if lo == hi else f" ({fmt(lo, spec)}-{fmt(hi, spec)})")


def peak_memory(run):
    """Sum of the workers' peaks for a torchrun job, else the process's peak RSS."""
    if run["workers"] > 1:
        return run["workers_rss_sum_mb"]
    return run["peak_rss_mb"]


def aggregate(runs):
    """Median over rounds of each round's median, with every round kept for the spread."""
    keys = ("ms_per_iter", "tokens_per_s", "mfu", "data_wait_ms_per_iter", "floor_ms_per_iter", "floor_fraction")
    out = {k: spread([r[k] for r in runs])[0] for k in keys}
    out["peak_rss_mb"] = max((m for m in map(peak_memory, runs) if m is not None), default=None)
    cuda = [r["peak_cuda_mem_mb"] for r in runs if r["peak_cuda_mem_mb"] is not None]
    out["peak_cuda_mem_mb"] = max(cuda) if cuda else None
    out["rounds"] = runs
    return out


ROWS = [("ms/iter", "ms_per_iter", ".2f", 1), ("tokens/s", "tokens_per_s", ",.0f", 1),
        ("MFU %", "mfu", ".1f", 100), ("data wait ms/iter", "data_wait_ms_per_iter", ".3f", 1),
        ("floor ms/iter", "floor_ms_per_iter", ".2f", 1), ("% of floor", "floor_fraction", ".1f", 100)]


def print_table(columns):
    """One column per setting {label: runs}: medians across runs, (min-max) when they differ."""
    runs = next(iter(columns.values()))
    print(f"{runs[0]['iters_timed']} timed iterations per run (after --warmup), {len(runs)} "
          f"run(s) per setting; medians, (min-max) across runs")
    print(f"{'':<20}" + "".join(f"{label:>30}" for label in columns))
    for title, key, spec, scale in ROWS:
        cells = [fmt_spread([r[key] * scale if r[key] is not None else None for r in runs], spec)
                 for runs in columns.values()]
        print(f"{title:<20}" + "".join(f"{c:>30}" for c in cells))
    cells = [fmt(max((m for m in map(peak_memory, runs) if m is not None), default=None), ",.0f") for runs in columns.values()]
    print(f"{'peak RSS MiB':<20}" + "".join(f"{c:>30}" for c in cells))
    cells = [fmt_spread([r["peak_cuda_mem_mb"] for r in runs], ",.0f") for runs in columns.values()]
    print(f"{'peak CUDA MiB':<20}" + "".join(f"{c:>30}" for c in cells))


def with_floor(run, machine, flops_per_iter=None):
    """The run's floor (its FLOPs per iteration over the machine's best large-matmul rate in
    its dtype, measured just before it) and the fraction of it reached. A command that does
    not say its FLOPs (nanoGPT) is given those of the run it is compared with, in fp32."""
    from gpt_trainer import floors
    flops = run["flops_per_iter"] or flops_per_iter
    rate = machine["matmul_flops_per_s"].get(run["dtype"] or "float32")
    floor_ms = 1000 * flops / rate if flops and rate else None
    run["floor_ms_per_iter"], run["machine"] = floor_ms, machine
    run["floor_fraction"] = floors.fraction(1 / run["ms_per_iter"], 1 / floor_ms) if floor_ms else None
    return run


def train_machine(args):
    dtypes = ("float32", "bfloat16")
    return measure_machine(args, dtypes)


def kernel_settings(args):
    """--kernel as settings' environment words: [''], ['GPT_CPU_KERNEL=x'] or two of them."""
    from gpt_trainer import cpu_kernels
    if not args.kernel:
        return [""]
    kernels = args.kernel.split(",")
    if len(kernels) > 2 or any(k not in cpu_kernels.LINEAR_KERNELS for k in kernels):
        raise UserError(f"--kernel={args.kernel}: give one or two of {', '.join(cpu_kernels.LINEAR_KERNELS)}")
    if len(kernels) == 2 and (args.compare or args.compare_cmd):
        raise UserError("--kernel with two kernels is the comparison itself; drop --compare/--compare-cmd")
    return [f"GPT_CPU_KERNEL={k}" for k in kernels]


def print_machine(runs):
    """The rates the floors came from, medians over the rounds."""
    machine = [r["machine"] for r in runs]
    cells = []
    for dtype in machine[0]["matmul_by_library"]:
        libs = {lib: statistics.median(m["matmul_by_library"][dtype][lib] for m in machine) / 1e9
                for lib in machine[0]["matmul_by_library"][dtype]}
        cells.append(f"{dtype} {max(libs.values()):.0f} GFLOP/s (" +
                     ", ".join(f"{lib} {v:.0f}" for lib, v in libs.items()) + ")")
    print(f"floor: FLOPs per iteration (6N + attention, as MFU) / the best large-matmul rate measured "
          f"before each round: {'; '.join(cells)}; a command that does not report its FLOPs is "
          f"given A's, in fp32")


def bench_single(setting, common, args):
    runs = []
    for _ in range(args.rounds or 1):
        machine = train_machine(args)
        runs.append(with_floor(bench_ours(setting, common, args), machine))
    print(f"command: {runs[0]['command']}")
    print_table({"": runs})
    print_machine(runs)
    return {"mode": "train", "result": aggregate(runs)}


def bench_compare(setting_a, setting_b, common, args):
    """A B A B ...: both settings see the same slow and fast spells of a shared machine, so
    the ratio within a round is fairer than either absolute number."""
    a_runs, b_runs = [], []
    for i in range(args.rounds or 3):
        machine = train_machine(args)  # once a round: the floor follows the machine's speed
        a_runs.append(with_floor(bench_ours(setting_a, common, args), machine))
        b_runs.append(with_floor(bench_external(args.compare_cmd, args) if args.compare_cmd
                                 else bench_ours(setting_b, common, args), machine, a_runs[-1]["flops_per_iter"]))
        print(f"round {i + 1}: A {a_runs[-1]['ms_per_iter']:.2f} ms/iter, "
              f"B {b_runs[-1]['ms_per_iter']:.2f} ms/iter", flush=True)
    print(f"A: {a_runs[0]['command']}\nB: {b_runs[0]['command']}")
    print_table({"A": a_runs, "B": b_runs})
    print_machine(a_runs)
    ratios = [b["tokens_per_s"] / a["tokens_per_s"] if a["tokens_per_s"] and b["tokens_per_s"]
              else a["ms_per_iter"] / b["ms_per_iter"] for a, b in zip(a_runs, b_runs)]
    print(f"B/A tokens/s: {fmt_spread(ratios, '.3f')} (per round: "
          f"{', '.join(f'{r:.3f}' for r in ratios)})")
    return {"mode": "compare", "A": aggregate(a_runs), "B": aggregate(b_runs),
            "ratio_tokens_per_s": spread(ratios)[0], "ratios": ratios}


# -----------------------------------------------------------------------------
# time to quality: whole runs, each with its own schedule and evaluations

def eval_times(stamps):
    """[(seconds since launch, iter, val loss)] from train.py's `step N: ... val loss X` lines."""
    evals = []
    for seconds, line in stamps:
        match = EVAL_LINE.match(line)
        if match:
            evals.append((seconds, int(match.group(1)), float(match.group(2))))
    return evals


def bench_to_val(setting, common, args, command=None):
    """One complete train.py run of a setting, or a shell `command` printing nanoGPT's `step N:
    train loss X, val loss Y` lines, timed from launch (imports, data and compilation
    included: each run compiles from an empty torch.compile cache, as on a fresh machine)."""
    with tempfile.TemporaryDirectory(prefix="bench-") as out_dir:
        env, argv = {}, command
        if not command:
            env, argv = train_argv(setting, common, out_dir, args.nproc,
                                   forced=["--init_from=scratch", "--wandb_log=False"])
        stamps = []
        env = {**env, "PYTHONUNBUFFERED": "1",  # lines must arrive when printed to be timed
               "TORCHINDUCTOR_CACHE_DIR": os.path.join(out_dir, "inductor"),
               "TRITON_CACHE_DIR": os.path.join(out_dir, "triton")}
        rc, output, _, _, wall = run_command(argv, {**os.environ, **env}, args.verbose, stamps=stamps,
                                             shell=bool(command))
        if rc != 0:
            fail(rc, argv, output)
    shown = command or shlex.join(argv)
    evals = eval_times(stamps)
    if not evals:
        raise UserError(f"no `step N: ... val loss X` line from {shown}")
    best = min(evals, key=lambda e: e[2])
    target = next((e for e in evals if e[2] <= args.target), None) if args.target else None
    return {"command": shown, "wall_s": wall, "evals": evals, "best_val_loss": best[2],
            "best_iter": best[1], "s_to_best": best[0], "s_to_target": target and target[0],
            "target_iter": target and target[1]}


def bench_quality(settings, common, args):
    """A B A B ...: wall time from launch to each run's best val loss and to --target. The
    ratio printed is B's time to the target over A's time to its own best; with --compare-cmd
    (B a command such as nanoGPT's) also A's time to the target over B's."""
    runs = {label: [] for label in ("A", "B")}
    for i in range(args.rounds or 1):
        for label, setting in zip(runs, settings):
            command = args.compare_cmd if label == "B" and args.compare_cmd else None
            run = bench_to_val(setting, common, args, command)
            runs[label].append(run)
            print(f"round {i + 1} {label}: best val {run['best_val_loss']:.4f} at iter {run['best_iter']} "
                  f"after {run['s_to_best']:.1f} s; <= {args.target}: "
                  f"{fmt(run['s_to_target'], '.1f', 'never')} s; whole run {run['wall_s']:.1f} s", flush=True)
    for label in runs:
        print(f"{label}: {runs[label][0]['command']}")
    ratios = [b["s_to_target"] / a["s_to_best"] if b["s_to_target"] else None
              for a, b in zip(runs["A"], runs["B"])]
    print(f"B's seconds to val <= {args.target} / A's seconds to its best val: {fmt_spread(ratios, '.3f')}")
    report = {"mode": "quality", "target": args.target, "A": runs["A"], "B": runs["B"], "ratios": ratios}
    if args.compare_cmd:  # A is ours, B the reference: A's time to the target over B's (or B's best)
        report["a_over_b"] = [a["s_to_target"] / (b["s_to_target"] or b["s_to_best"]) if a["s_to_target"]
                              else None for a, b in zip(runs["A"], runs["B"])]
        print(f"A's seconds to val <= {args.target} / B's (B's to its best where it never got there): "
              f"{fmt_spread(report['a_over_b'], '.3f')}")
    return report


# -----------------------------------------------------------------------------
# sampling: KV cache against full recomputation, and against nanoGPT's generate

def sample_cases(block_size, tokens, nanogpt, device="cpu", variants=()):
    """(name, model, new tokens, use_cache, window, cuda_graphs, variant), from a 1-token prompt:
    the context filled with and without the cache; a run past block_size in every window mode
    and uncached, with learned positions and with RoPE; nanoGPT's generate on the same weights;
    on CUDA the cached steps without graphs and compiled, on the CPU compiled
    (cuda_graphs='compile': cpu_decode.FrozenDecode, as sample.py --compile=True); the first case again for each
    (decode kernel, threads) variant after the first (variant: cpu_kernels' DECODE_KERNEL and
    DECODE_THREADS for the case)."""
    short = block_size - 1
    cases = [(f"{short} new, KV cache", "gpt", short, True, "exact"),
             (f"{short} new, no cache", "gpt", short, False, "exact"),
             (f"{tokens} new, cache exact", "gpt", tokens, True, "exact"),
             (f"{tokens} new, cache chunked", "gpt", tokens, True, "chunked"),
             (f"{tokens} new, no cache", "gpt", tokens, False, "exact"),
             (f"{tokens} new, RoPE, cache sliding", "rope", tokens, True, "sliding"),
             (f"{tokens} new, RoPE, no cache", "rope", tokens, False, "sliding")]
    if nanogpt:
        cases += [(f"{short} new, nanoGPT", "nanogpt", short, False, None),
                  (f"{tokens} new, nanoGPT", "nanogpt", tokens, False, None)]
    if device.startswith("cuda"):  # the cached steps without CUDA graphs, and compiled into them
        cases += [(f"{tokens} new, cache exact, no graphs", "gpt", tokens, True, "exact", False),
                  (f"{tokens} new, cache exact, compiled graphs", "gpt", tokens, True, "exact", "compile")]
    else:  # sample.py --compile=True: each cached step compiled with its weights frozen in
        cases += [(f"{short} new, compiled KV cache", "gpt", short, True, "exact", "compile")]
    first = variants[0] if variants else None
    cases = [(*case[:5], case[5] if len(case) > 5 else True, first) for case in cases]
    cases += [(f"{short} new, KV cache, {kernel}@{threads}", "gpt", short, True, "exact", True, (kernel, threads))
              for kernel, threads in variants[1:]]
    return cases


def decode_variants(args):
    """[(decode kernel, threads)] from --decode_kernel and --decode_threads (comma lists)."""
    from gpt_trainer import cpu_kernels
    kernels = args.decode_kernel.split(",") if args.decode_kernel else [cpu_kernels.DECODE_KERNEL]
    for kernel in kernels:
        if kernel not in cpu_kernels.DECODE_KERNELS:
            raise UserError(f"--decode_kernel={kernel} is not one of {', '.join(cpu_kernels.DECODE_KERNELS)}")
    threads = [int(t) for t in args.decode_threads.split(",")] if args.decode_threads else \
        [cpu_kernels.DECODE_THREADS]
    return [(cpu_kernels.decode_kernel(k, cpu_kernels.VENDOR), t) for k in kernels for t in threads]


def variant_cases(cases):
    """Indices of the cases that repeat the first one with another decode variant."""
    return [i for i, case in enumerate(cases) if case[0].startswith(cases[0][0] + ",")]


# (faster, slower) cases, as named by sample_cases, whose tokens/s ratio is reported when both ran
SPEEDUPS = {"cache_vs_none_short": ("{short} new, KV cache", "{short} new, no cache"),
            "exact_vs_none_long": ("{long} new, cache exact", "{long} new, no cache"),
            "chunked_vs_none_long": ("{long} new, cache chunked", "{long} new, no cache"),
            "rope_sliding_vs_none_long": ("{long} new, RoPE, cache sliding", "{long} new, RoPE, no cache"),
            "cache_vs_nanogpt_short": ("{short} new, KV cache", "{short} new, nanoGPT"),
            "rope_sliding_vs_nanogpt_long": ("{long} new, RoPE, cache sliding", "{long} new, nanoGPT"),
            "chunked_vs_nanogpt_long": ("{long} new, cache chunked", "{long} new, nanoGPT"),
            "exact_vs_nanogpt_long": ("{long} new, cache exact", "{long} new, nanoGPT"),
            "graphs_vs_eager_long": ("{long} new, cache exact", "{long} new, cache exact, no graphs"),
            "compiled_graphs_vs_nanogpt_long": ("{long} new, cache exact, compiled graphs", "{long} new, nanoGPT"),
            "compiled_vs_eager_short": ("{short} new, compiled KV cache", "{short} new, KV cache"),
            "compiled_vs_nanogpt_short": ("{short} new, compiled KV cache", "{short} new, nanoGPT")}
TOKEN_CHECKS = ((0, 1), (2, 4), (5, 6))  # (cached, uncached): the same tokens


def sample_models(overrides, seed, nanogpt):
    """Randomly initialised GPTs in eval mode: the one asked for, its RoPE twin, and with
    `nanogpt` (a nanoGPT checkout) nanoGPT's GPT holding the same weights."""
    import torch
    from model import GPT, GPTConfig
    config = dict(SAMPLE_MODEL)
    for key, value in overrides.items():
        if key not in GPTConfig.field_names():
            raise UserError(f"--{key} is not a GPTConfig field ({', '.join(GPTConfig.field_names())})")
        config[key] = value
    models = {}
    for name, pos_emb in (("gpt", config.get("pos_emb", "learned")), ("rope", "rope")):
        torch.manual_seed(seed)
        try:
            models[name] = GPT(GPTConfig(**{**config, "pos_emb": pos_emb})).eval()
        except ValueError as e:  # the settings' own mistake, e.g. n_embd not divisible by n_head
            raise UserError(f"--sample model settings: {e}") from None
    if nanogpt:
        models["nanogpt"] = nanogpt_model(nanogpt, models["gpt"])
    return models


def nanogpt_model(checkout, ours):
    """nanoGPT's GPT (checkout/model.py) with the weights of `ours`, which must be its architecture."""
    import importlib.util
    path = os.path.join(checkout, "model.py")
    if not os.path.isfile(path):
        raise UserError(f"--nanogpt={checkout}: no model.py there; give a karpathy/nanoGPT checkout")
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = ours.config
    same = (c.pos_emb, c.norm, c.mlp, c.n_kv_head in (0, c.n_head), c.qk_norm, c.tie_embeddings,
            c.logit_softcap) == ("learned", "layernorm", "gelu_exact", True, False, True, 0.0)
    if not same:
        raise UserError("--nanogpt compares on the same weights: keep the model nanoGPT's "
                        "(learned positions, LayerNorm, mlp='gelu_exact', no other options)")
    model = module.GPT(module.GPTConfig(block_size=c.block_size, vocab_size=c.vocab_size, n_layer=c.n_layer,
                                        n_head=c.n_head, n_embd=c.n_embd, dropout=0.0, bias=c.bias))
    model.load_state_dict(ours.state_dict())
    return model.eval()


@functools.cache
def frozen_decode():
    """The one cpu_decode.FrozenDecode of the compiled cases: it keeps each model's compiled
    step from the warm-up to the timed run."""
    from gpt_trainer.cpu_decode import FrozenDecode
    return FrozenDecode()


def time_generate(model, prompt, case, args, seed, autocast=True):
    """(seconds, tokens) of one generation, sampled with a generator seeded by `seed`, under
    --dtype's autocast (sample.py's) unless autocast=False."""
    import torch
    from gpt_trainer import cpu_kernels
    from gpt_trainer.generate import generate
    from gpt_trainer.runtime import autocast_context
    _, kind, n, use_cache, window, graphs, variant = case
    if variant:  # the decode kernel and threads of this case (cpu_kernels reads them per step)
        cpu_kernels.DECODE_KERNEL, cpu_kernels.DECODE_THREADS = variant
    device = prompt.device
    decode_fn = None
    if graphs == "compile" and device.type == "cpu":
        decode_fn = frozen_decode()
    ctx = autocast_context(device.type, args.dtype if autocast else "float32")
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with ctx:
        if kind == "nanogpt":  # its generate draws from the global RNG
            torch.manual_seed(seed)
            out = model.generate(prompt, n, temperature=args.temperature, top_k=args.top_k or None)
        else:
            out = generate(model, prompt, n, temperature=args.temperature, top_k=args.top_k or None,
                           generator=torch.Generator(device).manual_seed(seed), use_cache=use_cache,
                           window=window, cuda_graphs=graphs, decode_fn=decode_fn)
    out = out.cpu()  # waits for the device
    return time.perf_counter() - t0, out


def first_difference(a, b):
    diff = (a != b).nonzero()
    return None if len(diff) == 0 else int(diff[0, 1])


def check_tokens(models, prompt, cases, outputs, args):
    """Cached tokens must equal uncached ones (same seed, same context every step). fp32 can
    flip a near-tied pick, so a difference is re-checked in float64, where only a real bug
    can make them differ."""
    import copy
    checks = []
    uncached = {c[2]: j for j, c in enumerate(cases) if c[1] == "gpt" and not c[3] and c[4] == "exact"}
    graph_cases = [(i, uncached[c[2]]) for i, c in enumerate(cases) if c[5] is not True]  # graphs, compiled
    variants = [(i, 1) for i in variant_cases(cases)]
    for cached, uncached in [*TOKEN_CHECKS, *graph_cases, *variants]:
        if cached not in outputs or uncached not in outputs:  # not both chosen by --cases
            continue
        where = first_difference(outputs[cached], outputs[uncached])
        check = {"cached": cases[cached][0], "uncached": cases[uncached][0],
                 "fp32_first_difference": where, "fp64_first_difference": None}
        if where is not None:
            double = copy.deepcopy(models[cases[cached][1]]).double()
            a = time_generate(double, prompt, (*cases[cached][:6], ("aten", 0)), args, args.seed,
                              autocast=False)[1]
            b = time_generate(double, prompt, cases[uncached], args, args.seed, autocast=False)[1]
            check["fp64_first_difference"] = first_difference(a, b)
        check["ok"] = check["fp64_first_difference"] is None
        checks.append(check)
    return checks


def timed_case(models, prompt, case, args):
    """(seconds, tokens) of one generation after a short warm-up (first calls allocate and
    pick kernels)."""
    time_generate(models[case[1]], prompt, (*case[:2], 4, *case[3:]), args, args.seed)
    return time_generate(models[case[1]], prompt, case, args, args.seed)


def fresh_process_case(i, args):
    """timed_case for case i in a new Python process, as a user's sample.py runs: in one long
    process, a long case left the allocator and caches in a state that slowed the next
    cases (nanoGPT's generate by 10-15%)."""
    import torch
    argv = [sys.executable, os.path.abspath(__file__), *args.argv, f"--case={i}"]
    p = subprocess.run(argv, capture_output=True, text=True)
    if p.returncode:
        fail(p.returncode, argv, p.stdout + p.stderr)
    result = json.loads(p.stdout.strip().splitlines()[-1])
    return result["seconds"], torch.tensor(result["tokens"])


# aten ops by what they do in a decoding step, matched in their names; the rest of a
# token's time is other ops (residual adds, views, allocations) and Python
OP_KINDS = {"matmuls": ("addmm", "aten::mm", "addmv", "aten::mv", "bmm", "_linear_pointwise"),
            "attention": ("scaled_dot_product", "flash_attention"),
            "norms": ("layer_norm", "rms_norm"), "activation": ("gelu", "silu", "relu"),
            "copies (KV cache, output)": ("copy_",),
            "sampling": ("exponential_", "argmax", "softmax", "topk", "clamp_min_", "gather", "cumsum", "div")}


def profile_case(models, prompt, case, args):
    """Where a token's time goes in `case`: self CPU time of its aten ops under torch.profiler,
    by OP_KINDS, per token; everything else (other ops, Python, dispatch, the profiler's own
    cost) is the profiled wall time minus the ops'. On CUDA also the GPU's side: kernels per
    token and their time, by kernel (a CUDA graph's replay shows no aten ops, only kernels)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    seconds = timed_case(models, prompt, case, args)[0]
    cuda = prompt.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        profiled = time_generate(models[case[1]], prompt, case, args, args.seed)[0]
    kinds, kernels = dict.fromkeys([*OP_KINDS, "other ops"], 0.0), {}
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.key] = (event.self_device_time_total / 1e3 / case[2], event.count / case[2])
            continue
        kind = next((k for k, names in OP_KINDS.items() if any(n in event.key for n in names)), "other ops")
        kinds[kind] += event.self_cpu_time_total / 1e6
    kinds["Python, dispatch and profiler"] = profiled - sum(kinds.values())
    per_token = {k: 1000 * v / case[2] for k, v in kinds.items()}
    print(f"{case[0]}: {1000 * seconds / case[2]:.3f} ms/token, {1000 * profiled / case[2]:.3f} under "
          f"the profiler, of which (ms/token):")
    for kind, ms in per_token.items():
        print(f"  {kind:<32}{ms:>8.3f}")
    report = {"mode": "sample_profile", "case": case[0], "ms_per_token": 1000 * seconds / case[2],
              "profiled_ms_per_token": 1000 * profiled / case[2], "profile_ms_per_token": per_token}
    if cuda:
        report["device"] = print_kernels(kernels)
    return report


def print_kernels(kernels):
    """The GPU's side of a profiled generation: {kernel: (ms, launches) per token}, busiest first."""
    busy, launches = sum(ms for ms, _ in kernels.values()), sum(n for _, n in kernels.values())
    print(f"GPU: {launches:.1f} kernels per token, busy {busy:.3f} ms/token; the busiest (ms/token, per token):")
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])
    for name, (ms, n) in top[:15]:
        print(f"  {ms:8.4f} {n:6.1f}  {name[:100]}")
    return {"kernels_per_token": launches, "busy_ms_per_token": busy,
            "kernels": {name: {"ms_per_token": ms, "per_token": n} for name, (ms, n) in top}}


def bench_sample(overrides, args):
    import torch
    if args.nanogpt and not args.temperature:
        raise UserError("--nanogpt needs --temperature > 0 (nanoGPT's generate divides by it)")
    from gpt_trainer.runtime import resolve_device, resolve_dtype
    device = resolve_device(args.device)
    args.dtype = resolve_dtype(args.dtype, device.split(":")[0])
    torch.backends.cuda.matmul.allow_tf32 = True  # as sample.py
    models = {k: m.to(device) for k, m in sample_models(overrides, args.seed, args.nanogpt).items()}
    cases = sample_cases(models["gpt"].config.block_size, args.tokens, args.nanogpt, device, decode_variants(args))
    prompt = torch.zeros((args.num_samples, 1), dtype=torch.long, device=device)
    if args.case is not None:  # one case for a parent bench.py, as JSON on the last line
        seconds, out = timed_case(models, prompt, cases[args.case], args)
        print(json.dumps({"seconds": seconds, "tokens": out.tolist()}))
        return None
    chosen = [i for i, case in enumerate(cases) if not args.cases
              or any(part.strip() in case[0] for part in args.cases.split(";"))]
    if not chosen:
        raise UserError(f"--cases={args.cases!r} matches none of: {'; '.join(c[0] for c in cases)}")
    if args.profile:
        return profile_case(models, prompt, cases[chosen[0]], args)
    times, outputs, machine = {cases[i][0]: [] for i in chosen}, {}, []
    for rep in range(args.repeats):  # interleaved: every case sees the same machine noise
        machine.append(measure_machine(args, ("float32",)))
        for i in chosen:
            seconds, out = (timed_case(models, prompt, cases[i], args) if args.in_process
                            else fresh_process_case(i, args))
            times[cases[i][0]].append(args.num_samples * cases[i][2] / seconds)
            outputs.setdefault(i, out)
        print(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(
            f"{name} {speeds[-1]:,.1f}" for name, speeds in times.items()) + " tokens/s", flush=True)
    checks = check_tokens(models, prompt, cases, outputs, args)
    floors = sample_floors(models, cases, times, machine, args.num_samples)
    print_sample(models["gpt"], cases, times, checks, floors, machine, args)
    return {"mode": "sample", "config": vars(models["gpt"].config), "num_samples": args.num_samples,
            "temperature": args.temperature, "top_k": args.top_k, "threads": torch.get_num_threads(),
            "in_process": args.in_process, "tokens_per_s": times, "machine": machine,
            "median_tokens_per_s": {k: statistics.median(v) for k, v in times.items()},
            "floor_tokens_per_s": floors,
            "fraction_of_floor": {k: floor_fraction(statistics.median(times[k]), floors[k]) for k in times},
            "speedups": sample_speedups(cases, times), "token_checks": checks}


def measure_machine(args, dtypes):
    """The machine's rates now: copy bandwidth (bytes/s) and the best large-matmul FLOP/s per
    dtype, over aten and oneDNN (floors.py)."""
    from gpt_trainer import floors
    device = getattr(args, "device", "cpu")
    rates = {d: floors.matmul_rates(d, args.measure_n, device=device) for d in dtypes}
    return {"copy_bytes_per_s": floors.copy_bandwidth(args.measure_mb << 20, device=device),
            "matmul_flops_per_s": {d: max(r.values()) for d, r in rates.items()}, "matmul_by_library": rates}


def machine_median(machine, key, dtype=None):
    values = [m[key][dtype] if dtype else m[key] for m in machine]
    return statistics.median(values)


def sample_floors(models, cases, times, machine, batch):
    """{case: tokens/s at the floor}: the copy bandwidth and fp32 matmul rate are the medians
    of those measured before each repeat; nanoGPT's generate is the uncached recomputation."""
    from gpt_trainer import floors
    bandwidth = machine_median(machine, "copy_bytes_per_s")
    rate = machine_median(machine, "matmul_flops_per_s", "float32")
    out = {}
    for name, kind, n, use_cache, window, *_ in cases:
        if name not in times:
            continue
        model = models["gpt" if kind == "nanogpt" else kind]
        seconds = floors.generation_floor(model, 1, n, use_cache, window or "exact", bandwidth, rate, batch)
        out[name] = batch * n / seconds
    return out


def weight_mb(model):
    from gpt_trainer import floors
    return floors.weight_bytes(model) / 1e6


def floor_fraction(measured, floor):
    from gpt_trainer import floors
    return floors.fraction(measured, floor)


def speedup_pairs(cases):
    """{key: (faster case index, slower case index)} of the SPEEDUPS among these cases."""
    short, long = cases[0][2], cases[2][2]
    index = {c[0]: i for i, c in enumerate(cases)}
    pairs = {key: tuple(index.get(name.format(short=short, long=long)) for name in names)
             for key, names in SPEEDUPS.items()}
    return {key: pair for key, pair in pairs.items() if None not in pair}


def sample_speedups(cases, times):
    """Per-repeat ratios of tokens/s (same repeat, so the same machine noise) of the SPEEDUPS
    whose cases both ran, and of each decode variant against the first KV cache case."""
    pairs = {key: (i, j) for key, (i, j) in speedup_pairs(cases).items()
             if cases[i][0] in times and cases[j][0] in times}
    pairs.update({f"variant {cases[i][6][0]}@{cases[i][6][1]} vs {cases[0][6][0]}@{cases[0][6][1]}": (i, 0)
                  for i in variant_cases(cases) if cases[i][0] in times and cases[0][0] in times})
    return {key: [a / b for a, b in zip(times[cases[i][0]], times[cases[j][0]])] for key, (i, j) in pairs.items()}


def print_sample(model, cases, times, checks, floors, machine, args):
    import torch
    c = model.config
    how = "greedy" if not args.temperature else f"temperature {args.temperature}, top_k {args.top_k}"
    where = (torch.cuda.get_device_name() if next(model.parameters()).is_cuda
             else f"{torch.get_num_threads()} threads")
    print(f"sample: GPT {c.n_layer}x{c.n_embd} ({c.n_head} heads), block {c.block_size}, vocab "
          f"{c.vocab_size}, batch {args.num_samples}, {args.dtype}, {how}, {where}, "
          f"decode {cases[0][6][0]} at {cases[0][6][1] or torch.get_num_threads()} thread(s), "
          f"{args.repeats} interleaved repeats; medians (min-max)")
    print(f"floor: copy bandwidth {machine_median(machine, 'copy_bytes_per_s') / 1e9:.1f} GB/s, fp32 matmul "
          f"{machine_median(machine, 'matmul_flops_per_s', 'float32') / 1e9:.0f} GFLOP/s (medians of "
          f"{len(machine)}); a cached token reads {weight_mb(model):.1f} MB of weights plus its KV cache")
    print(f"{'case':<40}{'tokens/s':>26}{'ms/token':>10}{'floor ms':>10}{'of floor':>10}")
    for name in times:
        mid = statistics.median(times[name])
        print(f"{name:<40}{fmt_spread(times[name], ',.1f'):>26}{1000 * args.num_samples / mid:>10.2f}"
              f"{1000 * args.num_samples / floors[name]:>10.2f}{floor_fraction(mid, floors[name]):>10.1%}")
    for key, ratios in sample_speedups(cases, times).items():
        i, j = speedup_pairs(cases).get(key, (None, None))
        label = key if i is None else f"({cases[i][0]}) / ({cases[j][0]})"
        print(f"speedup {label}: {fmt_spread(ratios, '.2f')}x (per repeat: {', '.join(f'{r:.2f}' for r in ratios)})")
    for check in checks:
        verdict = "equal" if check["fp32_first_difference"] is None else (
            f"differ from token {check['fp32_first_difference']} in fp32; float64: "
            + ("equal (fp32 rounding on near-tied logits)" if check["ok"] else
               f"DIFFER from token {check['fp64_first_difference']} (a bug)"))
        print(f"token check, {check['cached']} vs {check['uncached']}: {verdict}")


# -----------------------------------------------------------------------------

# argparse, not configurator's settings: bench.py passes train.py's config files and --key=value through
def parse_args(argv):
    """Bench options; everything else (config files, --key=value) passes through to
    train.py, or, with --sample, sets GPTConfig fields. --compare takes the next two words
    verbatim, because a setting may begin with '--', which argparse would take as an option."""
    compare = None
    if "--compare" in argv:
        i = argv.index("--compare")
        if len(argv) < i + 3:
            raise UserError("--compare needs two settings, e.g. --compare \"--dtype=float32\" \"\"")
        compare, argv = argv[i + 1:i + 3], argv[:i] + argv[i + 3:]
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare-cmd", help="B: a shell command printing `iter N: ... time Yms` lines")
    p.add_argument("--rounds", type=int, help="runs per setting (default 3 with a comparison, else 1)")
    p.add_argument("--warmup", type=int, default=10, help="logged iterations to skip per run")
    p.add_argument("--nproc", type=int, default=1, help="run train.py under torchrun with this many workers")
    p.add_argument("--quality", action="store_true",
                   help="with --compare: time whole runs to their best val loss and to --target")
    p.add_argument("--target", type=float, help="--quality: the val loss to reach")
    p.add_argument("--sample", action="store_true", help="benchmark sampling instead of training")
    p.add_argument("--num_samples", type=int, default=1, help="--sample: batch size")
    p.add_argument("--repeats", type=int, default=3, help="--sample: interleaved repeats")
    p.add_argument("--tokens", type=int, default=500, help="--sample: length of the long runs")
    p.add_argument("--seed", type=int, default=1337, help="--sample: weights and sampling")
    p.add_argument("--temperature", type=float, default=0.8, help="--sample: 0 = greedy")
    p.add_argument("--top_k", type=int, default=200, help="--sample: 0 = no limit")
    p.add_argument("--in_process", action="store_true", help="--sample: time every case in this "
                   "process (a faster start, but a long case can slow the ones after it)")
    p.add_argument("--profile", action="store_true", help="--sample: where a token's time goes in the first case "
                   "--cases picks, the KV cache's by default (torch.profiler, in this process; "
                   "on CUDA also the kernels)")
    p.add_argument("--decode_kernel", help="--sample: decode matmul kernel(s), comma-separated, from "
                   "auto, aten, aten_t, onednn (default: GPT_DECODE_KERNEL or auto); more than one "
                   "adds the KV cache case for each, interleaved, with its ratio to the first")
    p.add_argument("--decode_threads", help="--sample: threads of a decoding step, comma-separated "
                   "(0 = torch's; default: GPT_DECODE_THREADS or 0); combined with --decode_kernel")
    p.add_argument("--kernel", help="training: Linear's fp32 CPU matmuls, auto|onednn|aten (sets "
                   "GPT_CPU_KERNEL for train.py); two, comma-separated, compare them A/B")
    p.add_argument("--measure_mb", type=int, default=256, help="size of the copy that measures bandwidth, MiB")
    p.add_argument("--measure_n", type=int, default=1536, help="size of the matmuls that measure FLOP/s")
    p.add_argument("--cases", help="--sample: only the cases whose names contain one of these "
                   "';'-separated parts, e.g. '255 new, KV cache;255 new, nanoGPT'")
    p.add_argument("--case", type=int, help=argparse.SUPPRESS)  # one case, in a child process
    p.add_argument("--nanogpt", metavar="DIR", help="--sample: also time nanoGPT's generate (DIR/model.py) "
                   "on the same weights")
    p.add_argument("--lora", type=int, metavar="RANK", help="compare LoRA of this rank with full "
                   "fine-tuning of a random Qwen3-shaped model (--lora_shape)")
    p.add_argument("--lora_dir", default=os.path.join(tempfile.gettempdir(), "bench_lora"),
                   help="--lora: where the random model and its chat data are written (kept for reruns)")
    p.add_argument("--lora_shape", default="28,1024,3072",
                   help="--lora: layers,hidden,intermediate of the Qwen3-shaped model")
    p.add_argument("--device", default="cpu", help="--sample: where to run ('cuda' for a GPU)")
    p.add_argument("--dtype", default="float32", help="--sample: autocast dtype, as sample.py's --dtype")
    p.add_argument("--json", help="also write the numbers to this file")
    p.add_argument("--verbose", action="store_true", help="show the training runs' output")
    args, rest = p.parse_known_args(argv)
    args.compare = compare
    lows = dict(rounds=1, warmup=0, nproc=1, num_samples=1, repeats=1, tokens=1, top_k=0, temperature=0,
                measure_mb=1, measure_n=1, lora=1)
    for name, low in lows.items():
        value, (ok, expected) = getattr(args, name), at_least(low)  # train.py's rule for its own counts
        if value is not None and not ok(value):
            raise UserError(f"--{name}={value} must be {expected}")
    return args, rest


def lora_common(args):
    """train.py arguments fine-tuning the random Qwen3-shaped model in args.lora_dir on its chat
    data (both written on the first use)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    n_layer, hidden, inter = (int(v) for v in args.lora_shape.split(","))
    model_dir, data_dir = (os.path.join(args.lora_dir, f"{n}-{args.lora_shape.replace(',', '-')}")
                           for n in ("qwen3", "data"))
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.train_from_iterator(["reverse the word please"], trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")
        hf_tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                                "'<|im_end|>\\n' }}{% endfor %}")
        torch.manual_seed(0)
        cfg = transformers.Qwen3Config(vocab_size=len(hf_tok), hidden_size=hidden, num_hidden_layers=n_layer,
                                       num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                       intermediate_size=inter, max_position_embeddings=512,
                                       tie_word_embeddings=True)
        transformers.Qwen3ForCausalLM(cfg).save_pretrained(model_dir)
        hf_tok.save_pretrained(model_dir)
    if not os.path.exists(os.path.join(data_dir, "meta.json")):
        words = [f"{a}{b}{c}" for a in "abcdefgh" for b in "abcdefgh" for c in "abcdefgh"]
        chats = os.path.join(args.lora_dir, "chats.jsonl")
        with open(chats, "w") as f:
            for w in words:
                f.write(json.dumps({"messages": [{"role": "user", "content": f"reverse {w} " * 8},
                                                 {"role": "assistant", "content": w[::-1] * 8}]}) + "\n")
        run_command([sys.executable, os.path.join(REPO, "data", "chat", "prepare.py"), f"--input={chats}",
                     f"--encoding=hf:{model_dir}", f"--out_dir={data_dir}"], echo=True)
    return [f"--init_from={model_dir}", f"--data_dir={data_dir}", "--block_size=512", "--batch_size=1",
            "--gradient_accumulation_steps=1", "--device=cpu", "--compile=False", "--dtype=float32",
            f"--eval_interval={HUGE}", "--learning_rate=1e-4", "--warmup_iters=0", "--decay_lr=False"]


def sample_overrides(rest):
    overrides = {}
    for word in rest:
        if not word.startswith("--") or "=" not in word:
            raise UserError(f"--sample takes --key=value model settings, not {word!r}")
        key, text = word[2:].split("=", 1)
        overrides[key] = parse_value(text)
    return overrides


def main(argv):
    args, rest = parse_args(argv)
    args.argv = argv
    if not args.sample:  # --device and --dtype are train.py's own settings there, not --sample's
        rest += [w for w in argv if w.startswith(("--device=", "--dtype="))]
        args.device = next((w.split("=", 1)[1] for w in reversed(rest) if w.startswith("--device=")), "cpu")
    if args.sample:
        report = bench_sample(sample_overrides(rest), args)
        if report is None:
            return
    elif args.lora:
        report = bench_compare(f"--lora_rank={args.lora}", "", lora_common(args) + rest, args)
    elif args.quality:
        if not args.compare and not args.compare_cmd:
            raise UserError("--quality needs --compare A B (two settings to time) or --compare-cmd")
        report = bench_quality(args.compare or ("", None), rest, args)
    elif args.compare or args.compare_cmd or len(kernel_settings(args)) == 2:
        a, b = args.compare or ("", None if args.compare_cmd else "")
        kernels = kernel_settings(args)
        a, b = (f"{kernels[0]} {a}", b if b is None else f"{kernels[-1]} {b}")
        report = bench_compare(a, b, rest, args)
    else:
        report = bench_single(f"{kernel_settings(args)[0]}", rest, args)
    report["argv"] = argv
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    install_error_hook()
    main(sys.argv[1:])
