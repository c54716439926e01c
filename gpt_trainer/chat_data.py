"""
Conversation records as people have them, for data/chat/prepare.py: jsonl / json / parquet
files (optionally compressed; corpus.py's inputs and decoding) and local HF datasets, each
record in one of three layouts, all turned into a list of {'role', 'content'} messages:

  messages       {"messages": [{"role": "user", "content": "..."}, ...]}   (OpenAI's, HF's)
  conversations  {"conversations": [{"from": "human", "value": "..."}, ...]}   (ShareGPT)
  alpaca         {"instruction": "...", "input": "...", "output": "..."}   (input optional)

A record that fits none, or has an unknown role or no assistant message, is a bad record:
an error naming it (--errors=strict), or left out and counted (--errors=skip).
"""
import json

from gpt_trainer.corpus import BadRecord, decode, fix_surrogates, open_binary

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}


def to_messages(record):
    """The record's conversation as messages; raises ValueError naming what is wrong."""
    from gpt_trainer.chat_template import BadConversation, check_messages
    if not isinstance(record, dict):
        raise BadConversation("a record must be a JSON object")
    if "messages" in record:
        return check_messages(record["messages"])
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list):
            raise BadConversation("'conversations' is not a list")
        messages = []
        for i, t in enumerate(turns):
            role = SHAREGPT_ROLES.get(t.get("from")) if isinstance(t, dict) else None
            if role is None:
                raise BadConversation(f"conversations[{i}]: 'from' must be one of {', '.join(SHAREGPT_ROLES)}")
            messages.append({"role": role, "content": t.get("value")})
        return check_messages(messages)
    if "instruction" in record and "output" in record:
        prompt = record["instruction"]
        if isinstance(record.get("input"), str) and record["input"]:
            prompt = f"{prompt}\n\n{record['input']}"
        return check_messages([{"role": "user", "content": prompt},
                               {"role": "assistant", "content": record["output"]}])
    raise BadConversation("no 'messages', 'conversations' or 'instruction'/'output' fields")


def _surrogate_free(messages, replace, offset, where):
    for m in messages:
        m["content"] = fix_surrogates(m["content"], replace, offset, where)
    return messages


def file_records(src, opts):
    """(index, where, record or BadRecord) for every record of a corpus.FileSource or DatasetSource."""
    if not hasattr(src, "format"):  # a Hugging Face dataset
        for i, row in enumerate(src.ds):
            yield i, i, row
        return
    if src.format == "parquet":
        import pyarrow.parquet as pq
        i = 0
        for batch in pq.ParquetFile(src.path).iter_batches(batch_size=1000):
            for row in batch.to_pylist():
                yield i, f"row {i}", row
                i += 1
        return
    f, raw = open_binary(src.path)
    with f, raw:
        if src.format == "json":
            try:
                records = json.loads(decode(f.read(), 0, opts.replace))
            except BadRecord as e:
                yield 0, None, e
                return
            except ValueError as e:
                yield 0, None, BadRecord(f"not valid JSON ({e})")
                return
            for i, r in enumerate(records if isinstance(records, list) else [records]):
                yield i, f"element {i}", r
            return
        offset, lineno, rec = 0, 0, 0
        while line := f.readline():
            lineno, start, offset = lineno + 1, offset, offset + len(line)
            if not line.strip():
                continue
            try:
                yield rec, lineno, json.loads(decode(line, start, opts.replace, lineno))
            except BadRecord as e:
                yield rec, lineno, e
            except ValueError as e:
                yield rec, lineno, BadRecord(f"not valid JSON ({e})", start, lineno)
            rec += 1


def conversations(src, opts):
    """(messages or BadRecord) for every record of src, in order."""
    for i, where, record in file_records(src, opts):
        if isinstance(record, BadRecord):
            yield record
            continue
        try:
            yield _surrogate_free(to_messages(record), opts.replace, None, where)
        except BadRecord as e:
            yield e
        except ValueError as e:
            yield BadRecord(str(e), None, where)
