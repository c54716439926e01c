"""
OpenWebText in GPT-2 tokens, as nanoGPT prepares it: 0.05% of the documents (shuffled with
seed 2357) go to val, every document is followed by <|endoftext|>, ids are uint16. The full
run downloads ~54 GB into the Hugging Face cache and writes a ~17 GB train.bin (~9B tokens)
and a ~8.5 MB val.bin next to this script (or to --out_dir).

Resumable: each split is encoded shard by shard (contiguous runs of documents) into
<split>.bin.partial; after each shard the file is synced and <split>.bin.progress.json records
the shards and tokens done. Re-running after an interruption cuts the .partial file back to the
last recorded shard and carries on from there. When both splits are done, train.bin, val.bin and
meta.json are committed together (dataprep.commit_data_dir).

With datasets >= 4 the hub's loading script for openwebtext no longer runs; if loading fails,
pass --revision=refs/convert/parquet (the hub's parquet copy) or --hf_dataset=<a parquet copy>.
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from configurator import install_error_hook  # noqa: E402
from gpt_trainer.dataprep import (TokenWriter, commit_data_dir, data_dir_held, dataset_meta,  # noqa: E402
                                  encode_chunks, interruptible, progress, report, script_args)
from gpt_trainer.errors import DataError  # noqa: E402
from gpt_trainer.fsutil import write_json  # noqa: E402
from gpt_trainer.tokenizer import TiktokenTokenizer  # noqa: E402

DOCS_PER_CHUNK = 1024  # ~5 MB of text per encoder task


def prepare(ds, out_dir, num_proc=8, num_shards=1024, max_shards=None):
    """Write train.bin / val.bin / meta.json for a datasets.Dataset with a 'text' column.
    max_shards stops each split after that many more shards (a time-boxed run); returns the
    token counts, or None if it stopped before the end."""
    with data_dir_held(out_dir):  # one writer at a time
        return _prepare(ds, out_dir, num_proc, num_shards, max_shards)


def _prepare(ds, out_dir, num_proc, num_shards, max_shards):
    parts = ds.train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    tok = TiktokenTokenizer("gpt2")
    counts = {}
    for split, part in (("train", parts["train"]), ("val", parts["test"])):
        path = os.path.join(out_dir, f"{split}.bin")
        counts[split] = write_split(part, path, tok, num_proc, num_shards, max_shards)
        if counts[split] is None:
            print(f"stopped after {max_shards} shards of {split}; re-run to continue")
            return None
    meta = dataset_meta(tok, counts)
    commit_data_dir(out_dir, ["train.bin", "val.bin"], meta)
    for split in ("train", "val"):
        os.remove(os.path.join(out_dir, f"{split}.bin.progress.json"))
    report(out_dir, meta)
    return counts


def resume_state(path, num_docs, num_shards):
    """Where a previous run of this split got to, or a fresh start."""
    fresh = {"num_docs": num_docs, "num_shards": num_shards, "shards_done": 0, "tokens": 0,
             "done": False}
    try:
        with open(path + ".progress.json") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return fresh
    if any(state.get(k) != fresh[k] for k in ("num_docs", "num_shards")):
        return fresh  # a different dataset or sharding: its progress means nothing here
    # uint16: 2 bytes a token. A shard recorded as done is on disk; bytes past it in the
    # .partial file are from a shard that was cut short, and get cut off
    partial = path + ".partial"
    size = os.path.getsize(partial) if os.path.exists(partial) else -1
    ok = size == 2 * state["tokens"] if state.get("done") else size >= 2 * state["tokens"]
    return state if ok else fresh


def write_split(ds, path, tok, num_proc, num_shards, max_shards=None):
    state = resume_state(path, len(ds), num_shards)
    if state["done"]:
        print(f"{path}: already encoded ({state['tokens']:,} tokens)")
        return state["tokens"]
    stop = num_shards if max_shards is None else min(num_shards, state["shards_done"] + max_shards)
    writer = TokenWriter(path, "uint16", resume_tokens=state["tokens"])
    chunks = shard_chunks(ds, state["shards_done"], stop, num_shards)
    with progress(os.path.basename(path), len(ds), unit="docs",
                  initial=state["shards_done"] * len(ds) // num_shards) as bar:
        try:
            for (shard, shard_end), ids, ndocs in encode_chunks(chunks, tok, num_proc):
                writer.write(ids)
                bar.update(ndocs)
                if shard_end:
                    writer.sync()  # the data must be durable before the record says it is there
                    state.update(shards_done=shard + 1, tokens=writer.num_tokens)
                    write_json(path + ".progress.json", state)
        finally:
            writer.close()  # the .partial file stays, for a resume or for the commit
    if stop < num_shards:
        return None
    state.update(shards_done=num_shards, tokens=writer.num_tokens, done=True)
    write_json(path + ".progress.json", state)
    return writer.num_tokens


def shard_chunks(ds, first, stop, num_shards):
    """Encoder tasks for shards first..stop-1, tagged (shard, is its last chunk)."""
    n = len(ds)
    for shard in range(first, stop):
        lo, hi = shard * n // num_shards, (shard + 1) * n // num_shards
        for i in range(lo, hi, DOCS_PER_CHUNK):
            j = min(i + DOCS_PER_CHUNK, hi)
            yield (shard, j == hi), [(text, True) for text in ds[i:j]["text"]], j - i


def main():
    args = script_args(__file__, __doc__.strip().split("\n")[0], num_proc=8,
                       hf_dataset="openwebtext", revision=None)
    from datasets import load_dataset
    with interruptible("the shards done so far are kept: run it again to continue"):
        try:
            ds = load_dataset(args.hf_dataset, revision=args.revision, num_proc=args.num_proc)
        except RuntimeError as e:
            raise DataError(f"cannot load {args.hf_dataset} ({e}); try "
                            f"--revision=refs/convert/parquet")
        prepare(ds["train"], args.out_dir, args.num_proc)


if __name__ == "__main__":
    install_error_hook()
    main()
