"""gpt_trainer/loading.py: a model and its tokenizer for inference, from a checkpoint (ours or
nanoGPT's) or a Hugging Face directory; sample.py and evaluate.py use it (their own tests run
it end to end), here what they share: the checkpoint it picks and a tokenizer that must fit."""
from dataclasses import asdict

import pytest
import torch

from gpt_trainer.checkpoint import save_checkpoint
from gpt_trainer.errors import ConfigError
from gpt_trainer.loading import load_model
from model import GPT, GPTConfig


def save(model, path, chars):
    save_checkpoint({"model": model.state_dict(), "model_args": asdict(model.config), "iter_num": 0,
                     "config": {}, "meta": {"encoding": "char", "vocab_size": len(chars), "chars": chars}}, path)


def test_best_checkpoint_first_and_its_tokenizer(tmp_path):
    chars = list("abcdef")
    config = GPTConfig(block_size=8, vocab_size=8, n_layer=1, n_head=1, n_embd=8)
    torch.manual_seed(0)
    latest, best = GPT(config), GPT(config)
    save(latest, str(tmp_path / "ckpt.pt"), chars)
    model, tok, source, _ = load_model("resume", str(tmp_path))
    assert source == str(tmp_path / "ckpt.pt") and tok.encode("fed") == [5, 4, 3]
    assert torch.equal(model.lm_head.weight, latest.lm_head.weight)
    save(best, str(tmp_path / "best.pt"), chars)
    model, _, source, _ = load_model("resume", str(tmp_path))
    assert source == str(tmp_path / "best.pt") and torch.equal(model.lm_head.weight, best.lm_head.weight)


def test_a_tokenizer_bigger_than_the_model_is_one_error(tmp_path):
    model = GPT(GPTConfig(block_size=8, vocab_size=4, n_layer=1, n_head=1, n_embd=8))
    save(model, str(tmp_path / "ckpt.pt"), list("abcde"))
    with pytest.raises(ConfigError, match="vocab_size 4 but its tokenizer \\(char\\) has 5 tokens"):
        load_model("resume", str(tmp_path))
