"""
nanoGPT's checkpoints, both ways (gpt_trainer/nanogpt.py, docs/nanogpt.md).

Without a nanoGPT checkout: a checkpoint laid out as nanoGPT's train.py writes one (its
model_args keys, its state_dict names) is checked against a reference forward written here
from nanoGPT's model (exact GELU, learned positions, LayerNorm); our checkpoints are checked
to have nanoGPT's model_args keys exactly and its optimizer order. With NANOGPT=DIR (a
karpathy/nanoGPT checkout): its own model.py, sample.py and train.py on the same files.
"""
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

from configurator import ConfigError
from gpt_trainer import checkpoint, nanogpt, optim
from gpt_trainer.resume_config import resume_settings, saved_run
from model import GPT, GPTConfig
from test_model import ARCHS
from trainutil import REPO, SHAKESPEARE, child_env, load_ckpt, run_train

NANOGPT = os.environ.get("NANOGPT", "")
need_nanogpt = pytest.mark.skipif(not NANOGPT or not os.path.isfile(os.path.join(NANOGPT, "model.py")),
                                  reason="needs a karpathy/nanoGPT checkout: set NANOGPT=DIR")

# nanoGPT's GPTConfig has exactly these fields; its train.py saves them as model_args
NANOGPT_FIELDS = ["block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias"]
NanoConfig = dataclasses.make_dataclass("NanoConfig", NANOGPT_FIELDS)  # its GPTConfig(**model_args)
ARGS = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=True, vocab_size=65, dropout=0.0)


def nanogpt_state_dict(args, seed=0):
    """Random weights under nanoGPT's state_dict names and shapes (nn.Linear: out x in), with
    non-trivial norms and biases."""
    g = torch.Generator().manual_seed(seed)
    C, V, T = args["n_embd"], args["vocab_size"], args["block_size"]
    shapes = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (T, C)}
    block = {"ln_1.weight": (C,), "ln_1.bias": (C,), "attn.c_attn.weight": (3 * C, C), "attn.c_attn.bias": (3 * C,),
             "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
             "mlp.c_fc.weight": (4 * C, C), "mlp.c_fc.bias": (4 * C,), "mlp.c_proj.weight": (C, 4 * C),
             "mlp.c_proj.bias": (C,)}
    for i in range(args["n_layer"]):
        shapes.update({f"transformer.h.{i}.{k}": s for k, s in block.items() if args["bias"] or "bias" not in k})
    shapes.update({k: (C,) for k in ("transformer.ln_f.weight", "transformer.ln_f.bias")
                   if args["bias"] or k.endswith("weight")})
    sd = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g)
        is_gain = ".ln_" in name and name.endswith("weight")
        sd[name] = 1.0 + 0.1 * t if is_gain else (0.1 * t if len(shape) == 1 else 0.3 * t)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # tied, and saved under both names
    return sd


def reference_logits(sd, args, idx):
    """nanoGPT's forward written out in float64: learned positions, pre-LayerNorm (eps 1e-5),
    causal softmax attention, the exact GELU 0.5 x (1 + erf(x / sqrt 2)), tied head."""
    sd = {k: v.double() for k, v in sd.items()}
    C, nh = args["n_embd"], args["n_head"]
    B, T = idx.shape

    def ln(x, name):
        return F.layer_norm(x, (C,), sd[name + ".weight"], sd.get(name + ".bias"), 1e-5)

    def lin(x, name):
        return x @ sd[name + ".weight"].T + (sd[name + ".bias"] if name + ".bias" in sd else 0)

    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(args["n_layer"]):
        p = f"transformer.h.{i}."
        q, k, v = lin(ln(x, p + "ln_1"), p + "attn.c_attn").split(C, dim=2)
        q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // nh)
        y = att.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        x = x + lin(y.transpose(1, 2).reshape(B, T, C), p + "attn.c_proj")
        h = lin(ln(x, p + "ln_2"), p + "mlp.c_fc")
        x = x + lin(0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0))), p + "mlp.c_proj")
    return ln(x, "transformer.ln_f") @ sd["lm_head.weight"].T


def nanogpt_checkpoint(args, compiled=True):
    """A checkpoint with the keys and layout nanoGPT's train.py writes (no optimizer needed here)."""
    sd = nanogpt_state_dict(args)
    prefix = "_orig_mod." if compiled else ""
    return {"model": {prefix + k: v for k, v in sd.items()}, "optimizer": {}, "model_args": dict(args),
            "iter_num": 5, "best_val_loss": torch.tensor(3.2),
            "config": dict(args, dataset="shakespeare_char", device="cuda", dtype="bfloat16", compile=True,
                           max_iters=5000, learning_rate=1e-3)}, sd


@pytest.mark.parametrize("bias", [True, False])
def test_nanogpt_checkpoint_is_nanogpts_model(tmp_path, bias):
    """Exact GELU, not GPT-2's tanh one: with tanh the logits differ by ~1e-3 here."""
    args = dict(ARGS, bias=bias)
    ckpt, sd = nanogpt_checkpoint(args)
    path = str(tmp_path / "ckpt.pt")
    torch.save(ckpt, path)
    model = checkpoint.build_model(checkpoint.load_checkpoint(path), path).double().eval()
    assert model.config.mlp == "gelu_exact"
    idx = torch.randint(65, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(idx, all_logits=True)[0]
    ref = reference_logits(sd, args, idx)
    assert (ours - ref).abs().max().item() < 1e-10
    tanh = GPT(GPTConfig(**args, mlp="gelu")).double()
    tanh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (tanh(idx, all_logits=True)[0] - ref).abs().max().item() > 1e-5, "the test tells the GELUs apart"


def test_export_finds_a_nanogpt_checkpoints_characters_in_its_meta_pkl(tmp_path, monkeypatch):
    """nanoGPT's checkpoints record no vocabulary: export.py takes it from where nanoGPT's
    sample.py does (data/<dataset>/meta.pkl), so the exported dir decodes with its characters."""
    import pickle

    import export
    from gpt_trainer import hf
    monkeypatch.chdir(tmp_path)
    chars = [chr(ord(" ") + i) for i in range(ARGS["vocab_size"])]
    os.makedirs(os.path.join("data", "shakespeare_char"))
    with open(os.path.join("data", "shakespeare_char", "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                     "stoi": {c: i for i, c in enumerate(chars)}}, f)
    torch.save(nanogpt_checkpoint(ARGS)[0], "ckpt.pt")
    assert export.export_hf("ckpt.pt", "hf")[1] == "char"
    assert hf.hf_tokenizer("hf").chars == chars


def test_a_resumed_nanogpt_checkpoint_keeps_its_gelu(tmp_path):
    """What train.py does on resume: settings and model from the checkpoint, then saves
    nanoGPT's model_args (so nanoGPT still reads it) and gpt_config with the exact GELU."""
    ckpt, _ = nanogpt_checkpoint(ARGS)
    out = str(tmp_path)
    torch.save(ckpt, os.path.join(out, "ckpt.pt"))
    import train
    defaults = {k: getattr(train, k) for k in train.SETTINGS}
    run, notes = resume_settings(defaults, dict(defaults, init_from="resume", out_dir=out),
                                 {"init_from", "out_dir"}, saved_run(out), train.MODEL_KEYS)
    assert notes == [] and run["mlp"] == "gelu_exact" and run["n_layer"] == 2 and run["block_size"] == 16
    assert run["dataset"] == "shakespeare_char" and run["max_iters"] == 5000
    assert run["device"] == "auto" and run["compile"] == "auto", "the machine is this launch's"
    model = checkpoint.build_model(checkpoint.load_checkpoint(os.path.join(out, "ckpt.pt")), out)
    fields = nanogpt.checkpoint_fields(model.config)
    assert fields["model_args"] == ARGS and fields["gpt_config"]["mlp"] == "gelu_exact"
    resaved = dict(ckpt, **fields, model=model.state_dict())
    assert checkpoint.build_model(resaved, out).config == model.config


@pytest.mark.parametrize("name", list(ARCHS))
def test_our_checkpoint_is_nanogpts_when_nanogpt_can_express_the_model(name):
    config = GPTConfig(**{**ARGS, "n_head": 4, "mlp": "gelu_exact", **ARCHS[name]})  # 4 heads: gqa is GQA
    fields = nanogpt.checkpoint_fields(config)
    assert fields["gpt_config"] == dataclasses.asdict(config)
    expressible = name in ("gpt2", "gelu_exact", "no_bias")  # with mlp='gelu_exact' set above
    assert (nanogpt.why_not(config) == "") == expressible, nanogpt.why_not(config)
    if expressible:
        assert list(fields["model_args"]) == ["n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size",
                                              "dropout"]
        NanoConfig(**fields["model_args"])  # nanoGPT's GPTConfig takes it
    else:
        with pytest.raises(TypeError, match="unexpected keyword argument"):
            NanoConfig(**fields["model_args"])  # refused, never loaded into another model
    assert checkpoint.build_model({"model": GPT(config).state_dict(), **fields}, "x").config == config


def test_gpt2s_tanh_gelu_is_not_a_nanogpt_model():
    assert "mlp='gelu'" in nanogpt.why_not(GPTConfig(**ARGS))


def test_saved_optimizer_state_loads_by_position_in_nanogpts_order():
    """nanoGPT's train.py calls optimizer.load_state_dict on its own AdamW: two groups (>= 2-D,
    then the rest) in its named_parameters order, wpe right after wte. Loaded that way, each
    state tensor must land on the parameter of its name."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**dict(ARGS, bias=False), mlp="gelu_exact"))
    (opt,) = optim.configure_optimizers(model, 0.1, 1e-3, (0.9, 0.99), "cpu")
    x = torch.randint(65, (2, 16))
    model(x, x)[1].backward()
    opt.step()
    saved = checkpoint.optimizer_state(model, [opt])
    assert isinstance(saved, dict), "one optimizer is saved as nanoGPT saves it, not in a list"
    params = dict(model.named_parameters())
    order = nanogpt.param_order(params)
    assert order[:2] == ["transformer.wte.weight", "transformer.wpe.weight"]
    groups = [{"params": [params[n] for n in order if params[n].dim() >= 2], "weight_decay": 0.1},
              {"params": [params[n] for n in order if params[n].dim() < 2], "weight_decay": 0.0}]
    nano_opt = torch.optim.AdamW(groups, lr=1e-3)
    nano_opt.load_state_dict(saved)
    for name in order:
        assert torch.equal(nano_opt.state[params[name]]["exp_avg"], opt.state[params[name]]["exp_avg"]), name
    # and this project reads it back by name
    (again,) = optim.configure_optimizers(model, 0.1, 1e-3, (0.9, 0.99), "cpu")
    checkpoint.load_optimizers({"optimizer": saved, "model_args": {}}, "x", model, [again])
    for name in order:
        assert torch.equal(again.state[params[name]]["exp_avg_sq"], opt.state[params[name]]["exp_avg_sq"])


# -----------------------------------------------------------------------------
# a resume takes its settings from the checkpoint

def settings_of_resume(tmp_path, *argv, config=None):
    import train
    from configurator import configure
    out = str(tmp_path / "out")
    os.makedirs(out, exist_ok=True)
    model = GPT(GPTConfig(**dict(ARGS, mlp="gelu_exact")))
    saved_config = dict({k: getattr(train, k) for k in train.SETTINGS}, **(config or {}))
    torch.save({"model": model.state_dict(), **nanogpt.checkpoint_fields(model.config), "iter_num": 3,
                "optimizer": {}, "config": saved_config}, os.path.join(out, "ckpt.pt"))
    defaults, given = {k: getattr(train, k) for k in train.SETTINGS}, set()
    settings = configure(defaults, ["--init_from=resume", f"--out_dir={out}", *argv], "train.py", given)
    return resume_settings(defaults, settings, given, saved_run(out), train.MODEL_KEYS)


def test_resume_continues_the_checkpoints_run(tmp_path):
    run, notes = settings_of_resume(tmp_path, config=dict(dataset="mydata", max_iters=77, batch_size=5,
                                                          device="cuda", lr_schedule="wsd"))
    assert notes == []
    assert (run["dataset"], run["max_iters"], run["batch_size"], run["lr_schedule"]) == ("mydata", 77, 5, "wsd")
    assert (run["n_layer"], run["n_embd"], run["block_size"], run["vocab_size"]) == (2, 32, 16, 65)
    assert run["device"] == "auto" and run["init_from"] == "resume"


def test_resume_overrides_are_applied_and_said(tmp_path):
    run, notes = settings_of_resume(tmp_path, "--max_iters=200", "--lr_decay_iters=200", "--eval_iters=7",
                                    "--n_layer=2", config=dict(max_iters=100, lr_decay_iters=100))
    assert (run["max_iters"], run["lr_decay_iters"], run["eval_iters"]) == (200, 200, 7)
    assert notes == ["resume: eval_iters=7 (the checkpoint's run had 200)",
                     "resume: max_iters=200 (the checkpoint's run had 100)",
                     "resume: lr_decay_iters=200 (the checkpoint's run had 100)"]


@pytest.mark.parametrize("arg, message", [
    ("--n_layer=4", "n_layer=4 but the model in .*ckpt.pt has n_layer=2, which a resumed run cannot change"),
    ("--vocab_size=50304", "vocab_size=50304 but the model in .*has vocab_size=65"),
    ("--block_size=64", "block_size=64 but the model in .*has block_size=16"),
    ("--mlp=gelu", "mlp='gelu' but the model in .*has mlp='gelu_exact'"),
])
def test_resume_refuses_another_shape_in_one_line(tmp_path, arg, message):
    with pytest.raises(ConfigError, match=message) as e:
        settings_of_resume(tmp_path, arg)
    assert "\n" not in str(e.value)


def test_a_config_file_on_resume_overrides_like_the_command_line(tmp_path):
    path = tmp_path / "more.py"
    path.write_text("max_iters = 900\nn_layer = 2\n")  # n_layer as saved: nothing to say
    run, notes = settings_of_resume(tmp_path, str(path))
    assert run["max_iters"] == 900 and notes == ["resume: max_iters=900 (the checkpoint's run had 600000)"]


# -----------------------------------------------------------------------------
# against nanoGPT itself (NANOGPT=DIR)

def nanogpt_module():
    spec = importlib.util.spec_from_file_location("nanogpt_model", os.path.join(NANOGPT, "model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@need_nanogpt
@pytest.mark.parametrize("bias", [True, False])
def test_logits_equal_nanogpts_model(tmp_path, bias):
    """A checkpoint written from nanoGPT's own GPT, as its train.py saves it, gives its logits."""
    nano = nanogpt_module()
    torch.manual_seed(0)
    args = dict(ARGS, bias=bias)
    ref = nano.GPT(nano.GPTConfig(**args)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = str(tmp_path / "ckpt.pt")
    torch.save({"model": ref.state_dict(), "model_args": args, "iter_num": 1, "best_val_loss": 2.0,
                "config": {}}, path)
    ours = checkpoint.build_model(checkpoint.load_checkpoint(path), path).eval()
    idx = torch.randint(65, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = ref(idx, idx)[0]  # with targets nanoGPT returns every position's logits
        assert (ours(idx, all_logits=True)[0] - full).abs().max().item() <= 1e-6
        # nanoGPT's generate with top_k=1 is greedy
        want = ref.generate(idx[:1, :4], 40, temperature=1.0, top_k=1)
    got = ours.generate(idx[:1, :4], 40, temperature=0.0)
    assert got.tolist() == want.tolist()


def nanogpt_copy(tmp_path):
    """A scratch copy of the nanoGPT checkout with its shakespeare_char data prepared (its own
    prepare.py, from the shared input.txt)."""
    if not os.path.exists(SHAKESPEARE):
        pytest.skip(f"needs {SHAKESPEARE}")
    nano = str(tmp_path / "nanoGPT")
    shutil.copytree(NANOGPT, nano, ignore=shutil.ignore_patterns(".git", "*.bin", "out*"))
    data = os.path.join(nano, "data", "shakespeare_char")
    shutil.copy(SHAKESPEARE, os.path.join(data, "input.txt"))
    subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, capture_output=True)
    return nano


NANO_TINY = ["--device=cpu", "--compile=False", "--dtype=float32", "--n_layer=2", "--n_head=2", "--n_embd=32",
             "--block_size=32", "--batch_size=4", "--eval_iters=2", "--log_interval=1", "--eval_interval=100",
             "--always_save_checkpoint=True", "--learning_rate=3e-3", "--warmup_iters=10", "--lr_decay_iters=400"]


def nano_run(nano, script, *args):
    p = subprocess.run([sys.executable, script, *args], cwd=nano, capture_output=True, text=True,
                       env=child_env(), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def our_sample(out, nano):
    """Our sample.py's greedy text, run in the nanoGPT copy (a nanoGPT checkpoint names its data
    as data/shakespeare_char, relative to where sample.py runs)."""
    p = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), f"--out_dir={out}", "--device=cpu",
                        "--num_samples=1", "--max_new_tokens=200", "--temperature=0"], cwd=nano,
                       capture_output=True, text=True, env=child_env(), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


@pytest.mark.slow
@need_nanogpt
def test_nanogpt_trains_we_resume_and_sample_like_it(tmp_path):
    """nanoGPT's train.py writes a checkpoint; our train.py resumes it with nothing but
    --init_from=resume --out_dir (its settings come from the checkpoint) and keeps its GELU;
    nanoGPT's sample.py and ours then give the same greedy text."""
    nano = nanogpt_copy(tmp_path)
    out = str(tmp_path / "out")
    nano_run(nano, "train.py", "config/train_shakespeare_char.py", *NANO_TINY, "--max_iters=300", f"--out_dir={out}")
    assert set(load_ckpt(out)["model_args"]) == set(NANOGPT_FIELDS)
    data_dir = os.path.join(nano, "data", "shakespeare_char")
    p = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--init_from=resume", f"--out_dir={out}",
                        "--max_iters=400", f"--data_dir={data_dir}"], capture_output=True, text=True,
                       env=child_env(), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resume: max_iters=400 (the checkpoint's run had 300)" in p.stdout
    ckpt = load_ckpt(out)
    assert ckpt["iter_num"] == 400 and ckpt["gpt_config"]["mlp"] == "gelu_exact"
    assert set(ckpt["model_args"]) == set(NANOGPT_FIELDS)
    text = nano_run(nano, "sample.py", f"--out_dir={out}", "--device=cpu", "--dtype=float32", "--num_samples=1",
                    "--max_new_tokens=200", "--top_k=1")
    ours = our_sample(out, nano)
    assert text.split("meta.pkl...\n", 1)[1] == ours
    assert len(set(ours.strip("\n-"))) >= 4, f"letters, not a run of one character: {ours!r}"
    # exported, its characters go with it (from nanoGPT's meta.pkl) and sample.py decodes with them
    hf_dir = str(tmp_path / "hf")
    subprocess.run([sys.executable, os.path.join(REPO, "export.py"), f"--ckpt={out}/ckpt.pt", f"--out={hf_dir}"],
                   cwd=nano, check=True, capture_output=True, env=child_env(), timeout=300)
    import pickle
    with open(os.path.join(data_dir, "meta.pkl"), "rb") as f:
        itos = pickle.load(f)["itos"]
    with open(os.path.join(hf_dir, "meta.json")) as f:
        assert json.load(f)["chars"] == [itos[i] for i in range(len(itos))]
    p = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), f"--init_from={hf_dir}", "--device=cpu",
                        "--num_samples=1", "--max_new_tokens=100", "--start=ROMEO:"], capture_output=True, text=True,
                       env=child_env(), timeout=300)
    assert p.returncode == 0 and p.stdout.startswith("ROMEO:") and set(p.stdout) <= set(itos.values()) | {"-"}, \
        p.stderr[-2000:]


@pytest.mark.slow
@need_nanogpt
def test_nanogpt_samples_and_resumes_our_checkpoint(tmp_path):
    """Our train.py's checkpoint of nanoGPT's architecture is a nanoGPT checkpoint: its
    unmodified sample.py samples it (the same greedy text as ours) and its train.py resumes it."""
    nano = nanogpt_copy(tmp_path)
    data_dir = os.path.join(nano, "data", "shakespeare_char")
    out = str(tmp_path / "out")
    run_train(out, data_dir, bias=False, mlp="gelu_exact", max_iters=300, lr_decay_iters=400, warmup_iters=10,
              learning_rate=3e-3, dataset="shakespeare_char")
    text = nano_run(nano, "sample.py", f"--out_dir={out}", "--device=cpu", "--dtype=float32", "--num_samples=1",
                    "--max_new_tokens=200", "--top_k=1")
    assert "Loading meta from data/shakespeare_char/meta.pkl" in text
    ours = our_sample(out, nano)
    assert text.split("meta.pkl...\n", 1)[1] == ours
    assert len(set(ours.strip("\n-"))) >= 4, f"letters, not a run of one character: {ours!r}"
    before = load_ckpt(out)
    log = nano_run(nano, "train.py", "config/train_shakespeare_char.py", *NANO_TINY, "--init_from=resume",
                   f"--out_dir={out}", "--max_iters=400", "--dropout=0.0", "--bias=False")
    assert "step 400:" in log
    after = load_ckpt(out)
    assert after["iter_num"] == 400 and not torch.equal(after["model"]["transformer.wpe.weight"],
                                                      before["model"]["transformer.wpe.weight"])
