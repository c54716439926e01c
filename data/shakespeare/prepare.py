"""
Tiny Shakespeare in GPT-2 tokens, as nanoGPT prepares it: the first 90% of the characters go
to train.bin, the rest to val.bin, each encoded with tiktoken's gpt2 (no end-of-text tokens:
it is one document), stored as uint16. Writes train.bin, val.bin and meta.json next to this
script (or to --out_dir), downloading input.txt there first if it is missing.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from configurator import install_error_hook  # noqa: E402
from gpt_trainer.dataprep import fetch_text, script_args, write_dataset  # noqa: E402
from gpt_trainer.tokenizer import TiktokenTokenizer  # noqa: E402

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def main():
    args = script_args(__file__, __doc__.strip().split("\n")[0], URL)
    text = fetch_text(os.path.join(args.out_dir, "input.txt"), args.url)
    print(f"{len(text):,} characters")
    tok = TiktokenTokenizer("gpt2")
    n = int(len(text) * 0.9)
    write_dataset(args.out_dir, tok, {"train": tok.encode(text[:n]), "val": tok.encode(text[n:])})


if __name__ == "__main__":
    install_error_hook()
    main()
