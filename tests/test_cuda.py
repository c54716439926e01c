"""
The CUDA path, on a GPU (skipped without one; .ci/gpu runs it): bf16 and fp16 (GradScaler)
training, compile='auto', a non-finite step skipped on the device, SIGTERM and resume,
torchrun on NCCL (DDP and FSDP2), Muon, every architecture option, KV-cache decoding as
CUDA graphs against full recomputation, and sample.py.

CUDA kernels may add in a different order from run to run (atomics in backward), so a
resumed or torchrun run is compared with the uninterrupted single process to a tolerance,
and whether it was bitwise equal is printed (run with -s to see it).
"""
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from gpt_trainer.cuda_decode import DECODERS
from gpt_trainer.generate import generate
from gpt_trainer.metrics import read_metrics
from model import GPT, GPTConfig
from test_model import ARCHS, TINY as TINY_MODEL, tiny_model
from trainutil import (REPO, char_data, last_logged_iter, load_ckpt, popen_train, run_torchrun, run_train,  # noqa: F401
                       step_losses, wait_for)

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (.ci/gpu runs these)")]

GPU = dict(device="cuda", compile=False, max_iters=40, lr_decay_iters=40, log_interval=1,
           n_layer=2, n_head=4, n_embd=64, block_size=64, batch_size=16)


def losses_of(out):
    return step_losses(read_metrics(out))


def assert_close_losses(a, b, tol, what):
    common = sorted(set(a) & set(b))
    assert common, what
    worst = max(abs(a[i] - b[i]) for i in common)
    bitwise = all(a[i] == b[i] for i in common)
    print(f"{what}: {len(common)} steps, max |difference| {worst:.2e}, bitwise equal: {bitwise}")
    assert worst < tol, (what, worst)


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, char_data):  # noqa: F811
    out = str(tmp_path_factory.mktemp("bf16") / "out")
    run_train(out, char_data, dtype="bfloat16", ckpt_interval=10, **GPU)
    return out


def test_bf16_trains(bf16_run):
    losses = losses_of(bf16_run)
    assert sorted(losses) == list(range(40))
    assert losses[39] < losses[0] - 0.5, losses
    assert load_ckpt(bf16_run)["iter_num"] == 40


def test_fp16_trains_with_grad_scaler(tmp_path, char_data):  # noqa: F811
    out = str(tmp_path / "out")
    run_train(out, char_data, dtype="float16", **GPU)
    losses = losses_of(out)
    assert losses[39] < losses[0] - 0.5, losses
    scaler = load_ckpt(out)["scaler"]
    assert scaler and scaler["scale"] > 0, scaler


def test_compile_auto_compiles_and_trains_like_eager(tmp_path, bf16_run, char_data):  # noqa: F811
    out = str(tmp_path / "out")
    p = run_train(out, char_data, dtype="bfloat16", ckpt_interval=10, **{**GPU, "compile": "auto"}, timeout=900)
    assert "torch.compile failed" not in p.stderr, p.stderr[-3000:]
    # bf16 rounding differs between fused and unfused kernels, and grows over the steps
    assert_close_losses(losses_of(bf16_run), losses_of(out), 0.05, "compile='auto' vs eager, bf16")


def test_non_finite_steps_are_skipped_on_the_device(tmp_path, bf16_run, char_data):  # noqa: F811
    out = str(tmp_path / "out")
    shutil.copytree(bf16_run, out)
    p = run_train(out, char_data, init_from="resume", learning_rate=1e30, grad_clip=0, warmup_iters=0,
                  decay_lr=False, max_bad_steps=3, ckpt_interval=1, dtype="bfloat16",
                  **{**GPU, "max_iters": 90}, check=False)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "non-finite" in last, p.stderr[-2000:]
    skipped = [r for r in read_metrics(out) if r.get("skipped_step")]
    assert [r["bad_steps"] for r in skipped] == [1, 2, 3]
    assert all(torch.isfinite(v).all() for v in load_ckpt(out)["model"].values())


def test_sigterm_saves_and_resume_continues(tmp_path, char_data):  # noqa: F811
    settings = dict(GPU, dtype="bfloat16", max_iters=400, lr_decay_iters=400, ckpt_interval=10**6)
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    run_train(whole, char_data, **settings)
    proc = popen_train(cut, char_data, **settings)
    wait_for(lambda: last_logged_iter(cut) >= 50, 300, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    stopped = load_ckpt(cut)["iter_num"]
    assert 50 < stopped < 400, stopped
    run_train(cut, char_data, init_from="resume", **settings)
    resumed = {i: v for i, v in losses_of(cut).items() if i >= stopped}
    assert_close_losses(losses_of(whole), resumed, 1e-2, f"resumed at iter {stopped} vs uninterrupted")


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_torchrun_one_process_on_nccl(tmp_path, bf16_run, char_data, fsdp):  # noqa: F811
    out = str(tmp_path / "out")
    p = run_torchrun(1, out, char_data, dtype="bfloat16", ckpt_interval=10, fsdp=fsdp, backend="auto", **GPU)
    assert "world size 1" in p.stdout, p.stdout[-2000:]
    assert_close_losses(losses_of(bf16_run), losses_of(out), 1e-2, f"torchrun NCCL {'FSDP2' if fsdp else 'DDP'}")


def test_muon_trains(tmp_path, char_data):  # noqa: F811
    out = str(tmp_path / "out")
    run_train(out, char_data, optimizer="muon", dtype="bfloat16", **GPU)
    losses = losses_of(out)
    assert losses[39] < losses[0] - 0.5, losses


@pytest.mark.parametrize("arch", ARCHS)
def test_architecture_trains_and_decodes(arch):
    """Each option: a bf16 forward/backward with finite gradients, and KV-cache decoding
    through CUDA graphs giving the tokens of full recomputation (in float64, as test_model's
    checks: a tiny random model has near-tied logits that float32 could flip)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY_MODEL, **ARCHS[arch]})).cuda()
    x = torch.randint(64, (4, 32), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(x, x)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model = tiny_model(**ARCHS[arch]).cuda()
    prompt = torch.randint(64, (2, 3), device="cuda")
    graphs = generate(model, prompt, 25, temperature=0)
    assert DECODERS.get(model), "generate did not use CUDA graphs"
    full = generate(model, prompt, 25, temperature=0, use_cache=False)
    eager = generate(model, prompt, 25, temperature=0, cuda_graphs=False)
    assert torch.equal(graphs, eager) and torch.equal(graphs, full), (graphs, eager, full)
    again = generate(model, prompt[:, :1], 25, temperature=0)  # the captured graph, a new prefill
    assert torch.equal(again, generate(model, prompt[:, :1], 25, temperature=0, use_cache=False))


def test_sample_py_on_cuda(bf16_run):
    """sample.py on the GPU: eager CUDA graphs and compiled ones give the same greedy text."""
    def sample(*args):
        p = subprocess.run([sys.executable, "sample.py", f"--out_dir={bf16_run}", "--device=cuda",
                            "--num_samples=2", "--max_new_tokens=60", "--temperature=0", "--dtype=float32",
                            *args], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stdout
    plain = sample()
    assert len(plain.strip()) > 60
    assert sample("--compile=True") == plain


def test_bench_profiles_kernels_of_a_graph_replay(tmp_path):
    """bench.py --sample --profile on CUDA sees the kernels a CUDA graph replays (the replay
    itself shows no aten ops): at least one kernel per layer per token, busy time > 0."""
    from test_bench import run_bench
    _, report = run_bench("--sample", "--profile", "--device=cuda", "--dtype=bfloat16", "--in_process",
                          "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=32", "--cases=KV cache",
                          tmp_path=tmp_path, timeout=300)
    device = report["device"]
    assert report["case"] == "31 new, KV cache"
    assert device["kernels_per_token"] >= 2 and device["busy_ms_per_token"] > 0, device
    assert sum(k["per_token"] for k in device["kernels"].values()) == pytest.approx(device["kernels_per_token"])
