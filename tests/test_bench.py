"""
bench.py: the training report of a tiny config (through train.py as a subprocess), an
interleaved comparison, a comparison against an external nanoGPT-style command, the sampling
benchmark with its cached == uncached token checks, and the log-line parsing.
"""
import json
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
from configurator import UserError  # noqa: E402
from trainutil import corpus_text, write_char_dataset  # noqa: E402

# 1 layer x 32, block 16: an iteration takes milliseconds, so a run is mostly start-up
TINY_TRAIN = ["--device=cpu", "--compile=False", "--n_layer=1", "--n_head=2", "--n_embd=32",
              "--block_size=16", "--batch_size=4", "--gradient_accumulation_steps=1",
              "--warmup_iters=2", "--max_iters=8", "--warmup=2", "--measure_mb=8", "--measure_n=128"]
TINY_SAMPLE = ["--sample", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32",
               "--tokens=40", "--repeats=2", "--in_process", "--measure_mb=8", "--measure_n=128"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    # 60k characters are plenty for 8 steps of 4 x 16 tokens and keep the id check instant
    return write_char_dataset(str(tmp_path_factory.mktemp("benchdata")), corpus_text()[:60_000])


def run_bench(*args, tmp_path, timeout=120):
    """bench.py's stdout and --json report; one thread per process, because two processes
    each spinning two OpenMP threads on a shared 2-core machine can run 100x slower."""
    report = os.path.join(str(tmp_path), "report.json")
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, os.path.join(REPO, "bench.py"), *args, "--json", report],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"bench.py exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    with open(report) as f:
        return p.stdout, json.load(f)


def test_train_report(tiny_data, tmp_path):
    out, report = run_bench(*TINY_TRAIN, f"--data_dir={tiny_data}", "--warmup=1", tmp_path=tmp_path)
    result = report["result"]
    # 4 x 16 tokens per iteration: tokens/s and ms/iter are medians of the same 7 log lines, an
    # odd count, so the median iteration is the same one for both (an even count averages two)
    assert result["tokens_per_s"] == pytest.approx(64 * 1000 / result["ms_per_iter"], rel=1e-3)
    assert result["peak_rss_mb"] > 50  # python + torch alone is well over 50 MiB
    assert result["mfu"] is None  # no known peak FLOPS on a CPU
    assert result["data_wait_ms_per_iter"] >= 0
    assert result["rounds"][0]["iters_timed"] == 7  # 8 iterations minus 1 warm-up
    for row in ("ms/iter", "tokens/s", "peak RSS MiB", "data wait ms/iter", "floor ms/iter", "% of floor"):
        assert row in out
    check_train_floor(out, result["rounds"][0], tiny_data)


def check_train_floor(out, run, data_dir):
    """The floor: FLOPs per iteration as the MFU formula gives them for the model train.py
    built (6N + 12 L H Q T per token), over the best fp32 rate measured before the run; the
    printed fraction is the measured speed over the floor's."""
    from gpt_trainer.dataloader import load_meta
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=load_meta(data_dir)["vocab_size"]))
    assert run["flops_per_iter"] == (6 * model.get_num_params() + 12 * 1 * 2 * 16 * 16) * 4 * 16  # 4 x 16 tokens
    rate = run["machine"]["matmul_flops_per_s"]["float32"]
    assert run["dtype"] == "float32" and rate == max(run["machine"]["matmul_by_library"]["float32"].values())
    assert run["floor_ms_per_iter"] == pytest.approx(1000 * run["flops_per_iter"] / rate)
    assert run["floor_fraction"] == pytest.approx(run["floor_ms_per_iter"] / run["ms_per_iter"])
    row = next(line for line in out.splitlines() if line.startswith("% of floor"))
    assert float(row.split()[-1]) == pytest.approx(100 * run["floor_fraction"], abs=0.051)


@pytest.mark.slow
def test_compare_interleaved(tiny_data, tmp_path):
    out, report = run_bench(*TINY_TRAIN, f"--data_dir={tiny_data}", "--rounds=2",
                            "--compare", "--batch_size=4", "--batch_size=8", tmp_path=tmp_path)
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("round")] == \
        ["round 1", "round 2"]
    assert len(report["ratios"]) == 2
    per_round = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(report["A"]["rounds"], report["B"]["rounds"])]
    assert report["ratios"] == pytest.approx(per_round)
    assert report["ratio_tokens_per_s"] == pytest.approx(sum(per_round) / 2)  # the median of two
    assert "B/A tokens/s:" in out
    # the setting's override reached train.py, after the common ones
    assert "--batch_size=8" in report["B"]["rounds"][0]["command"]
    assert report["B"]["rounds"][0]["command"].index("--batch_size=8") > \
        report["B"]["rounds"][0]["command"].index("--batch_size=4")


@pytest.mark.slow
def test_compare_external_command(tiny_data, tmp_path):
    # a stand-in for nanoGPT: its log format, 10 ms per iteration, 640 tokens per iteration; it
    # lives a second, as a real run does, so that its memory is sampled (bench.run_command)
    fake = ("import sys, time; print('tokens per iteration will be: 640'); "
            "[print(f'iter {i}: loss 4.1000, time 10.00ms, mfu -100.00%') for i in range(8)]; time.sleep(1)")
    out, report = run_bench(*TINY_TRAIN, f"--data_dir={tiny_data}", "--rounds=1",
                            "--compare-cmd", f"{sys.executable} -c \"{fake}\"", tmp_path=tmp_path)
    assert report["B"]["ms_per_iter"] == pytest.approx(10.0)
    assert report["B"]["tokens_per_s"] == pytest.approx(64_000)
    assert 5 < report["B"]["peak_rss_mb"] < 100  # a python process's RSS, not the bench's
    assert "B/A tokens/s:" in out


def check_sample_report(out, report, compiled=False):
    """compiled: the run includes the compiled case (sample.py --compile=True's step)."""
    speeds = report["median_tokens_per_s"]
    assert set(speeds) == {"31 new, KV cache", "31 new, no cache", "40 new, cache exact",
                           "40 new, cache chunked", "40 new, no cache", "40 new, RoPE, cache sliding",
                           "40 new, RoPE, no cache"} | ({"31 new, compiled KV cache"} if compiled else set())
    assert all(v > 0 for v in speeds.values())
    assert report["speedups"]["cache_vs_none_short"][0] > 0
    assert ("compiled_vs_eager_short" in report["speedups"]) == compiled
    # sampled tokens with the cache (and compiled) equal those of full recomputation (same seed)
    checks = 4 if compiled else 3
    assert [c["ok"] for c in report["token_checks"]] == [True] * checks
    assert out.count("token check") == checks and "DIFFER" not in out
    check_sample_floor(out, report)


def check_sample_floor(out, report):
    """The KV cache case's floor: its bytes (floors.py) over the median copy bandwidth of
    those measured before each repeat; printed fractions are measured speed over the floor's."""
    from gpt_trainer import floors
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(**{**bench.SAMPLE_MODEL, "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32}))
    assert len(report["machine"]) >= 1  # measured before each repeat
    bandwidth = bench.machine_median(report["machine"], "copy_bytes_per_s")
    rate = bench.machine_median(report["machine"], "matmul_flops_per_s", "float32")
    want = 31 / floors.generation_floor(model, 1, 31, True, "exact", bandwidth, rate)
    assert report["floor_tokens_per_s"]["31 new, KV cache"] == pytest.approx(want)
    for case, speed in report["median_tokens_per_s"].items():
        assert report["fraction_of_floor"][case] == pytest.approx(speed / report["floor_tokens_per_s"][case])
    line = next(line for line in out.splitlines() if line.startswith("31 new, KV cache "))
    floor_ms, frac = line.split()[-2:]
    assert float(floor_ms) == pytest.approx(1000 / report["floor_tokens_per_s"]["31 new, KV cache"], abs=0.006)
    assert float(frac.rstrip("%")) == pytest.approx(100 * report["fraction_of_floor"]["31 new, KV cache"], abs=0.051)


def test_sample(tmp_path):
    # every case but the compiled one, which compiles for tens of seconds (the slow test below)
    eager = "31 new, KV cache;no cache;cache exact;cache chunked;cache sliding"
    check_sample_report(*run_bench(*TINY_SAMPLE, f"--cases={eager}", tmp_path=tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("cases,profiled", [((), "31 new, KV cache"), (("--cases=no cache",), "31 new, no cache")])
def test_sample_profile(tmp_path, cases, profiled):
    out, report = run_bench("--sample", "--profile", "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=32",
                            *cases, tmp_path=tmp_path)
    assert report["case"] == profiled and "device" not in report  # kernels only on CUDA
    parts = report["profile_ms_per_token"]
    # every kind of op a decoding step runs was found by name, and the ops fit in the wall time
    assert all(parts[kind] > 0 for kind in bench.OP_KINDS)
    assert sum(parts.values()) == pytest.approx(report["profiled_ms_per_token"])
    assert parts["Python, dispatch and profiler"] > 0
    assert profiled in out and "matmuls" in out


@pytest.mark.slow
def test_sample_each_case_in_a_fresh_process(tmp_path):
    args = [a for a in TINY_SAMPLE if a not in ("--in_process", "--repeats=2")] + ["--repeats=1"]
    out, report = run_bench(*args, tmp_path=tmp_path, timeout=300)
    assert report["in_process"] is False
    check_sample_report(out, report, compiled=True)


def test_log_parsing():
    ours = ("device cpu, dtype float32, world size 1, 1 micro-steps per rank, 768 tokens per "
            "iteration\niter 10: loss 3.2900, lr 7.52e-03, time 18.0ms, 28,521 tok/s, mfu n/a\n")
    nano = ("tokens per iteration will be: 12,288\niter 0: loss 4.2, time 1234.56ms, mfu -100.00%\n"
            "step 250: train loss 1.9, val loss 2.0\niter 1: loss nan, time 54.10ms, mfu 1.2%\n")
    assert bench.log_records(ours) == [{"iter": 10, "ms": 18.0, "tokens_per_s": pytest.approx(768 / 0.018)}]
    records = bench.log_records(nano)
    assert [(r["iter"], r["ms"]) for r in records] == [(0, 1234.56), (1, 54.10)]
    assert records[1]["tokens_per_s"] == pytest.approx(12288 / 0.0541)


def test_setting_order_and_env():
    env, argv = bench.train_argv("OMP_NUM_THREADS=1 --dtype=bfloat16 config/b.py", ["config/a.py",
                                 "--max_iters=60", "--dtype=float32"], "/tmp/x", 1)
    assert env == {"OMP_NUM_THREADS": "1"}
    args = argv[2:]
    # files first, then common overrides, then the setting's, then the bench's own
    assert args[:4] == ["config/a.py", "config/b.py", "--max_iters=60", "--dtype=float32"]
    assert args[4] == "--dtype=bfloat16" and args[5] == "--out_dir=/tmp/x"
    assert "--log_interval=1" in args


def test_peak_rss_is_the_child_s_not_the_bench_s():
    """A child started from a large bench process reports its own peak, not ours (Linux carries
    the memory a child leaves at exec into wait4's ru_maxrss), both below and above ours."""
    held = bytearray(600 << 20)  # this process now peaks above 600 MiB
    held[::4096] = b"x" * len(held[::4096])  # touched, so resident
    small = [sys.executable, "-c", "import time; time.sleep(1.5)"]
    large = [sys.executable, "-c", "import time; b = bytearray(900 << 20); b[::4096] = b'x' * len(b[::4096]); "
             "time.sleep(1.5)"]
    rc, _, small_kib, _, _ = bench.run_command(small)
    assert rc == 0 and 1 << 10 < small_kib < 100 << 10, f"{small_kib / 1024:.0f} MiB"
    rc, _, large_kib, _, _ = bench.run_command(large)
    assert rc == 0 and 900 << 10 < large_kib < 1000 << 10, f"{large_kib / 1024:.0f} MiB"
    # through a shell, the python under `sh -c` is measured, not the shell
    rc, _, shell_kib, _, _ = bench.run_command(f"{sys.executable} -c 'import time; time.sleep(1.5)' && true",
                                               shell=True)
    assert rc == 0 and 1 << 10 < shell_kib < 100 << 10, f"{shell_kib / 1024:.0f} MiB"
    del held


def test_an_exited_child_keeps_its_sampled_peak():
    """Between its exit and wait4 a child is a zombie whose status has no VmHWM; a sample taken
    then must not replace its peak with 0 (the 0 MiB peaks seen on a loaded machine)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    assert wait_for_state(proc.pid, "Z")
    assert bench.proc_status(proc.pid) is None
    proc.wait()


def wait_for_state(pid, state, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == state:
                return True
        time.sleep(0.01)
    return False


def test_summary_data_wait():
    steps = [{"iter": i, "ms": 10.0 + i, "tokens_per_s": 100.0, "mfu": None,
              "data_wait_ms": 2.0 * (i + 1)} for i in range(6)]
    s = bench.summarize(steps, 2, 2048, {}, 1.0)
    assert s["iters_timed"] == 4 and s["ms_per_iter"] == pytest.approx(13.5)
    assert s["data_wait_ms_per_iter"] == pytest.approx(2.0)  # cumulative -> per iteration
    assert s["peak_rss_mb"] == 2.0
    with pytest.raises(UserError, match="--warmup=6"):
        bench.summarize(steps, 6, 2048, {}, 1.0)


@pytest.mark.slow
def test_quality_times_whole_runs(tiny_data, tmp_path):
    # each setting runs its own schedule: evaluations at iter 0 and at its max_iters
    out, report = run_bench(*TINY_TRAIN, f"--data_dir={tiny_data}", "--quality", "--target=10",
                            "--compare", "--max_iters=8", "--max_iters=4", tmp_path=tmp_path)
    a, b = report["A"][0], report["B"][0]
    assert [e[1] for e in a["evals"]] == [0, 8] and [e[1] for e in b["evals"]] == [0, 4]
    assert 0 < a["evals"][0][0] < a["evals"][1][0] <= a["wall_s"]  # seconds since launch
    assert a["best_val_loss"] == min(e[2] for e in a["evals"])
    # every val loss is under 10, so the target is reached at the first evaluation
    assert b["s_to_target"] == b["evals"][0][0] and b["target_iter"] == 0
    assert report["ratios"] == [pytest.approx(b["s_to_target"] / a["s_to_best"])]
    assert "--init_from=scratch" in a["command"] and "B's seconds to val <= 10.0" in out


@pytest.mark.slow
def test_quality_against_an_external_command(tiny_data, tmp_path):
    """--quality --compare-cmd: B is a command printing nanoGPT's `step N: train loss X, val
    loss Y` lines; A's time to the target is reported over B's (B's best where it never got there)."""
    lines = "; ".join(f"print('step {i}: train loss 9.0, val loss {v}', flush=True)" for i, v in ((0, 9.5), (4, 9.0)))
    out, report = run_bench(*TINY_TRAIN, f"--data_dir={tiny_data}", "--quality", "--target=10",
                            "--compare-cmd", f'{sys.executable} -c "{lines}"', tmp_path=tmp_path)
    a, b = report["A"][0], report["B"][0]
    assert [e[1:] for e in b["evals"]] == [[0, 9.5], [4, 9.0]] and b["best_val_loss"] == 9.0
    assert a["s_to_target"] and b["s_to_target"] == b["evals"][0][0]
    assert report["a_over_b"] == [pytest.approx(a["s_to_target"] / b["s_to_target"])]
    assert "A's seconds to val <= 10.0 / B's" in out


def test_sample_bad_model_setting_is_a_user_error():
    with pytest.raises(UserError, match=r"--sample model settings: n_embd=64 is not divisible by n_head=6"):
        bench.sample_models({"n_embd": 64, "n_head": 6}, 0, None)


@pytest.mark.parametrize("arg", ["--rounds=0", "--rounds=-1", "--repeats=0", "--nproc=0", "--warmup=-1",
                                 "--temperature=nan", "--top_k=-1", "--tokens=0"])
def test_counts_out_of_range_are_user_errors(arg):
    """--rounds=-1 ended in an IndexError and --rounds=0 measured one round."""
    with pytest.raises(UserError, match=f"^{arg.split('=')[0]}=.* must be >= "):
        bench.parse_args([arg, "config/train_shakespeare_char.py"])
    p = subprocess.run([sys.executable, os.path.join(REPO, "bench.py"), arg], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [p.stderr.strip()], p.stderr
    assert p.stderr.startswith(f"error: {arg.split('=')[0]}=")


def test_sample_nanogpt_needs_a_checkout_and_its_architecture(tmp_path):
    from configurator import UserError
    models = bench.sample_models({"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32}, 0, None)
    with pytest.raises(UserError, match="nanoGPT checkout"):
        bench.nanogpt_model(str(tmp_path), models["gpt"])
    (tmp_path / "model.py").write_text("")
    with pytest.raises(UserError, match="same weights"):
        bench.nanogpt_model(str(tmp_path), models["rope"])


@pytest.mark.slow
def test_sample_decode_variants(tmp_path):
    """--decode_kernel and --decode_threads A/B every decode kernel and thread count in one
    command: each gets the KV cache case, its tokens equal full recomputation, and its
    per-repeat ratio to the first is reported; --cases keeps only the cases named."""
    from gpt_trainer import cpu_kernels
    kernels = ["aten_t", "aten"] + (["onednn"] if cpu_kernels.ONEDNN_LINEAR is not None else [])
    out, report = run_bench(*TINY_SAMPLE, f"--decode_kernel={','.join(kernels)}", "--decode_threads=1,2",
                            "--cases=31 new, KV cache;31 new, no cache", tmp_path=tmp_path)
    variants = [f"{k}@{t}" for k in kernels for t in (1, 2)]
    assert list(report["median_tokens_per_s"]) == ["31 new, KV cache", "31 new, no cache"] + [
        f"31 new, KV cache, {v}" for v in variants[1:]]
    assert [c["ok"] for c in report["token_checks"]] == [True] * len(variants)
    assert set(report["speedups"]) == {"cache_vs_none_short"} | {f"variant {v} vs aten_t@1" for v in variants[1:]}
    assert "decode aten_t at 1 thread(s)" in out
    with pytest.raises(AssertionError, match="matches none of"):
        run_bench(*TINY_SAMPLE, "--cases=nothing", tmp_path=tmp_path)


@pytest.mark.slow
def test_train_dtype_and_device_reach_train_py(tiny_data, tmp_path):
    """--dtype and --device are --sample's options too; when training they are train.py's, and
    the floor uses the rate of the dtype the run used."""
    args = [a for a in TINY_TRAIN if a != "--max_iters=8"] + ["--max_iters=4", "--warmup=1"]
    out, report = run_bench(*args, f"--data_dir={tiny_data}", "--dtype=bfloat16", tmp_path=tmp_path)
    run = report["result"]["rounds"][0]
    assert "--dtype=bfloat16" in run["command"] and "--device=cpu" in run["command"]
    assert run["dtype"] == "bfloat16"
    rate = run["machine"]["matmul_flops_per_s"]["bfloat16"]
    assert run["floor_ms_per_iter"] == pytest.approx(1000 * run["flops_per_iter"] / rate)
