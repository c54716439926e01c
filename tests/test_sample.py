"""
sample.py as a user runs it (a subprocess), on a tiny char-level checkpoint and on a local
HF GPT-2 directory. Expected texts come from generate.generate in this process: same weights,
same seed, same CPU kernels, so the tokens must be identical.
"""
import os
import shlex
import string
import subprocess
import sys
from dataclasses import asdict

import pytest
from contextlib import nullcontext

import torch

from gpt_trainer.generate import generate
from model import GPT, GPTConfig
from trainutil import REPO, child_env, one_error_line

SAMPLE = os.path.join(REPO, "sample.py")
SEPARATOR = "---------------"
CHARS = sorted(set(string.ascii_lowercase + " \n.,!?"))
BLOCK = 32



def char_model(seed):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=BLOCK, vocab_size=len(CHARS), n_layer=2, n_head=2, n_embd=32)).eval()


def save_char_checkpoint(model, path):
    meta = {"encoding": "char", "chars": CHARS, "vocab_size": len(CHARS)}
    torch.save({"model": model.state_dict(), "model_args": asdict(model.config), "meta": meta,
                "iter_num": 0, "best_val_loss": 1e9, "config": {"dataset": "none"}}, path)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    """out_dir with ckpt.pt only; the model is returned for reference generations."""
    path = tmp_path_factory.mktemp("out")
    model = char_model(0)
    save_char_checkpoint(model, str(path / "ckpt.pt"))
    return str(path), model


def run_sample(*args, cwd):
    return subprocess.run([sys.executable, SAMPLE, *args], cwd=cwd, env=child_env(),
                          capture_output=True, text=True, timeout=120)


def samples_of(p):
    assert p.returncode == 0, p.stderr
    assert p.stdout.endswith("\n" + SEPARATOR + "\n"), p.stdout
    return p.stdout.split("\n" + SEPARATOR + "\n")[:-1]


def encode(text):
    return [CHARS.index(c) for c in text]


def decode(ids):
    return "".join(CHARS[i] for i in ids)


def reference(model, prompt, n, batch=1, **sampling):
    """The generated texts (without the prompt) that sample.py must print, one per row."""
    idx = torch.tensor([encode(prompt)] * batch)
    out = generate(model, idx, n, generator=torch.Generator().manual_seed(1337), **sampling)
    return [decode(row[idx.size(1):].tolist()) for row in out]


def cut(text, stop):
    return text[:text.index(stop)] if stop in text else text


def test_greedy_equals_generate(out_dir):
    path, model = out_dir
    p = run_sample(f"--out_dir={path}", "--start=to be", "--temperature=0", "--num_samples=2",
                   "--max_new_tokens=40", cwd=path)
    expected = "to be" + reference(model, "to be", 40, temperature=0)[0]
    assert samples_of(p) == [expected, expected]
    assert "ckpt.pt" in p.stderr  # the only checkpoint there


@pytest.mark.slow
def test_compiled_greedy_equals_generate(out_dir):
    """--compile=True compiles the prefill and the per-token decode step: same tokens."""
    path, model = out_dir
    p = run_sample(f"--out_dir={path}", "--start=to be", "--temperature=0", "--num_samples=1",
                   "--max_new_tokens=40", "--compile=True", cwd=path)
    assert samples_of(p) == ["to be" + reference(model, "to be", 40, temperature=0)[0]]


def test_streaming_stops_at_stop_string(out_dir):
    path, model = out_dir
    generated = reference(model, "hi", 60, temperature=1.0, top_k=200)[0]
    stop = generated[20:22]  # its first occurrence may be earlier: cut() finds it the same way
    p = run_sample(f"--out_dir={path}", "--start=hi", "--temperature=1.0", "--num_samples=1",
                   "--max_new_tokens=60", f"--stop={stop}", cwd=path)
    assert samples_of(p) == ["hi" + cut(generated, stop)]
    assert len(cut(generated, stop)) < 22


def test_batch_long_prompt_from_file_with_stop(out_dir, tmp_path):
    path, model = out_dir
    prompt = "the quick brown fox jumps over the lazy dog, twice!\n"  # 52 chars > block_size
    (tmp_path / "prompt.txt").write_text(prompt)
    p = run_sample(f"--out_dir={path}", "--start=FILE:prompt.txt", "--num_samples=3",
                   "--max_new_tokens=50", "--stop=e", cwd=str(tmp_path))
    kept = prompt[-BLOCK:]
    expected = [kept + cut(g, "e") for g in reference(model, kept, 50, batch=3, temperature=0.8, top_k=200)]
    assert sorted(samples_of(p)) == sorted(expected)  # printed as each sample ends
    assert f"keeping its last {BLOCK}" in p.stderr and "block_size" in p.stderr


def test_readme_stop_blank_line_command(tmp_path):
    """The README's --stop="\\n\\n" through a real shell, which passes backslash-n as two
    characters: the samples end at the first blank line. A vocabulary of newline and 'a' makes
    blank lines come early."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=BLOCK, vocab_size=2, n_layer=2, n_head=2, n_embd=32)).eval()
    meta = {"encoding": "char", "chars": ["\n", "a"], "vocab_size": 2}
    torch.save({"model": model.state_dict(), "model_args": asdict(model.config), "meta": meta,
                "iter_num": 0, "best_val_loss": 1e9, "config": {"dataset": "none"}}, tmp_path / "ckpt.pt")
    (tmp_path / "prompt.txt").write_text("a")
    readme = open(os.path.join(REPO, "README.md")).read()
    documented = '--start="FILE:prompt.txt" --num_samples=3 --top_p=0.9 --stop="\\n\\n"'
    assert documented in readme
    command = f"{shlex.quote(sys.executable)} {SAMPLE} --out_dir=. {documented}"
    p = subprocess.run(command, shell=True, executable="/bin/bash", cwd=str(tmp_path), env=child_env(),
                       capture_output=True, text=True, timeout=120)
    out = generate(model, torch.tensor([[1]] * 3), 500, temperature=0.8, top_k=200, top_p=0.9,
                         generator=torch.Generator().manual_seed(1337))
    generated = ["".join("\na"[i] for i in row[1:].tolist()) for row in out]
    assert all("\n\n" in g[:100] for g in generated)  # the test can tell a stop from no stop
    assert sorted(samples_of(p)) == sorted("a" + cut(g, "\n\n") for g in generated)


def test_stop_reads_escape_sequences():
    import sample
    assert sample.unescape(r"\n\n") == "\n\n" and sample.unescape(r"a\tb\\") == "a\tb\\"
    assert sample.unescape("\n\n") == "\n\n" and sample.unescape("été 日本\\n") == "été 日本\n"
    with pytest.raises(sample.SampleError, match="backslash"):
        sample.unescape("end\\")


def test_ckpt_auto_prefers_best(out_dir, tmp_path):
    path, model = out_dir
    best = char_model(1)
    save_char_checkpoint(model, str(tmp_path / "ckpt.pt"))
    save_char_checkpoint(best, str(tmp_path / "best.pt"))
    p = run_sample(f"--out_dir={tmp_path}", "--temperature=0", "--num_samples=1",
                   "--max_new_tokens=30", "--start=a", cwd=str(tmp_path))
    from_best = "a" + reference(best, "a", 30, temperature=0)[0]
    assert from_best != "a" + reference(model, "a", 30, temperature=0)[0]  # the test can tell them apart
    assert samples_of(p) == [from_best]
    assert "best.pt" in p.stderr


def test_misspelt_setting_is_one_error_line(out_dir):
    path, _ = out_dir
    p = run_sample(f"--out_dir={path}", "--tempreature=1", cwd=path)
    assert p.returncode == 1
    line = one_error_line(p.stderr)
    assert "tempreature" in line and "temperature" in line.split("tempreature")[-1]


def test_missing_checkpoint_is_one_error_line(tmp_path):
    p = run_sample(f"--out_dir={tmp_path / 'nothing'}", cwd=str(tmp_path))
    assert p.returncode == 1
    assert "ckpt.pt not found" in one_error_line(p.stderr)


@pytest.mark.slow
def test_local_hf_dir(tmp_path):
    transformers = pytest.importorskip("transformers")
    tiktoken = pytest.importorskip("tiktoken")
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:
        pytest.skip(f"tiktoken's gpt2 files are not available offline ({type(e).__name__})")
    from gpt_trainer import hf
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=50257)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(tmp_path / "hf"))
    p = run_sample(f"--init_from={tmp_path / 'hf'}", "--start=Hello world", "--temperature=0",
                   "--num_samples=1", "--max_new_tokens=12", cwd=str(tmp_path))
    model = hf.gpt_from_hf(str(tmp_path / "hf")).eval()
    prompt = enc.encode("Hello world")
    ids = generate(model, torch.tensor([prompt]), 12, temperature=0)[0, len(prompt):].tolist()
    ids = ids[:ids.index(enc.eot_token)] if enc.eot_token in ids else ids  # a sample ends at <|endoftext|>
    assert samples_of(p) == [enc.decode(prompt + ids)]


# -----------------------------------------------------------------------------
# in-process: how samples end, print and stream (GPT-2's BPE, scripted tokens)

def gpt2_tokenizer():
    from gpt_trainer.tokenizer import get_tokenizer
    try:
        return get_tokenizer("gpt2")
    except Exception as e:
        pytest.skip(f"tiktoken's gpt2 files are not available offline ({type(e).__name__})")


class ScriptedModel(torch.nn.Module):
    """Stands in for GPT with the `scripted` fixture: generation yields the given rows' tokens,
    column by column."""

    def __init__(self, rows):
        super().__init__()
        self.rows, self.steps = rows, 0
        self.weight = torch.nn.Parameter(torch.zeros(1))  # generate_samples reads the device from it

    def generate_stream(self, idx, max_new_tokens, *args, **kwargs):
        assert idx.size(0) == len(self.rows)  # every sample in one batch
        for t in range(max_new_tokens):
            self.steps += 1
            yield torch.tensor([[row[t]] for row in self.rows])


@pytest.fixture
def scripted(monkeypatch):
    """sample.py's generation runs a ScriptedModel's script."""
    import sample
    monkeypatch.setattr(sample, "generate_stream", lambda model, idx, n, *args, **kwargs: model.generate_stream(idx, n))


def settings(**overrides):
    import sample
    return {**{k: getattr(sample, k) for k in sample.SETTINGS}, **overrides}


def test_samples_end_at_eot_and_print_as_they_end(capsys, scripted):
    import sample
    tok = gpt2_tokenizer()
    eot, a, b, c = tok.eot_token, *tok.encode(" one two three")
    rows = [[a, b] + [c] * 8,  # never ends: printed last
            [a, eot] + [a] * 8,  # ends first
            [b, b, b, eot] + [a] * 6]
    model = ScriptedModel(rows)
    prompt = tok.encode("Hi")
    texts = sample.generate_samples(model, prompt, tok, settings(num_samples=3, max_new_tokens=10),
                                    False, torch.autocast("cpu", enabled=False))
    assert texts == ["Hi" + tok.decode(rows[0]), "Hi one", "Hi two two two"]
    printed = capsys.readouterr().out.split("\n" + SEPARATOR + "\n")[:-1]
    assert printed == [texts[1], texts[2], texts[0]]  # in the order they ended


def test_generation_stops_once_every_sample_ended(scripted):
    import sample
    tok = gpt2_tokenizer()
    eot, a = tok.eot_token, tok.encode(" one")[0]
    model = ScriptedModel([[a, eot] + [a] * 8, [a, a, eot] + [a] * 7])
    sample.generate_samples(model, [a], tok, settings(num_samples=2, max_new_tokens=10), False,
                            torch.autocast("cpu", enabled=False))
    assert model.steps == 3


def test_stream_never_prints_half_a_character():
    import sample
    tok = gpt2_tokenizer()
    text = "naïve 日本語 ünïcödé 🙂!"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # several characters span more than one token
    s, shown = sample.Sample(tok, stop=""), []
    for token in ids:
        s.add(token)
        shown.append(s.new_text())
    s.done = True
    shown.append(s.new_text())
    assert "".join(shown) == text and "\ufffd" not in "".join(shown)


def test_stream_holds_back_a_possible_stop_string():
    import sample
    tok = gpt2_tokenizer()
    s, shown = sample.Sample(tok, stop=" the end"), []
    for token in tok.encode(" and then the end of it"):
        if not s.done:
            s.add(token)
            shown.append(s.new_text())
    assert s.done and "".join(shown) == " and then" == s.text


@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_padded_vocab_is_never_sampled(softcap):
    import sample
    from gpt_trainer.tokenizer import CharTokenizer
    tok = CharTokenizer(CHARS)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=BLOCK, vocab_size=64, n_layer=1, n_head=2, n_embd=32,
                          logit_softcap=softcap))
    with torch.no_grad():
        model.lm_head.weight[len(CHARS):] *= 100  # padding rows no tokenizer id maps to, now the likeliest
    idx = torch.tensor([encode("abc")])
    assert generate(model, idx, 20, temperature=0).max() >= len(CHARS)
    texts = sample.generate_samples(model, encode("abc"), tok, settings(num_samples=2, max_new_tokens=20,
                                                                        temperature=2.0, top_k=0),
                                    streaming=False, ctx=nullcontext())
    assert all(set(t) <= set(CHARS) for t in texts)
    assert generate(model, idx, 20, temperature=0, vocab_limit=len(CHARS)).max() < len(CHARS)
