"""
Activation checkpointing (train.py's activation_checkpointing, GPT.set_recompute): backward
recomputes the activations it did not keep, with the forward's RNG state, so losses and
gradients are bitwise those of no checkpointing (fp32, CPU, dropout on, DropoutAttention
included), in-process and through train.py, and under torchrun (DDP and FSDP2) and compile.
"""
import os

import pytest
import torch

from model import GPT, GPTConfig
from trainutil import char_data, read_metrics, run_torchrun, run_train, step_losses  # noqa: F401

TINY = dict(block_size=32, vocab_size=64, n_layer=3, n_head=4, n_embd=32, dropout=0.2)
ARCHS = {"gpt2": {}, "llama_like": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2,
                                        qk_norm=True, tie_embeddings=False, bias=False)}


def train_steps(recompute, arch, steps=3):
    """(losses, gradients of every step) of a few AdamW steps with dropout."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, **ARCHS[arch]))
    model.set_recompute(recompute)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(1)
    losses, grads = [], []
    for _ in range(steps):
        idx = torch.randint(64, (4, 33), generator=data)
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, grads


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("recompute", ["block", "attn", "mlp"])
def test_recompute_is_bitwise(recompute, arch):
    want_losses, want_grads = train_steps("none", arch)
    losses, grads = train_steps(recompute, arch)
    assert all(torch.equal(a, b) for a, b in zip(losses, want_losses)), (losses, want_losses)
    for step, (got, want) in enumerate(zip(grads, want_grads)):
        for name in want:
            assert torch.equal(got[name], want[name]), (step, name)


def saved_bytes(model, idx):
    """Bytes autograd keeps for backward outside checkpointed regions (checkpoint's own hooks
    take over inside them)."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx[:, :-1], idx[:, 1:])
    return sum(saved)


def test_recompute_keeps_less():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY, "n_layer": 6}))
    idx = torch.randint(64, (4, 33))
    kept = {}
    for recompute in ("none", "attn", "mlp", "block"):
        model.set_recompute(recompute)
        kept[recompute] = saved_bytes(model, idx)
    assert kept["block"] < kept["attn"] < kept["none"] and kept["mlp"] < kept["none"]
    assert kept["block"] < 0.4 * kept["none"]  # 5 of 6 blocks keep only their input
    model.eval()
    with torch.no_grad():  # nothing to recompute: no checkpoint, the same logits
        logits, _ = model(idx[:, :-1])
    model.set_recompute("none")
    with torch.no_grad():
        assert torch.equal(model(idx[:, :-1])[0], logits)
    with pytest.raises(ValueError, match="recompute"):
        model.set_recompute("everything")


def final_weights(out):
    return torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)["model"]


@pytest.mark.slow
def test_train_py_setting_and_resume(tmp_path, char_data):
    """Through train.py: the logged losses and final weights equal those without checkpointing,
    to the bit, also when the run is stopped and resumed with it on."""
    run = dict(dropout=0.2, eval_interval=1000, ckpt_interval=1000, gradient_accumulation_steps=2)
    none, block, resumed = (str(tmp_path / name) for name in ("none", "block", "resumed"))
    run_train(none, char_data, max_iters=4, **run)
    run_train(block, char_data, max_iters=4, activation_checkpointing="block", **run)
    run_train(resumed, char_data, max_iters=2, activation_checkpointing="mlp", **run)
    run_train(resumed, char_data, max_iters=4, init_from="resume", activation_checkpointing="block", **run)
    want = step_losses(read_metrics(none))
    assert sorted(want) == list(range(4))
    assert step_losses(read_metrics(block)) == step_losses(read_metrics(resumed)) == want
    for out in (block, resumed):
        got = final_weights(out)
        assert all(torch.equal(got[k], v) for k, v in final_weights(none).items())
    p = run_train(str(tmp_path / "bad"), char_data, activation_checkpointing="all", check=False, **run)
    assert p.returncode == 1 and "activation_checkpointing" in p.stderr


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_recompute_under_torchrun(tmp_path, char_data, fsdp):
    """Two gloo ranks with dropout: the same losses with and without checkpointing."""
    run = dict(max_iters=4, dropout=0.2, eval_interval=1000, ckpt_interval=1000, fsdp=fsdp, n_layer=3,
               gradient_accumulation_steps=2)
    losses = {}
    for mode in ("none", "block"):
        out = str(tmp_path / mode)
        run_torchrun(2, out, char_data, activation_checkpointing=mode, **run)
        losses[mode] = step_losses(read_metrics(out))
    assert sorted(losses["none"]) == list(range(4))
    assert losses["block"] == losses["none"]


@pytest.mark.slow
def test_recompute_under_compile(tmp_path, char_data):
    """torch.compile traces the checkpointed blocks; the losses stay those of eager without
    checkpointing to fp32 rounding (inductor fuses differently)."""
    run = dict(max_iters=3, dropout=0.0, eval_interval=1000, ckpt_interval=1000, n_layer=3)
    eager, compiled = str(tmp_path / "eager"), str(tmp_path / "compiled")
    run_train(eager, char_data, **run)
    p = run_train(compiled, char_data, compile=True, activation_checkpointing="block", timeout=600, **run)
    assert "torch.compile failed" not in p.stderr, p.stderr
    a, b = step_losses(read_metrics(eager)), step_losses(read_metrics(compiled))
    assert sorted(a) == sorted(b) == list(range(3))
    for it in a:
        assert abs(a[it] - b[it]) < 1e-4 * abs(a[it]), (it, a[it], b[it])
