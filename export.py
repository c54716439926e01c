"""
Export a checkpoint as a Hugging Face transformers directory (GPT-2, Llama or Qwen3, by its
options), or write an FSDP run's sharded checkpoint as one ckpt.pt:

    python export.py --ckpt=out/ckpt.pt --out=out/hf      # -> config.json, model.safetensors, tokenizer
    python export.py --consolidate=out                    # out/ckpt_dcp/ -> out/ckpt.pt
"""
import json
import os
import sys

from configurator import ArgumentParser, install_error_hook
from gpt_trainer.checkpoint import build_model, consolidate, load_checkpoint
from gpt_trainer.errors import HFError
from gpt_trainer.hf import checkpoint_tokenizer_files, export_model, read_gpt2_tokenizer_files


def export_hf(ckpt_path, out_dir):
    """Export one of our checkpoints with its tokenizer: the HF or bpe tokenizer its data was
    encoded with, or GPT-2's files when its data was GPT-2 BPE. Returns (model, what tokenizer
    was written: 'hf', 'bpe', 'gpt2' or None)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise HFError(f"--out={out_dir} is a file, not a directory; pick another --out")
    ckpt = load_checkpoint(ckpt_path)
    model = build_model(ckpt, ckpt_path)
    meta = ckpt.get("meta") or {}
    tokenizer, kind = checkpoint_tokenizer_files(meta), meta.get("encoding")
    from_gpt2 = str((ckpt.get("config") or {}).get("init_from", "")).startswith("gpt2")
    if tokenizer is None and (kind == "gpt2" or from_gpt2):
        tokenizer, kind = "gpt2", "gpt2"
    if tokenizer == "gpt2":
        read_gpt2_tokenizer_files()  # fail before writing anything
    export_model(model, out_dir, tokenizer, source=ckpt_path)
    return model, kind if tokenizer else None


def main(argv):
    parser = ArgumentParser(description="Export a checkpoint as a Hugging Face directory (GPT-2, "
                                        "Llama or Qwen3, by its architecture), or consolidate a "
                                        "sharded (FSDP) checkpoint into one ckpt.pt.")
    parser.add_argument("--ckpt", default="out/ckpt.pt", help="checkpoint to export")
    parser.add_argument("--out", default=None, help="directory to write (config.json, model.safetensors); "
                                                    "default out/hf; with --consolidate: the ckpt.pt to "
                                                    "write, default OUT_DIR/ckpt.pt")
    parser.add_argument("--consolidate", default="", metavar="OUT_DIR",
                        help="write OUT_DIR/ckpt_dcp/ (an FSDP run's sharded checkpoint) as one ckpt.pt "
                             "(weights, no optimizer) for sample.py, evaluate.py and export")
    args = parser.parse_args(argv)
    if args.consolidate:
        print(f"wrote {consolidate(args.consolidate, args.out)}")
        return
    out = args.out or "out/hf"
    model, tokenizer = export_hf(args.ckpt, out)
    n = sum(p.numel() for p in model.parameters())
    with open(os.path.join(out, "config.json")) as f:
        arch = json.load(f)["architectures"][0]
    print(f"wrote {out}: {arch}, {n / 1e6:.2f}M parameters, vocab {model.config.vocab_size}, "
          f"{f'its {tokenizer} tokenizer' if tokenizer else 'no tokenizer (its data has no HF or GPT-2 one)'}; "
          f"load it with transformers.AutoModelForCausalLM.from_pretrained({out!r})")


if __name__ == "__main__":
    install_error_hook()
    main(sys.argv[1:])
