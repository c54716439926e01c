"""
LoRA (lora.py) through train.py on random GPT-2, Llama and Qwen3-shaped HF models with a chat
template: the base frozen and absent from checkpoints, the optimizer holding only adapters,
exact resume, and the export: merged into one HF model, or as a peft adapter that
PeftModel.from_pretrained loads onto the exported base, both with the trained model's logits.
"""
import os
import subprocess
import sys

import pytest
import torch

from test_chat import CONVERSATION, PLAIN_TEMPLATE, hf_tokenizer, prepare, random_hf_model, write_jsonl
from trainutil import REPO, child_env, load_ckpt, one_error_line, run_train

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.slow  # each case trains an imported model through train.py (~1 min on 2 cores)

from gpt_trainer.checkpoint import load_checkpoint
from gpt_trainer.loading import build_any_model as build_model  # noqa: E402

LORA = dict(n_layer=None, n_head=None, n_embd=None, block_size=64, batch_size=4, gradient_accumulation_steps=2,
            lora_rank=4, lora_alpha=8.0, lora_dropout=0.1, learning_rate=1e-2, warmup_iters=2, lr_decay_iters=8,
            eval_interval=4, eval_iters=2, dropout=0.0)


def lora_setup(tmp, kind):
    tok = hf_tokenizer(tmp / "base", PLAIN_TEMPLATE)
    random_hf_model(kind, tmp / "base", tok)
    convs = [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}] * 20
    prepare(f"--input={write_jsonl(tmp / 'c.jsonl', convs)}", f"--encoding=hf:{tmp / 'base'}",
            f"--out_dir={tmp / 'data'}")
    return str(tmp / "base"), str(tmp / "data")


@pytest.fixture(scope="module", params=["gpt2", "llama", "qwen3"])
def lora_run(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"lora_{request.param}")
    base, data = lora_setup(tmp, request.param)
    out = str(tmp / "out")
    run_train(out, data, init_from=base, max_iters=8, **LORA)
    return base, data, out


def test_checkpoint_holds_only_adapters_and_names_its_base(lora_run):
    base, _, out = lora_run
    ckpt = load_ckpt(out)
    assert ckpt["model"] and all(k.endswith((".lora_A", ".lora_B")) for k in ckpt["model"])
    assert ckpt["lora"]["base"] == os.path.abspath(base) and ckpt["lora"]["base_fingerprint"].startswith("sha256:")
    opts = ckpt["optimizer"] if isinstance(ckpt["optimizer"], list) else [ckpt["optimizer"]]  # one: nanoGPT's layout
    names = [n for opt in opts for group in opt["param_groups"] for n in group["param_names"]]
    assert sorted(names) == sorted(ckpt["model"])  # the optimizer holds the adapters only
    assert any(t.abs().sum() > 0 for k, t in ckpt["model"].items() if k.endswith("lora_B"))  # they trained


def test_merged_and_peft_exports_give_the_trained_logits(lora_run, tmp_path):
    _, _, out = lora_run
    path = os.path.join(out, "ckpt.pt")
    p = subprocess.run([sys.executable, "export.py", f"--ckpt={path}", f"--out={tmp_path / 'merged'}",
                        f"--adapter={tmp_path / 'adapter'}"], cwd=REPO, env=child_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    ours = build_model(load_checkpoint(path), path).eval()
    x = torch.randint(0, 290, (2, 20))
    with torch.no_grad():
        expected = ours(x, all_logits=True)[0]
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(x).logits
        base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "adapter" / "base")
        unmerged = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(x).logits
    V = merged.size(-1)
    torch.testing.assert_close(unmerged[..., :V], expected[..., :V], atol=1e-5, rtol=0)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)  # merged export = unmerged within 1e-5
    assert (merged - transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "adapter" / "base").eval()(x).logits).abs().max() > 1e-3  # the adapter changes the output
    with open(tmp_path / "merged" / "chat_template.jinja") as f:
        assert f.read() == PLAIN_TEMPLATE


def test_lora_resume_is_bitwise(lora_run, tmp_path):
    from test_run_resume import assert_resume_is_exact
    base, data, straight = lora_run
    out = str(tmp_path / "out")
    run_train(out, data, init_from=base, max_iters=3, **LORA)
    p = run_train(out, data, init_from="resume", max_iters=8, **LORA)
    assert next(line for line in p.stdout.splitlines() if line.startswith("iter ")).startswith("iter 3:")
    assert_resume_is_exact(straight, out, 8)


def test_lora_refuses_scratch_and_a_changed_base(lora_run, tmp_path):
    base, data, out = lora_run
    p = run_train(str(tmp_path / "o"), data, check=False, max_iters=2, **{**LORA, "n_layer": 1, "n_head": 2,
                                                                           "n_embd": 16})
    line = one_error_line(p.stderr)
    assert p.returncode == 1 and "adapts a pretrained model" in line and "python export.py --ckpt=" in line
    ckpt = load_ckpt(out)
    ckpt["lora"]["base_fingerprint"] = "sha256:0"
    with pytest.raises(Exception, match="not the one these adapters were trained on"):
        build_model(ckpt, "x")
