"""
Prepare conversations for supervised fine-tuning (train.py with a chat data dir, docs/chat.md):

    python data/chat/prepare.py --input=chats.jsonl --encoding=gpt2 --out_dir=data/mychat

--input        files, directories, globs or local Hugging Face datasets (save_to_disk dirs):
               .jsonl/.ndjson, .json (an array of records) or .parquet, optionally compressed
               (.gz, .xz, .bz2, .zst); each record one conversation in the layout of OpenAI/HF
               chat data ({"messages": [{"role", "content"}]}), ShareGPT ({"conversations":
               [{"from", "value"}]}) or Alpaca ({"instruction", "input", "output"})
--ext          what a directory contributes (default jsonl,json,parquet)
--encoding     char | gpt2 | any tiktoken encoding | bpe:N | char:DIR (the characters of a char
               data dir, or of the dir export.py wrote for a char-level checkpoint: data to
               fine-tune it on): our default chat template, four special ids after the
               vocabulary (chat_template.py); hf:DIR: the tokenizer and chat_template of the
               Hugging Face model in DIR
--val_fraction share of the conversations that go to val (default 0.1, at least one)
--seed         which conversations go to val (default 1337)
--errors       strict | skip | replace: a record that is not a conversation, not valid JSON or not
               valid UTF-8 stops the run before anything is written (strict, naming every input
               with one), is left out and counted (skip), or for bad text gets U+FFFD (replace)
--out_dir      where train.bin, val.bin, their masks and meta.json go (default: this script's dir)

Writes train.bin / val.bin (token ids, conversations one after another) and train_mask.bin /
val_mask.bin (one uint8 per token: 1 where the token is the assistant's, the loss targets).
Like every prepare, the files are written as .partial and committed together with meta.json
last (dataprep.py); meta.json records the template under 'chat' and the tokenizer's
fingerprint. Records are read twice (a scan, then the encoding), one at a time.
"""
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from gpt_trainer.chat_data import conversations  # noqa: E402
from gpt_trainer.chat_template import DefaultChat, HFChat, hf_tokenizer_from_dir  # noqa: E402
from configurator import install_error_hook  # noqa: E402
from gpt_trainer.corpus import REPLACED, BadRecord, find_inputs, report_problems  # noqa: E402
from gpt_trainer.dataloader import dtype_for_vocab
from gpt_trainer.errors import DataError  # noqa: E402
from gpt_trainer.dataprep import (TokenWriter, check_prepare_arguments, commit_data_dir, dataset_meta,  # noqa: E402
                                  discard_partials, interruptible, partial_path, prepare_arguments, report)
from gpt_trainer.tokenizer import CharTokenizer, HFTokenizer, get_tokenizer, train_bpe  # noqa: E402

MASKS = ("train_mask.bin", "val_mask.bin")


def scan(sources, args):
    """Counts per input, the indices of bad records, and the characters of the contents."""
    counts, bad, problems, chars = [], {}, [], set()
    REPLACED[0] = 0
    for i, src in enumerate(sources):
        n, bad_here, first = 0, [], None
        for rec, conv in enumerate(conversations(src, args)):
            if isinstance(conv, BadRecord):
                bad_here.append(rec)
                first = first or conv
                continue
            n += 1
            if args.encoding == "char":
                chars.update("".join(m["content"] for m in conv))
        counts.append(n)
        if first:
            bad[i] = set(bad_here)
            problems.append((src, first, bad_here))
    result = {"docs": counts, "replaced": REPLACED[0]}
    report_problems(problems, args, result)
    if sum(counts) == 0:
        raise DataError(f"--input {' '.join(args.input)}: no conversations found")
    return counts, bad, sorted(chars), result


def good_conversations(sources, args, bad):
    for i, src in enumerate(sources):
        for rec, conv in enumerate(conversations(src, args)):
            if rec not in bad.get(i, ()):
                if isinstance(conv, BadRecord):  # the input changed since the scan
                    raise DataError(f"{conv.describe(src.name)}; the input changed while it was prepared, run again")
                yield conv


def make_chat(args, sources, bad, chars):
    """(the chat template, the tokenizer dataset_meta records)."""
    if args.encoding.startswith("hf:"):
        hf_dir = args.encoding[3:]
        chat = HFChat(hf_tokenizer_from_dir(hf_dir), hf_dir)
        tok = HFTokenizer.from_dir(hf_dir)
        shutil.copyfile(tok.path, partial_path(args.out_dir, "tokenizer.json"))
        tok.path = "tokenizer.json"
        return chat, tok
    if args.encoding == "char":
        tok = CharTokenizer(chars)
    elif args.encoding.startswith("bpe:"):
        texts = (m["content"] for conv in good_conversations(sources, args, bad) for m in conv)
        train_bpe(texts, args.bpe_vocab, partial_path(args.out_dir, "tokenizer.json"))
        from gpt_trainer.tokenizer import BPETokenizer
        tok = BPETokenizer(partial_path(args.out_dir, "tokenizer.json"))
    else:
        tok = get_tokenizer(args.encoding)
    return DefaultChat(tok), tok


def write(args, sources, counts, bad, chat, tok, scan_result):
    total = sum(counts)
    if total < 2:
        raise DataError(f"--input {' '.join(args.input)}: {total} conversation; train and val need one each at least")
    k = min(total - 1, max(1, round(total * args.val_fraction)))
    val = set(np.random.default_rng(args.seed).permutation(total)[:k].tolist())
    dtype = dtype_for_vocab(chat.vocab_size)
    writers = {s: (TokenWriter(os.path.join(args.out_dir, f"{s}.bin"), dtype),
                   TokenWriter(os.path.join(args.out_dir, f"{s}_mask.bin"), np.uint8)) for s in ("train", "val")}
    n_conv, targets = {"train": 0, "val": 0}, {"train": 0, "val": 0}
    for j, conv in enumerate(good_conversations(sources, args, bad)):
        split = "val" if j in val else "train"
        ids, mask = chat.encode(conv)
        writers[split][0].write(ids)
        writers[split][1].write(mask)
        n_conv[split] += 1
        targets[split] += int(sum(mask))
    for w in writers.values():
        w[0].close()
        w[1].close()
    counts_tok = {s: writers[s][0].num_tokens for s in writers}
    meta = dataset_meta(tok, counts_tok, dtype=dtype.name, chat={**chat.meta(), "mask_files": list(MASKS)},
                        source={"inputs": [{**s.identity(), "conversations": n} for s, n in zip(sources, counts)],
                                "conversations": n_conv, "target_tokens": targets,
                                "skipped": scan_result.get("skipped", 0), "replaced": scan_result["replaced"],
                                "options": {"encoding": args.encoding, "val_fraction": args.val_fraction,
                                            "seed": args.seed, "errors": args.errors}})
    names = (["tokenizer.json"] if meta.get("tokenizer_file") == "tokenizer.json" else []) + \
        ["train.bin", "val.bin", *MASKS]
    commit_data_dir(args.out_dir, names, meta)
    report(args.out_dir, meta)
    print(f"{n_conv['train']:,} train / {n_conv['val']:,} val conversations, {targets['train']:,} / "
          f"{targets['val']:,} assistant tokens (the loss targets), template {chat.kind}")


def prepare(args):
    sources = find_inputs(args)
    counts, bad, chars, scan_result = scan(sources, args)
    os.makedirs(args.out_dir, exist_ok=True)
    try:
        chat, tok = make_chat(args, sources, bad, chars)
        write(args, sources, counts, bad, chat, tok, scan_result)
    except BaseException:
        discard_partials(args.out_dir, ["tokenizer.json", "train.bin", "val.bin", *MASKS])
        raise


def parse_args(argv=None):
    p = prepare_arguments(__doc__, "jsonl,json,parquet", os.path.dirname(os.path.abspath(__file__)))
    args = check_prepare_arguments(p.parse_args(argv), "conversation files")
    if not args.encoding.startswith(("bpe:", "hf:")) and args.encoding != "char":
        get_tokenizer(args.encoding)  # an unknown encoding fails before the inputs are read
    return args


def main(argv=None):
    args = parse_args(argv)
    with interruptible(f"{args.out_dir} is unchanged"):
        prepare(args)


if __name__ == "__main__":
    install_error_hook()
    main()
