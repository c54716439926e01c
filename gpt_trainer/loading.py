"""
One way to get a model and its tokenizer for inference (sample.py, evaluate.py): from one of
our checkpoints or nanoGPT's (init_from='resume'), a GPT-2 hub name, or a local Hugging Face
GPT-2, Llama or Qwen3 directory.
"""
import os
import sys

from gpt_trainer.checkpoint import build_model, inference_path, load_checkpoint
from gpt_trainer.dataloader import load_meta
from gpt_trainer.errors import ConfigError
from gpt_trainer.hf import gpt_from_hf, hf_tokenizer
from gpt_trainer.lora import build_lora_model, merge
from gpt_trainer.tokenizer import tokenizer_from_meta


def checkpoint_data_dir(config):
    """The data dir a checkpoint's run trained on, from its saved settings."""
    return config.get("data_dir") or os.path.join("data", config.get("dataset", ""))


def checkpoint_meta(checkpoint):
    """(meta, data dir) of the data the checkpoint was trained on: its own meta, else (nanoGPT's
    checkpoints record none) its data dir's meta.json or meta.pkl, else {}."""
    data_dir = checkpoint_data_dir(checkpoint.get("config") or {})
    return checkpoint.get("meta") or (load_meta(data_dir) if os.path.isdir(data_dir) else {}), data_dir


def checkpoint_tokenizer(checkpoint):
    """The tokenizer of the data the checkpoint was trained on (checkpoint_meta's)."""
    meta, data_dir = checkpoint_meta(checkpoint)
    if not meta:
        print("note: the checkpoint records no tokenizer; assuming GPT-2's", file=sys.stderr)
    return tokenizer_from_meta(meta, data_dir)


def build_any_model(ckpt, path, dropout=None):
    """checkpoint.build_model, or for a LoRA checkpoint (adapters only) its base rebuilt from the
    HF dir or GPT-2 name it names, with the adapters (unmerged) on it."""
    if not ckpt.get("lora"):
        return build_model(ckpt, path, dropout)
    args = dict(ckpt["model_args"], **({} if dropout is None else {"dropout": dropout}))
    return build_lora_model({**ckpt, "model_args": args}, path, gpt_from_hf)


def load_model(init_from="resume", out_dir="out", ckpt="auto"):
    """(model, tokenizer, where the model came from, the checkpoint's training settings or {}),
    the tokenizer checked to fit the model."""
    if init_from == "resume":
        path = inference_path(out_dir, ckpt)
        checkpoint = load_checkpoint(path)
        model, tok, config = build_any_model(checkpoint, path), checkpoint_tokenizer(checkpoint), checkpoint.get("config")
        if hasattr(model, "lora"):  # decode steps read plain weights: fold the adapters in
            merge(model)
    else:
        model, tok, path, config = gpt_from_hf(init_from), hf_tokenizer(init_from), init_from, {}
    if tok.vocab_size > model.config.vocab_size:
        raise ConfigError(f"the model has vocab_size {model.config.vocab_size} but its tokenizer ({tok.name}) has "
                          f"{tok.vocab_size} tokens; they do not belong together")
    return model, tok, path, config or {}
