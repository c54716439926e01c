"""
hf.py against transformers itself: randomly initialised HF GPT-2 models saved with
save_pretrained (nothing is downloaded), imported, exported and compared logit by logit.
"""
import json
import os
import re
from dataclasses import asdict

import pytest
import torch

import export
from gpt_trainer import hf
from gpt_trainer.errors import HFError
from model import GPT, GPTConfig

transformers = pytest.importorskip("transformers")

HF_CONFIGS = {
    "small": dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=100),
    "odd_vocab": dict(n_layer=3, n_head=4, n_embd=48, n_positions=32, vocab_size=257),
    # exact (erf) GELU, as nanoGPT's models: imported as mlp='gelu_exact'
    "erf_gelu": dict(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=65,
                     activation_function="gelu"),
    # imported as norm_eps and mlp_hidden
    "eps_n_inner": dict(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=65,
                        layer_norm_epsilon=1e-6, n_inner=100),
}



def hf_gpt2(seed=0, **config):
    """A random HF GPT-2 with non-trivial layer norms and biases (HF initialises them to 1 and 0)."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(bos_token_id=None, eos_token_id=None, **config)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=list(HF_CONFIGS))
def hf_dir(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(f"hf_{request.param}"))
    model = hf_gpt2(**HF_CONFIGS[request.param])
    model.save_pretrained(path)
    return path, model


def hf_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


def our_logits(model, idx):
    with torch.no_grad():
        return model(idx, all_logits=True)[0]


def random_idx(vocab, T, seed=1):
    return torch.randint(vocab, (2, T), generator=torch.Generator().manual_seed(seed))


def save_ours(model, path, meta=None):
    torch.save({"model": model.state_dict(), "model_args": asdict(model.config), "meta": meta or {},
                "iter_num": 0, "best_val_loss": 1e9, "config": {}}, path)
    return path


def test_import_matches_hf_logits(hf_dir):
    path, reference = hf_dir
    model = hf.gpt_from_hf(path).eval()
    cfg = reference.config
    ours = model.config
    assert (ours.n_layer, ours.n_head, ours.n_embd) == (cfg.n_layer, cfg.n_head, cfg.n_embd)
    assert (ours.block_size, ours.vocab_size) == (cfg.n_positions, cfg.vocab_size)
    idx = random_idx(cfg.vocab_size, cfg.n_positions)
    assert (our_logits(model, idx) - hf_logits(reference, idx)).abs().max().item() <= 1e-4


def test_import_dropout_override(hf_dir):
    assert hf.gpt_from_hf(hf_dir[0]).config.dropout == 0.0  # not HF's 0.1 default
    assert hf.gpt_from_hf(hf_dir[0], dropout=0.2).config.dropout == 0.2


def test_round_trip_is_exact(hf_dir, tmp_path):
    path, reference = hf_dir
    first = hf.gpt_from_hf(path)
    export.export_hf(save_ours(first, str(tmp_path / "ckpt.pt")), str(tmp_path / "hf"))
    second = hf.gpt_from_hf(str(tmp_path / "hf"))
    assert second.config == first.config
    sd1, sd2 = first.state_dict(), second.state_dict()
    assert sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    # and the exported HF weights are the original HF weights, bit for bit
    exported = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).state_dict()
    original = reference.state_dict()
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)


def gpt2_tiktoken():
    tiktoken = pytest.importorskip("tiktoken")
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # no network and no TIKTOKEN_CACHE_DIR
        pytest.skip(f"tiktoken's gpt2 files are not available offline ({type(e).__name__})")


def train_tiny_gpt(steps=5):
    """One of OUR models after a few AdamW steps, with GPT-2's padded vocabulary."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50304, n_layer=2, n_head=2, n_embd=16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        x = torch.randint(50257, (4, 17))
        _, loss = model(x[:, :-1], targets=x[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_export_trained_checkpoint(tmp_path):
    enc = gpt2_tiktoken()
    model = train_tiny_gpt()
    ckpt = save_ours(model, str(tmp_path / "ckpt.pt"), meta={"encoding": "gpt2", "vocab_size": 50257})
    out = str(tmp_path / "hf")
    export.main([f"--ckpt={ckpt}", f"--out={out}"])
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["vocab_size"] == 50304 and config["n_positions"] == 16  # padded rows kept
    assert config["eos_token_id"] == 50256
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    idx = random_idx(50304, 16)
    assert (hf_logits(exported, idx) - our_logits(model, idx)).abs().max().item() <= 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "Hello world, héllo 日本\n\n  <|endoftext|>"
    assert tok("Hello world")["input_ids"] == enc.encode("Hello world") == [15496, 995]
    assert tok(text)["input_ids"] == enc.encode(text, allowed_special="all")
    assert tok.eos_token_id == enc.eot_token


def test_export_without_gpt2_meta_writes_no_tokenizer(tmp_path, hf_dir):
    model = hf.gpt_from_hf(hf_dir[0])
    _, with_tokenizer = export.export_hf(save_ours(model, str(tmp_path / "ckpt.pt"), meta={"encoding": "char"}),
                                     str(tmp_path / "hf"))
    assert not with_tokenizer
    files = set(os.listdir(tmp_path / "hf"))
    assert {"config.json", "model.safetensors"} <= files and "vocab.json" not in files


# -----------------------------------------------------------------------------
# a fine-tune's data must be encoded with the tokenizer its pretrained weights were trained with

def check_start(init_from, meta, data_dir):
    """train.py's check, given the data's tokenizer as train.py has it loaded."""
    from gpt_trainer.tokenizer import tokenizer_from_meta
    hf.check_start_tokenizer(init_from, meta, tokenizer_from_meta(meta), data_dir)


def test_token_tables_give_each_ids_bytes():
    """token_table's pieces of an encoded text join into the text's bytes (byte-level BPE's
    printable characters mapped back to bytes; characters; tiktoken in the test below)."""
    from gpt_trainer.tokenizer import CharTokenizer, token_table, train_bpe
    text = "Héllo wörld, 日本語!\n\t\x00 <|endoftext|> end"
    bpe = train_bpe([text * 3, "hello world " * 20], 300)
    for tok in (bpe, CharTokenizer(sorted(set(text)))):
        table = token_table(tok)
        assert len(table) == tok.vocab_size
        assert b"".join(table[i] for i in tok.encode(text)) == text.encode("utf-8")
    assert token_table(bpe)[bpe.eot_token] == b"<|endoftext|>"


def test_tiktoken_gpt2_and_its_exported_tokenizer_json_have_one_table(tmp_path):
    from gpt_trainer.tokenizer import get_tokenizer, token_table
    gpt2_tiktoken()
    hf.save_gpt2_tokenizer(str(tmp_path), *hf.read_gpt2_tokenizer_files(), 16)
    ours, theirs = get_tokenizer("gpt2"), get_tokenizer(f"hf:{tmp_path}")
    assert token_table(ours) == token_table(theirs)
    text = "Hello wörld 日本\n\n  ü"
    assert b"".join(token_table(ours)[i] for i in ours.encode(text)) == text.encode("utf-8")
    check_start(str(tmp_path), {"encoding": "gpt2"}, "data/gpt2")  # tiktoken data, the same ids
    char_data = {"encoding": "char", "chars": list("\n abc"), "vocab_size": 5}
    with pytest.raises(HFError, match=r"data/c's tokenizer \(char, 5 tokens\) is not the one .* \(hf, 50,257 tokens\): "
                       r"id 0 is '\\n' in the data, '!' in the model; prepare the data with --encoding=hf:"):
        check_start(str(tmp_path), char_data, "data/c")
    check_start("gpt2-medium", {"encoding": "gpt2"}, "data/gpt2")
    with pytest.raises(HFError, match=r"is not the one gpt2 was trained with \(gpt2, 50,257 tokens\): .* "
                                      r"--encoding=gpt2 \(data/text/prepare.py"):
        check_start("gpt2", char_data, "data/c")  # nanoGPT's finetune recipe on shakespeare_char


def test_exported_char_model_keeps_its_characters(tmp_path, hf_dir):
    """A char-level checkpoint exports its characters (meta.json, a char data dir's layout): the
    dir samples with them, and a fine-tune on data of other characters is refused, naming the
    first id that means something else and the encoding that fits."""
    chars = list("\n abc")
    model = GPT(GPTConfig(block_size=16, vocab_size=len(chars), n_layer=1, n_head=2, n_embd=16))
    ckpt = save_ours(model, str(tmp_path / "ckpt.pt"), meta={"encoding": "char", "chars": chars, "vocab_size": 5})
    base = str(tmp_path / "hf")
    assert export.export_hf(ckpt, base)[1] == "char"
    assert hf.hf_tokenizer(base).chars == chars  # sample.py's tokenizer for --init_from=DIR
    check = check_start

    def data(c):
        return {"encoding": "char", "chars": list(c), "vocab_size": len(c)}
    check(base, data("\n abc"), "d")
    check(base, data("\n ab"), "d")  # fewer characters, each id the same one
    with pytest.raises(HFError, match=r"id 2 is 'b' in the data, 'a' in the model; prepare the data with "
                                      rf"--encoding=char:{re.escape(base)} \(data/text/prepare.py"):
        check(base, data("\n bc"), "d")
    with pytest.raises(HFError, match=r"id 5 is 'd' in the data, not there in the model"):
        check(base, data("\n abcd"), "d")
    for other in ("\n bc", "xyz"):
        check(hf_dir[0], data(other), "d")  # weights of no known tokenizer: nothing to compare


def test_an_unreadable_tokenizer_json_is_one_line_and_a_start_goes_on_unchecked(tmp_path, capsys):
    from gpt_trainer.errors import DataError
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path / 'tokenizer.json'))}: the tokenizers library "
                                        r"cannot read it \(.*\); it is damaged or from a newer tokenizers"):
        hf.hf_tokenizer(str(tmp_path))  # sample.py --init_from=DIR
    check_start(str(tmp_path), {"encoding": "char", "chars": ["a"], "vocab_size": 1}, "d")
    assert "note: d's tokenizer was not compared with" in capsys.readouterr().err
    hf.check_start_tokenizer("gpt2", {"encoding": "cl100k_base"}, None, "d")  # a dataset tokenizer not loadable here
    err = capsys.readouterr().err
    assert "note: d's tokenizer was not compared with gpt2's (its tokenizer could not be loaded)" in err


@pytest.mark.parametrize("option, value", [
    ("mlp", "swiglu"), ("mlp", "relu2"), ("norm", "rmsnorm"), ("n_kv_head", 1),
    ("qk_norm", True), ("tie_embeddings", False), ("logit_softcap", 30.0), ("head_dim", 16)])
def test_export_refuses_what_gpt2_cannot_express(tmp_path, option, value):
    model = GPT(GPTConfig(block_size=8, vocab_size=32, n_layer=1, n_head=2, n_embd=16, **{option: value}))
    ckpt = save_ours(model, str(tmp_path / "ckpt.pt"))
    with pytest.raises(hf.HFError, match=f"{option}={value!r}"):
        export.main([f"--ckpt={ckpt}", f"--out={tmp_path / 'hf'}"])
    assert not os.path.exists(tmp_path / "hf")  # refused before writing anything


@pytest.mark.parametrize("key, value", [
    ("activation_function", "relu"), ("scale_attn_by_inverse_layer_idx", True),
    ("reorder_and_upcast_attn", True), ("tie_word_embeddings", False)])
def test_import_refuses_other_gpt2_variants(tmp_path, key, value):
    cfg = transformers.GPT2Config(bos_token_id=None, eos_token_id=None, **HF_CONFIGS["small"], **{key: value})
    cfg.save_pretrained(str(tmp_path))
    with pytest.raises(hf.HFError, match=key):
        hf.gpt_from_hf(str(tmp_path))


def test_import_refuses_other_model_types(tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "mistral"}, f)
    with pytest.raises(hf.HFError, match="model_type='mistral'"):
        hf.gpt_from_hf(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(hf.HFError, match="config.json not found"):
        hf.gpt_from_hf(str(tmp_path / "empty"))


def test_unknown_name_is_refused():
    with pytest.raises(hf.HFError, match="gpt3"):
        hf.gpt_from_hf("gpt3")


def test_check_hf_overrides():
    hf.check_hf_overrides({"dropout": 0.1, "learning_rate": 1e-4, "batch_size": 4})
    with pytest.raises(hf.HFError, match="n_layer"):
        hf.check_hf_overrides({"dropout": 0.1, "n_layer": 4})
    with pytest.raises(hf.HFError, match="pos_emb"):
        hf.check_hf_overrides({"pos_emb": "rope"})


def test_hub_name_offline_fails_fast_and_clearly(monkeypatch, tmp_path):
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    # an empty cache, whatever this machine has downloaded before
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(hf.HFError, match="'gpt2'.*local directory"):
        hf.gpt_from_hf("gpt2")
