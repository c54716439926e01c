"""
hf.py's Llama and Qwen3 paths against transformers itself: randomly initialised
LlamaForCausalLM / Qwen3ForCausalLM models saved with save_pretrained (nothing is downloaded),
imported, exported and compared logit by logit and greedy token by greedy token; the HF
tokenizer (tokenizer.json) through encoding 'hf:DIR'; and a fine-tune of an imported model
through train.py, resumed, sampled and exported.
"""
import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

import export
from gpt_trainer import hf
from gpt_trainer.dataloader import DataError
from gpt_trainer.generate import generate
from model import GPT, GPTConfig
from gpt_trainer.tokenizer import HFTokenizer, get_tokenizer, tokenizer_from_meta
from trainutil import (REPO, child_env, corpus_text, need_tiktoken, one_error_line, read_metrics, run_torchrun, run_train,
                       step_losses)

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

KINDS = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}
HF_MODELS = {
    "llama_gqa_untied": ("llama", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=96, vocab_size=300,
                                       max_position_embeddings=48, tie_word_embeddings=False)),
    # SmolLM2's proportions: 9 query heads sharing 3 key/value heads, tied, rope_theta 1e5
    "llama_smollm_tied": ("llama", dict(hidden_size=72, num_hidden_layers=3, num_attention_heads=9,
                                        num_key_value_heads=3, intermediate_size=192, vocab_size=257,
                                        max_position_embeddings=40, rope_theta=100000.0,
                                        rms_norm_eps=1e-5, tie_word_embeddings=True)),
    "llama_mqa_head_dim": ("llama", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=1, head_dim=12, intermediate_size=80,
                                         vocab_size=200, max_position_embeddings=32, rope_theta=500000.0,
                                         tie_word_embeddings=False)),
    "llama_bias": ("llama", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, vocab_size=100, max_position_embeddings=32,
                                 attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    # Qwen3-0.6B's proportions: head_dim 128 > hidden / heads, qk-norm, tied, rope_theta 1e6
    "qwen3_gqa_tied": ("qwen3", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=32, intermediate_size=96,
                                     vocab_size=300, max_position_embeddings=48, rope_theta=1000000.0,
                                     tie_word_embeddings=True)),
    "qwen3_mqa_untied": ("qwen3", dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                                       num_key_value_heads=1, head_dim=8, intermediate_size=64,
                                       vocab_size=150, max_position_embeddings=32, rms_norm_eps=1e-5,
                                       tie_word_embeddings=False)),
}


def hf_model(kind, seed=0, **config):
    """A random HF model whose norms and biases are not HF's constant 1 and 0, so they matter."""
    config_cls, model_cls = (getattr(transformers, name) for name in KINDS[kind])
    torch.manual_seed(seed)
    cfg = config_cls(initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None, **config)
    model = model_cls(cfg).eval()
    perturb_vectors(model)
    return model


def perturb_vectors(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))


@pytest.fixture(scope="module", params=list(HF_MODELS))
def hf_dir(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    kind, config = HF_MODELS[request.param]
    model = hf_model(kind, **config)
    model.save_pretrained(path)
    return path, model


def random_idx(vocab, T, B=2, seed=1):
    return torch.randint(vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def max_diff(hf_model_, ours, idx):
    with torch.no_grad():
        return (hf_model_(idx).logits - ours(idx, all_logits=True)[0]).abs().max().item()


def hf_greedy(model, idx, n):
    with torch.no_grad():
        return model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n,
                              do_sample=False, pad_token_id=0)


def assert_greedy_equal(hf_model_, ours, prompt_len=4):
    """HF's greedy tokens = ours with the KV cache = ours recomputing everything."""
    idx = random_idx(ours.config.vocab_size, prompt_len, seed=2)
    n = ours.config.block_size - prompt_len
    expected = hf_greedy(hf_model_, idx, n)
    assert torch.equal(generate(ours, idx, n, temperature=0, use_cache=True), expected)
    assert torch.equal(generate(ours, idx, n, temperature=0, use_cache=False), expected)


def save_ours(model, path, meta=None, config=None):
    torch.save({"model": model.state_dict(), "model_args": asdict(model.config), "meta": meta or {},
                "iter_num": 0, "best_val_loss": 1e9, "config": config or {}}, path)
    return path


def safetensors_of(path):
    return load_file(os.path.join(path, "model.safetensors"))


def assert_tensors_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# -----------------------------------------------------------------------------
# import

def test_import_matches_transformers(hf_dir):
    path, reference = hf_dir
    model = hf.gpt_from_hf(path).eval()
    cfg, ours = reference.config, model.config
    assert (ours.n_layer, ours.n_embd, ours.n_head, ours.kv_heads, ours.head_size) == (
        cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
    assert (ours.block_size, ours.vocab_size, ours.norm_eps) == (
        cfg.max_position_embeddings, cfg.vocab_size, cfg.rms_norm_eps)
    assert ours.rope_theta == cfg.rope_parameters["rope_theta"]
    assert ours.tie_embeddings == cfg.tie_word_embeddings and ours.qk_norm == (cfg.model_type == "qwen3")
    assert max_diff(reference, model, random_idx(cfg.vocab_size, cfg.max_position_embeddings)) <= 1e-4
    assert_greedy_equal(reference, model)


def test_sharded_checkpoint(hf_dir, tmp_path):
    path, reference = hf_dir
    reference.save_pretrained(str(tmp_path), max_shard_size="20KB")
    shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in os.listdir(tmp_path)
    sharded, whole = hf.gpt_from_hf(str(tmp_path)), hf.gpt_from_hf(path)
    assert sharded.config == whole.config
    assert_tensors_equal(sharded.state_dict(), whole.state_dict())


def test_import_then_export_gives_the_same_files(hf_dir, tmp_path):
    """HF -> ours -> HF: the same tensors bit for bit, a config that loads as the same model."""
    path, _ = hf_dir
    model = hf.gpt_from_hf(path)
    _, kind = export.export_hf(save_ours(model, str(tmp_path / "ckpt.pt")), str(tmp_path / "hf"))
    assert kind is None  # no tokenizer in that directory
    assert_tensors_equal(safetensors_of(str(tmp_path / "hf")), safetensors_of(path))
    with open(os.path.join(path, "config.json")) as f:
        original = json.load(f)
    with open(tmp_path / "hf" / "config.json") as f:
        exported = json.load(f)
    ignore = {"initializer_range", "transformers_version", "dtype", "torch_dtype", "use_cache"}
    assert {k: v for k, v in exported.items() if k not in ignore} == \
           {k: v for k, v in original.items() if k not in ignore}


# -----------------------------------------------------------------------------
# export

BASE = dict(block_size=32, vocab_size=97, pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False)
OUR_MODELS = {
    "gqa_untied": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, tie_embeddings=False),
    "mqa_tied": dict(n_layer=2, n_head=4, n_kv_head=1, n_embd=32, rope_theta=500000.0, norm_eps=1e-6),
    "mha_bias": dict(n_layer=1, n_head=2, n_embd=32, bias=True, multiple_of=16),
    "qwen3_head_dim": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=48, head_dim=16, qk_norm=True,
                           tie_embeddings=False, mlp_hidden=80),
    "qwen3_mqa_tied": dict(n_layer=2, n_head=3, n_kv_head=1, n_embd=48, qk_norm=True, norm_eps=1e-6),
}


def our_model(name, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**BASE, **OUR_MODELS[name]})).eval()
    with torch.no_grad():  # our init: norms 1 and biases 0, small weights; make every part count
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p)) if p.dim() == 1 else p.mul_(3)
    return model


@pytest.mark.parametrize("name", list(OUR_MODELS))
def test_export_matches_transformers(name, tmp_path):
    model = our_model(name)
    out = str(tmp_path / "hf")
    export.main([f"--ckpt={save_ours(model, str(tmp_path / 'ckpt.pt'))}", f"--out={out}"])
    exported, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    exported.eval()
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    want = "Qwen3ForCausalLM" if model.config.qk_norm else "LlamaForCausalLM"
    assert type(exported).__name__ == want and exported.dtype == torch.float32
    assert max_diff(exported, model, random_idx(97, 32)) <= 1e-4
    assert_greedy_equal(exported, model)


@pytest.mark.parametrize("name", list(OUR_MODELS))
def test_export_import_export_is_exact(name, tmp_path):
    model = our_model(name)
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    hf.export_model(model, first)
    imported = hf.gpt_from_hf(first)
    assert_tensors_equal(imported.state_dict(), model.state_dict())
    hf.export_model(imported, second)
    assert_tensors_equal(safetensors_of(second), safetensors_of(first))
    for name in ("config.json",):
        with open(os.path.join(first, name)) as f, open(os.path.join(second, name)) as g:
            assert json.load(f) == json.load(g)


@pytest.mark.parametrize("options, message", [
    (dict(norm="layernorm"), "norm='layernorm' cannot be exported: a pos_emb='rope' model is exported "
                             "as HF LlamaForCausalLM, which needs norm='rmsnorm'"),
    (dict(mlp="gelu"), "mlp='gelu' cannot be exported.*needs mlp='swiglu'"),
    (dict(mlp="relu2", qk_norm=True), "mlp='relu2' cannot be exported.*Qwen3ForCausalLM"),
    (dict(logit_softcap=30.0), "logit_softcap=30.0 cannot be exported"),
    (dict(bias=True, qk_norm=True), "bias=True cannot be exported.*Qwen3ForCausalLM, which needs bias=False"),
])
def test_export_refuses_what_llama_and_qwen3_cannot_express(tmp_path, options, message):
    config = {**BASE, "n_layer": 1, "n_head": 2, "n_embd": 16, **options}
    ckpt = save_ours(GPT(GPTConfig(**config)), str(tmp_path / "ckpt.pt"))
    with pytest.raises(hf.HFError, match=message) as e:
        export.main([f"--ckpt={ckpt}", f"--out={tmp_path / 'hf'}"])
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "hf")  # refused before writing anything


# -----------------------------------------------------------------------------
# refused on import, each by name, in one line

SMALL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
             vocab_size=50, max_position_embeddings=16)


@pytest.mark.parametrize("kind, options, message", [
    ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling of type 'linear'"),
    ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
     "rope_scaling of type 'llama3'"),
    ("qwen3", dict(rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8}),
     "rope_scaling of type 'yarn'"),
    ("qwen3", dict(use_sliding_window=True, sliding_window=8), "use_sliding_window=True"),
    ("qwen3", dict(attention_bias=True), "attention_bias=True with mlp_bias=False"),
    ("llama", dict(attention_bias=True), "attention_bias=True with mlp_bias=False"),
    ("llama", dict(mlp_bias=True), "attention_bias=False with mlp_bias=True"),
    ("llama", dict(hidden_act="gelu"), "hidden_act='gelu' is not supported; only 'silu'"),
])
def test_import_refuses_what_we_cannot_compute(tmp_path, kind, options, message):
    config_cls = getattr(transformers, KINDS[kind][0])
    config_cls(**SMALL, **options).save_pretrained(str(tmp_path))
    with pytest.raises(hf.HFError, match=message) as e:
        hf.gpt_from_hf(str(tmp_path))
    assert "\n" not in str(e.value)


def test_import_refuses_other_architectures_and_missing_weights(tmp_path):
    transformers.MistralConfig(**SMALL).save_pretrained(str(tmp_path / "mistral"))
    with pytest.raises(hf.HFError, match="model_type='mistral'; only 'gpt2', 'llama', 'qwen3'"):
        hf.gpt_from_hf(str(tmp_path / "mistral"))
    transformers.LlamaConfig(**SMALL, architectures=["LlamaForSequenceClassification"]).save_pretrained(
        str(tmp_path / "cls"))
    with pytest.raises(hf.HFError, match="architectures='LlamaForSequenceClassification'"):
        hf.gpt_from_hf(str(tmp_path / "cls"))
    transformers.LlamaConfig(**SMALL).save_pretrained(str(tmp_path / "noweights"))
    with pytest.raises(hf.HFError, match="no model.safetensors or model.safetensors.index.json"):
        hf.gpt_from_hf(str(tmp_path / "noweights"))


def test_import_refuses_weights_that_do_not_fit(tmp_path):
    model = hf_model("llama", **SMALL, num_key_value_heads=1)
    model.save_pretrained(str(tmp_path))
    tensors = safetensors_of(str(tmp_path))
    with open(tmp_path / "config.json") as f:
        config = json.load(f)

    def check(config_change, tensor_change, message):
        with open(tmp_path / "config.json", "w") as f:
            json.dump({**config, **config_change}, f)
        from safetensors.torch import save_file
        save_file({**tensors, **tensor_change}, str(tmp_path / "model.safetensors"))
        with pytest.raises(hf.HFError, match=message):
            hf.gpt_from_hf(str(tmp_path))

    check({"num_hidden_layers": 2}, {}, "the weights have no model.layers.1.input_layernorm.weight")
    check({}, {"model.layers.0.self_attn.q_proj.bias": torch.zeros(32)},
          "weight model.layers.0.self_attn.q_proj.bias has no place")
    check({"num_key_value_heads": 2}, {}, "weights do not fit its config.json")
    check({"tie_word_embeddings": True}, {}, "lm_head.weight differs from model.embed_tokens.weight")
    sharded = tmp_path / "sharded"
    model.save_pretrained(str(sharded), max_shard_size="10KB")
    os.remove(sorted(sharded.glob("model-*.safetensors"))[0])
    with pytest.raises(hf.HFError, match="not found, but model.safetensors.index.json lists it"):
        hf.gpt_from_hf(str(sharded))


# -----------------------------------------------------------------------------
# the HF tokenizer: hf:DIR

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def save_hf_tokenizer(path, vocab_size=320):
    """A byte-level BPE with special tokens, saved by transformers as a model's tokenizer is."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus_text()[:100_000]], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                bos_token="<|im_start|>")
    fast.save_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(path)


TEXT = "First Citizen:\nBefore we proceed any further, hear me speak. héllo 日本 <|endoftext|>"


def test_hf_tokenizer_matches_transformers(tmp_path):
    reference = save_hf_tokenizer(str(tmp_path))
    tok = get_tokenizer(f"hf:{tmp_path}")
    ids = tok.encode(TEXT)
    assert ids == reference(TEXT, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert tok.decode(ids) == TEXT and tok.vocab_size == len(reference)
    assert tok.eot_token == reference.eos_token_id == 2
    assert 0 not in ids  # a literal <|endoftext|> in text stays text, as with every encoding
    same = tokenizer_from_meta(json.loads(json.dumps(tok.meta())), data_dir=str(tmp_path / "elsewhere"))
    assert same.encode(TEXT) == ids and same.eot_token == tok.eot_token
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    tok.save(str(data_dir))  # the dataset keeps its own copy
    assert tok.meta()["tokenizer_file"] == "tokenizer.json"
    os.rename(tmp_path / "tokenizer.json", tmp_path / "moved.json")
    assert tokenizer_from_meta(tok.meta(), str(data_dir)).encode(TEXT) == ids
    with pytest.raises(DataError, match="tokenizer.json not found; encoding hf:DIR needs"):
        get_tokenizer(f"hf:{tmp_path}")


def test_hf_tokenizer_of_an_imported_dir(tmp_path):
    need_tiktoken("gpt2")
    assert hf.hf_tokenizer(str(tmp_path)).name == "gpt2"  # a dir without tokenizer.json: GPT-2's
    save_hf_tokenizer(str(tmp_path))
    assert isinstance(hf.hf_tokenizer(str(tmp_path)), HFTokenizer)


def test_export_writes_the_tokenizer_back(tmp_path):
    reference = save_hf_tokenizer(str(tmp_path / "src"))
    tok = get_tokenizer(f"hf:{tmp_path / 'src'}")
    with open(tmp_path / "src" / "tokenizer.json") as f:
        meta = {**tok.meta(), "vocab_size": tok.vocab_size, "tokenizer_json": f.read()}
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**BASE, "vocab_size": tok.vocab_size}, n_layer=1, n_head=2, n_embd=16))
    out = str(tmp_path / "hf")
    kind = export.export_hf(save_ours(model, str(tmp_path / "ckpt.pt"), meta=meta), out)[1]
    assert kind == "hf"
    exported = transformers.AutoTokenizer.from_pretrained(out)
    assert exported(TEXT)["input_ids"] == reference(TEXT)["input_ids"]
    assert (exported.eos_token_id, exported.bos_token_id) == (reference.eos_token_id, reference.bos_token_id)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert (config["eos_token_id"], config["bos_token_id"]) == (2, 1)


# -----------------------------------------------------------------------------
# fine-tuning an imported model with train.py

FINETUNE = dict(n_layer=None, n_head=None, n_embd=None, block_size=24, dropout=0.1, batch_size=4,
                gradient_accumulation_steps=2, warmup_iters=2, lr_decay_iters=8, eval_interval=4,
                eval_iters=2, learning_rate=3e-3, min_lr=3e-4, ckpt_interval=1000, dtype="float32")


@pytest.fixture(scope="module")
def finetune_setup(tmp_path_factory):
    """A Qwen3 (GQA, head_dim decoupled, tied) with its tokenizer, and a corpus encoded with it
    by data/text/prepare.py --encoding=hf:DIR."""
    root = tmp_path_factory.mktemp("finetune")
    model_dir = str(root / "qwen3")
    tok = save_hf_tokenizer(model_dir)
    config = dict(HF_MODELS["qwen3_gqa_tied"][1], vocab_size=len(tok))
    hf_model("qwen3", **config).save_pretrained(model_dir)
    (root / "corpus.txt").write_text(corpus_text()[:60_000], encoding="utf-8")
    data_dir = str(root / "data")
    p = subprocess.run([sys.executable, os.path.join(REPO, "data", "text", "prepare.py"),
                        f"--input={root / 'corpus.txt'}", f"--encoding=hf:{model_dir}",
                        f"--out_dir={data_dir}", "--num_proc=1"],
                       cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return model_dir, data_dir


@pytest.mark.slow
def test_finetune_resume_sample_export(tmp_path, finetune_setup):
    model_dir, data_dir = finetune_setup
    with open(os.path.join(data_dir, "meta.json")) as f:
        assert json.load(f)["encoding"] == "hf"
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run_train(straight, data_dir, init_from=model_dir, max_iters=8, **FINETUNE)
    run_train(resumed, data_dir, init_from=model_dir, max_iters=3, **FINETUNE)
    run_train(resumed, data_dir, init_from="resume", max_iters=8, **FINETUNE)
    losses = step_losses(read_metrics(straight))
    assert step_losses(read_metrics(resumed)) == losses and sorted(losses) == list(range(8))
    assert losses[7] < losses[0], "the imported model trains"
    a, b = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (straight, resumed))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    with open(os.path.join(model_dir, "tokenizer.json")) as f:
        assert a["meta"]["tokenizer_json"] == f.read()  # the checkpoint carries the model's tokenizer
    assert_cache_equals_recomputation(straight)
    assert_sample_py_decodes(straight, model_dir)
    assert_exported_like_ours(straight, model_dir, str(tmp_path / "hf"))


def assert_cache_equals_recomputation(out_dir):
    from gpt_trainer.checkpoint import build_model, load_checkpoint
    path = os.path.join(out_dir, "ckpt.pt")
    model = build_model(load_checkpoint(path), path).eval()
    idx = random_idx(model.config.vocab_size, 5, seed=3)
    n = 2 * model.config.block_size  # past block_size: the exact window recomputes
    full = generate(model, idx, n, temperature=0, use_cache=False)
    assert torch.equal(generate(model, idx, n, temperature=0, use_cache=True), full)


def greedy_sample_py(source, tok, generate):
    """sample.py's greedy text from `source` (--out_dir=... or --init_from=...) against the text of
    generate(prompt ids, n) -> new ids, cut at the end-of-text token as sample.py cuts it."""
    prompt = tok.encode("ROMEO:")
    ids = generate(torch.tensor([prompt]), 12)[0, len(prompt):].tolist()
    ids = ids[:ids.index(tok.eot_token)] if tok.eot_token in ids else ids
    p = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), source, "--start=ROMEO:",
                        "--temperature=0", "--num_samples=1", "--max_new_tokens=12", "--device=cpu"],
                       cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n---------------\n")[0] == tok.decode(prompt + ids)


def assert_sample_py_decodes(out_dir, model_dir):
    from gpt_trainer.checkpoint import build_model, load_checkpoint
    path = os.path.join(out_dir, "ckpt.pt")
    model = build_model(load_checkpoint(path), path).eval()
    greedy_sample_py(f"--out_dir={out_dir}", get_tokenizer(f"hf:{model_dir}"),
                     lambda idx, n: generate(model, idx, n, temperature=0))


@pytest.mark.slow
def test_sample_py_from_an_hf_dir_gives_transformers_greedy_text(finetune_setup):
    model_dir, _ = finetune_setup
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    greedy_sample_py(f"--init_from={model_dir}", get_tokenizer(f"hf:{model_dir}"),
                     lambda idx, n: hf_greedy(reference, idx, n))


def assert_exported_like_ours(out_dir, model_dir, hf_out):
    from gpt_trainer.checkpoint import build_model, load_checkpoint
    path = os.path.join(out_dir, "ckpt.pt")
    ours = build_model(load_checkpoint(path), path).eval()
    export.main([f"--ckpt={path}", f"--out={hf_out}"])
    exported = transformers.AutoModelForCausalLM.from_pretrained(hf_out).eval()
    assert type(exported).__name__ == "Qwen3ForCausalLM"
    assert max_diff(exported, ours, random_idx(ours.config.vocab_size, 24)) <= 1e-4
    original = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert transformers.AutoTokenizer.from_pretrained(hf_out)(TEXT)["input_ids"] == original(TEXT)["input_ids"]


@pytest.mark.slow
def test_fsdp_finetunes_an_import_as_one_process_does(tmp_path, finetune_setup):
    model_dir, data_dir = finetune_setup
    settings = dict(FINETUNE, init_from=model_dir, dropout=0.0, max_iters=4)
    one, two = str(tmp_path / "one"), str(tmp_path / "fsdp")
    run_train(one, data_dir, **settings)
    run_torchrun(2, two, data_dir, fsdp=True, **settings)
    a, b = step_losses(read_metrics(one)), step_losses(read_metrics(two))
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    assert all(abs(a[i] - b[i]) <= 1e-5 * a[i] for i in a), (a, b)


@pytest.mark.slow
def test_train_py_refusal_is_one_error_line(tmp_path, finetune_setup):
    model_dir, data_dir = finetune_setup
    bad = tmp_path / "scaled"
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    config["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}
    config.pop("rope_parameters", None)
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(config))
    p = run_train(str(tmp_path / "out"), data_dir, init_from=str(bad), check=False, max_iters=1, **FINETUNE)
    assert p.returncode == 1
    assert "rope_scaling of type 'linear' is not supported" in one_error_line(p.stderr)
    p = run_train(str(tmp_path / "out"), data_dir, init_from=model_dir, check=False, max_iters=1,
                  **{**FINETUNE, "n_layer": 4})
    assert p.returncode == 1
    assert "n_layer cannot be overridden" in one_error_line(p.stderr)
