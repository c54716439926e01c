"""
evaluate.py and metrics.py: bits per byte against direct computations (ASCII chars, tiktoken's
own decoding, a byte-level BPE), multiple-choice scoring against transformers'
GPT2LMHeadModel logits on a HellaSwag-format file, batching and world-size invariance, the
HellaSwag loader online and offline, and TensorBoard curves read back with tensorboard's
EventAccumulator (also across a resume).
"""
import json
import math
import os
import shutil
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainutil import (REPO, char_data, child_env, corpus_text, free_port, need_tiktoken, one_error_line,  # noqa: F401
                       read_metrics, run_torchrun, run_train)

from gpt_trainer import evaluation  # noqa: E402
from gpt_trainer.dataloader import DataError, get_batch, open_dataset  # noqa: E402
from gpt_trainer.metrics import MetricsLogger  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from gpt_trainer.dataprep import write_dataset  # noqa: E402
from gpt_trainer.tokenizer import CharTokenizer, TiktokenTokenizer, train_bpe  # noqa: E402

EVALUATE = os.path.join(REPO, "evaluate.py")
CPU = dict(ctx=nullcontext(), device="cpu")


def tiny_gpt(vocab_size, block_size=32, seed=0, **kw):
    torch.manual_seed(seed)
    config = GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32, **kw)
    return GPT(config).eval()


def hellaswag_line(ind, ctx_a, ctx_b, endings, label):
    """One line of HellaSwag's own jsonl (every field the official file has)."""
    return json.dumps({"ind": ind, "activity_label": "Test activity", "ctx_a": ctx_a, "ctx_b": ctx_b,
                       "ctx": f"{ctx_a} {ctx_b}" if ctx_b else ctx_a, "split": "val", "split_type": "indomain",
                       "label": label, "endings": endings, "source_id": f"activitynet~v_test{ind}"})


# short ASCII examples: they fit a char model trained on tinyshakespeare with block_size 32
SHORT = [
    (24, "A man is on a roof.", "he", ["is using wrap to wrap skis.", "is ripping tiles off.",
                                       "is holding a cube.", "starts pulling up shingles."], 3),
    (25, "A woman walks in.", "she", ["sits down at a table.", "eats the door.", "flies away.",
                                      "is a chair."], 0),
    (26, "Two dogs run.", "they", ["chase a ball.", "read a book.", "bake bread!", "sing loudly;"], 0),
    (27, "The boy jumps.", "", ["He lands on his feet.", "He is a tree.", "Then, he sleeps.",
                                "Then he runs off."], 0),
    (28, "A cook stirs a pot.", "the cook", ["adds salt.", "drives a car.", "swims.", "tastes it."], 3),
]
# GPT-2 BPE examples: non-ASCII text, and a context longer than the model's 64 positions
LONG_CTX = " ".join(["The instructor shows the class how to hold the paddle, then explains each stroke."] * 6)
GPT2_EXAMPLES = SHORT + [
    (30, "Ein Mann fährt Fahrrad über die Straße.", "er", ["hält an der Ampel — und wartet.", "isst Käse.",
                                                           "fliegt zum Mond.", "singt «Ça va»."], 0),
    (31, LONG_CTX, "the class", ["practices the strokes in the water.", "goes home.", "eats lunch.",
                                 "paints a wall."], 0),
]


def write_hellaswag(path, examples):
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(hellaswag_line(*ex) + "\n" for ex in examples))
    return str(path)


def char_tokenizer(data_dir):
    with open(os.path.join(data_dir, "meta.json")) as f:
        return CharTokenizer(json.load(f)["chars"])


# -----------------------------------------------------------------------------
# bits per byte


def test_token_byte_lengths_char_and_padding():
    lengths = evaluation.token_byte_lengths(CharTokenizer(["\n", "a", "é", "日", "🙂"]), vocab_size=8)
    assert lengths.tolist() == [1, 1, 2, 3, 4, 0, 0, 0]  # ids past the tokenizer's: 0 bytes


def test_bpb_on_ascii_chars_is_loss_over_ln2(char_data):
    """One byte per token: bits per byte is exactly the loss in bits, and the loss is the mean
    of the per-token losses of the same windows computed directly."""
    tok = char_tokenizer(char_data)
    assert all(ord(c) < 128 for c in tok.chars)
    model = tiny_gpt(tok.vocab_size)
    splits, _ = open_dataset(char_data, 32, tok.vocab_size)
    r = evaluation.estimate_loss(model, splits, 32, 4, 3, token_bytes=evaluation.token_byte_lengths(tok), **CPU)
    for split in ("train", "val"):
        assert r[f"{split}_bpb"] == r[f"{split}_loss"] / math.log(2)
        direct = [model(*get_batch(splits[split], 32, 4, evaluation.EVAL_SEED, k, 0))[1].item() for k in range(3)]
        assert r[f"{split}_loss"] == pytest.approx(sum(direct) / 3, rel=1e-6)


def gpt2_dataset(path):
    need_tiktoken("gpt2")
    tok = TiktokenTokenizer("gpt2")
    docs = [f"Document {i}: café — naïve façade, {i * 7} Straße, 東京は日本の首都です 🙂."
            for i in range(40)]
    ids = tok.encode_segments([(d, True) for d in docs])  # an end-of-text token after each document
    write_dataset(str(path), tok, {"train": ids, "val": ids})
    return str(path), tok


def test_bpb_gpt2_matches_tiktoken_decoding(tmp_path):
    data_dir, tok = gpt2_dataset(tmp_path / "gpt2data")
    model = tiny_gpt(50304)  # GPT-2's vocabulary padded, as train.py's default
    splits, _ = open_dataset(data_dir, 32, 50304)
    table = evaluation.token_byte_lengths(tok, 50304)
    r = evaluation.estimate_loss(model, {"val": splits["val"]}, 32, 4, 3, token_bytes=table, **CPU)
    # direct: nats of every target that is not end-of-text over the bytes tiktoken decodes them to
    nats = text_nats = nbytes = count = eots = 0
    for k in range(3):
        x, y = get_batch(splits["val"], 32, 4, evaluation.EVAL_SEED, k, 0)
        with torch.no_grad():
            logits = model(x, all_logits=True)[0]
        per_token = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").double()
        text = y.flatten() != tok.eot_token
        nats, count = nats + per_token.sum().item(), count + y.numel()
        text_nats += per_token[text].sum().item()
        nbytes += len(tok.enc.decode_bytes(y.flatten()[text].tolist()))
        eots += int((~text).sum())
    assert eots > 0 and nbytes > 1.5 * (count - eots), "the windows hold end-of-text and multi-byte tokens"
    assert r["val_loss"] == pytest.approx(nats / count, rel=1e-9)
    assert r["val_bpb"] == pytest.approx(text_nats / nbytes / math.log(2), rel=1e-9)


TEXT = "Plain ASCII, then café, naïve, 東京, emoji 🙂🎉, and <|endoftext|> written as text.\n"


@pytest.mark.parametrize("encoding", ["gpt2", "cl100k_base"])
def test_token_byte_lengths_tiktoken(encoding):
    need_tiktoken(encoding)
    tok = TiktokenTokenizer(encoding)
    table = evaluation.token_byte_lengths(tok)
    ids = tok.encode(TEXT * 3)
    assert sum(table[i].item() for i in ids) == len((TEXT * 3).encode("utf-8"))
    assert table[tok.eot_token] == 0 and len(table) == tok.vocab_size


def test_token_byte_lengths_bpe(tmp_path):
    texts = [corpus_text()[:20000], TEXT * 20]
    tok = train_bpe(iter(texts), 400, str(tmp_path / "tokenizer.json"))
    table = evaluation.token_byte_lengths(tok)
    ids = tok.encode(TEXT)
    assert sum(table[i].item() for i in ids) == len(TEXT.encode("utf-8"))
    assert table[tok.eot_token] == 0
    assert any(table[i] > 1 for i in ids), "merged tokens span several bytes"


# -----------------------------------------------------------------------------
# multiple choice against transformers


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """A random HF GPT-2 with GPT-2's vocabulary and 64 positions, saved and imported."""
    transformers = pytest.importorskip("transformers")
    from gpt_trainer import hf
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257,
                                  bos_token_id=None, eos_token_id=None)
    reference = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in reference.parameters():
            if p.dim() == 1:  # HF initialises norms and biases to 1 and 0
                p.add_(0.1 * torch.randn_like(p))
    path = str(tmp_path_factory.mktemp("hf_gpt2"))
    reference.save_pretrained(path)
    return hf.gpt_from_hf(path).eval(), reference


def hf_reference(reference, enc, examples, block_size):
    """HellaSwag's protocol computed directly: each context + ending alone through HF's logits;
    returns (summed nats per ending, acc, acc_norm)."""
    sums, correct, correct_norm = [], 0, 0
    for ex in examples:
        ctx = enc.encode(ex["ctx"])
        total, per_token = [], []
        for ending in ex["endings"]:
            end = enc.encode(" " + ending)
            ids = (ctx + end)[-(block_size + 1):]
            with torch.no_grad():
                logp = torch.log_softmax(reference(torch.tensor([ids[:-1]])).logits[0].double(), -1)
            target = torch.tensor(ids[1:])
            nats = -logp[torch.arange(len(target)), target][-len(end):].sum().item()
            total.append(nats)
            per_token.append(nats / len(end))
        sums += total
        correct += int(np.argmin(total) == ex["label"])
        correct_norm += int(np.argmin(per_token) == ex["label"])
    return sums, correct / len(examples), correct_norm / len(examples)


def test_scorer_matches_transformers(hf_gpt2, tmp_path):
    model, reference = hf_gpt2
    examples = evaluation.load_hellaswag(write_hellaswag(tmp_path / "hs.jsonl", GPT2_EXAMPLES))
    need_tiktoken("gpt2")
    tok = TiktokenTokenizer("gpt2")
    encoded, left_out = evaluation.encode_examples(examples, tok, 64)
    assert left_out == 0 and len(tok.encode(examples[-1]["ctx"])) > 64, "the long context is cut, not left out"
    rows = [row for _, endings in encoded for row in endings]
    sums = evaluation.ending_losses(model, rows, 5, **CPU)
    ref_sums, acc, acc_norm = hf_reference(reference, tok.enc, examples, 64)
    assert sums.tolist() == pytest.approx(ref_sums, rel=1e-5)
    scores = evaluation.score_multiple_choice(model, encoded, 5, **CPU)
    assert scores == {"acc": acc, "acc_norm": acc_norm, "n": len(examples)}


def test_batched_scoring_equals_one_at_a_time(hf_gpt2, tmp_path):
    model, _ = hf_gpt2
    need_tiktoken("gpt2")
    examples = evaluation.load_hellaswag(write_hellaswag(tmp_path / "hs.jsonl", GPT2_EXAMPLES))
    encoded, _ = evaluation.encode_examples(examples, TiktokenTokenizer("gpt2"), 64)
    rows = [row for _, endings in encoded for row in endings]
    one = evaluation.ending_losses(model, rows, 1, **CPU)
    for batch_size in (3, 8, len(rows)):
        batched = evaluation.ending_losses(model, rows, batch_size, **CPU)
        assert batched.tolist() == pytest.approx(one.tolist(), rel=1e-6)
        assert (evaluation.score_multiple_choice(model, encoded, batch_size, **CPU)
                == evaluation.score_multiple_choice(model, encoded, 1, **CPU))


def test_char_model_scores_and_leaves_out_what_it_cannot_read(tmp_path):
    # a vocabulary that spells every SHORT example, but not '['
    texts = [f"{ctx} {ctx_b} {' '.join(endings)}" for _, ctx, ctx_b, endings, _ in SHORT] + ["far thirty-two"]
    tok = CharTokenizer(sorted(set("".join(texts)) - {"["}))
    examples = evaluation.load_hellaswag(write_hellaswag(tmp_path / "hs.jsonl", SHORT + [
        (40, "A [title] with brackets", "", ["no.", "yes."], 0),  # '[' is not in tinyshakespeare
        (41, "Short.", "", ["an ending far longer than the block size of thirty-two characters", "ok."], 1)]))
    encoded, left_out = evaluation.encode_examples(examples, tok, 32)
    assert (len(encoded), left_out) == (len(SHORT), 2)
    model = tiny_gpt(tok.vocab_size)
    scores = evaluation.score_multiple_choice(model, encoded, 4, **CPU)
    # char by char: a token is a byte, so acc_norm here is per byte
    rows = [row for _, endings in encoded for row in endings]
    sums = evaluation.ending_losses(model, rows, 1, **CPU).tolist()
    per_char = [s / n for s, (_, n) in zip(sums, rows)]
    expected = np.mean([np.argmin(per_char[4 * i:4 * i + 4]) == label for i, (label, _) in enumerate(encoded)])
    assert scores["n"] == len(SHORT) and scores["acc_norm"] == expected


# -----------------------------------------------------------------------------
# the HellaSwag loader


def test_hellaswag_loader_parses_its_format(tmp_path):
    path = write_hellaswag(tmp_path / "hellaswag_val.jsonl", SHORT)
    examples = evaluation.load_hellaswag(path, url="http://127.0.0.1:9/never-used")
    assert examples[0] == {"ctx": "A man is on a roof. he", "endings": SHORT[0][3], "label": 3}
    assert examples[3]["ctx"] == "The boy jumps." and len(examples) == len(SHORT)
    with open(path, "a") as f:
        f.write('{"ctx": "no endings", "label": 0}\n')
    with pytest.raises(DataError, match=f"line {len(SHORT) + 1}"):
        evaluation.load_hellaswag(path)


def test_hellaswag_offline_is_one_clear_error(tmp_path):
    path = str(tmp_path / "hellaswag" / "hellaswag_val.jsonl")
    with pytest.raises(DataError) as e:
        evaluation.load_hellaswag(path, url="http://127.0.0.1:9/hellaswag_val.jsonl")  # nothing listens there
    assert "\n" not in str(e.value) and f"put the file at {path}" in str(e.value)
    assert not os.path.exists(os.path.dirname(path)) or os.listdir(os.path.dirname(path)) == []


def save_char_checkpoint(model, path, tok, data_dir):
    torch.save({"model": model.state_dict(), "model_args": asdict(model.config),
                "meta": {"encoding": "char", "chars": tok.chars, "vocab_size": tok.vocab_size},
                "iter_num": 0, "best_val_loss": 1e9, "config": {"data_dir": data_dir}}, path)
    return str(path)


def run_evaluate(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, EVALUATE, *args], cwd=REPO, env=env or child_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_val_of_an_hf_dir_takes_data_of_its_tokenizer_in_any_library(hf_gpt2, char_data, tmp_path):
    """An HF GPT-2 directory with GPT-2's tokenizer.json scores 'val' of data encoded with
    tiktoken's gpt2 (the same ids, another library's files); data of another tokenizer is refused,
    naming the first id that means something else."""
    from gpt_trainer import hf
    data_dir, _ = gpt2_dataset(tmp_path / "gpt2data")
    model_dir = str(tmp_path / "hf")
    hf_gpt2[1].save_pretrained(model_dir)
    hf.save_gpt2_tokenizer(model_dir, *hf.read_gpt2_tokenizer_files(), 64)
    args = [f"--init_from={model_dir}", "--tasks=val", "--eval_iters=2", "--batch_size=2", "--device=cpu"]
    p = run_evaluate(*args, f"--data_dir={data_dir}", f"--results={tmp_path / 'r.json'}")
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "r.json").read_text())["val_loss"] > 0
    p = run_evaluate(*args, f"--data_dir={char_data}")
    assert p.returncode == 1
    assert "id 0 is '\\n' in the data, '!' in the model: its val loss" in one_error_line(p.stderr)


def test_command_offline_prints_one_line(char_data, tmp_path):
    """The real download, with the network cut (a proxy that refuses): one error line that names
    the official URL and where to put the file."""
    tok = char_tokenizer(char_data)
    ckpt = save_char_checkpoint(tiny_gpt(tok.vocab_size), tmp_path / "ckpt.pt", tok, char_data)
    missing = str(tmp_path / "hs" / "hellaswag_val.jsonl")
    env = child_env(https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", no_proxy="", NO_PROXY="")
    p = run_evaluate(f"--ckpt={ckpt}", "--tasks=hellaswag", f"--hellaswag_path={missing}", "--device=cpu", env=env)
    assert p.returncode == 1
    line = one_error_line(p.stderr.replace(f"downloading {evaluation.HELLASWAG_URL} to {missing}\n", ""))
    assert f"could not download {evaluation.HELLASWAG_URL}" in line and f"put the file at {missing}" in line
    assert line.endswith("or leave hellaswag out of the tasks")


def test_command_fetches_tasks_before_scoring(char_data, tmp_path):
    """The default tasks (val, hellaswag) offline: the download fails before val is estimated,
    not after minutes of it. val here would fail on its own (a broken meta.json), so the error
    that comes out says which went first."""
    tok = char_tokenizer(char_data)
    ckpt = save_char_checkpoint(tiny_gpt(tok.vocab_size), tmp_path / "ckpt.pt", tok, char_data)
    broken = tmp_path / "broken"
    shutil.copytree(char_data, broken)
    (broken / "meta.json").write_text('{"broken')
    missing = str(tmp_path / "hs" / "hellaswag_val.jsonl")
    env = child_env(https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", no_proxy="", NO_PROXY="")
    p = run_evaluate(f"--ckpt={ckpt}", f"--data_dir={broken}", f"--hellaswag_path={missing}", "--device=cpu", env=env)
    assert p.returncode == 1 and p.stdout == ""
    line = one_error_line(p.stderr.replace(f"downloading {evaluation.HELLASWAG_URL} to {missing}\n", ""))
    assert f"could not download {evaluation.HELLASWAG_URL}" in line, line


def test_command_matches_in_process(char_data, tmp_path):
    tok = char_tokenizer(char_data)
    model = tiny_gpt(tok.vocab_size)
    ckpt = save_char_checkpoint(model, tmp_path / "ckpt.pt", tok, char_data)
    hs = write_hellaswag(tmp_path / "hs.jsonl", SHORT)
    out = str(tmp_path / "results.json")
    p = run_evaluate(f"--ckpt={ckpt}", f"--hellaswag_path={hs}", "--eval_iters=3", "--batch_size=4",
                     f"--results={out}", "--device=cpu")
    assert p.returncode == 0, p.stderr
    got = json.load(open(out))
    splits, _ = open_dataset(char_data, 32, tok.vocab_size)
    want = evaluation.estimate_loss(model, {"val": splits["val"]}, 32, 4, 3,
                                  token_bytes=evaluation.token_byte_lengths(tok), **CPU)
    encoded, _ = evaluation.encode_examples(evaluation.load_hellaswag(hs), tok, 32)
    want.update({f"hellaswag_{k}": v for k, v in evaluation.score_multiple_choice(model, encoded, 4, **CPU).items()})
    assert got == pytest.approx(want, rel=1e-9)
    assert f"val loss {want['val_loss']:.4f}, val bpb {want['val_bpb']:.4f}" in p.stdout


@pytest.mark.slow
def test_two_processes_equal_one(char_data, tmp_path):
    """evaluate.py and train.py's evaluation under torchrun (gloo, 2 CPU processes) give bitwise
    the numbers of one process; 7 batches and 5 examples (20 rows, 3 batches of 8) do not split
    evenly over 2 ranks."""
    run_train(str(tmp_path / "trained"), char_data, max_iters=2)  # a checkpoint train.py can resume
    ckpt = str(tmp_path / "trained" / "ckpt.pt")
    hs = write_hellaswag(tmp_path / "hs.jsonl", SHORT)
    args = [f"--ckpt={ckpt}", f"--hellaswag_path={hs}", "--eval_iters=7", "--batch_size=8", "--device=cpu"]
    one, two = str(tmp_path / "one.json"), str(tmp_path / "two.json")
    p = run_evaluate(*args, f"--results={one}")
    assert p.returncode == 0, p.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--max-restarts=0",
           EVALUATE, *args, f"--results={two}"]
    q = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert q.returncode == 0, q.stderr[-3000:]
    assert json.load(open(one)) == json.load(open(two))
    # train.py: eval_only from the same weights
    out1, out2 = str(tmp_path / "t1"), str(tmp_path / "t2")
    for out in (out1, out2):
        os.makedirs(out)
        os.link(ckpt, os.path.join(out, "ckpt.pt"))
    settings = dict(init_from="resume", eval_only=True, eval_iters=7, batch_size=8, eval_tasks="hellaswag",
                    hellaswag_path=hs, gradient_accumulation_steps=2)
    run_train(out1, char_data, **settings)
    run_torchrun(2, out2, char_data, **settings)
    r1, r2 = read_metrics(out1), read_metrics(out2)
    assert r1 == r2 and len(r1) == 1
    expected = json.load(open(one))
    assert {k: r1[0][k] for k in expected} == expected


# -----------------------------------------------------------------------------
# TensorBoard


def tensorboard_curves(out_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(out_dir, "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def jsonl_curve(records, key):
    return [(r["iter"], pytest.approx(r[key], rel=1e-6)) for r in records if r.get(key) is not None]


def test_logger_resumed_run_continues_the_curves(tmp_path):
    out = str(tmp_path)
    logger = MetricsLogger(out, 0, tensorboard=True)
    for it in range(6):
        if it % 4 == 0:
            logger.log({"iter": it, "val_loss": 5.0 - it, "val_bpb": 7.0 - it})
        logger.log({"iter": it, "loss": 4.0 - 0.1 * it, "lr": 1e-3, "grad_norm": 1.0 + it, "mfu": None})
    logger.close()
    # a run that died at iter 5 resumes from its checkpoint at iter 3, with other numbers
    logger = MetricsLogger(out, 3, tensorboard=True)
    for it in range(3, 6):
        logger.log({"iter": it, "loss": 9.0 + it, "lr": 5e-4, "grad_norm": 0.5, "mfu": None})
    logger.log({"iter": 6, "val_loss": 1.5, "val_bpb": 2.5})
    logger.close()
    records = read_metrics(out)
    assert [r["iter"] for r in records if "loss" in r] == list(range(6))
    curves = tensorboard_curves(out)
    assert set(curves) == {"train/loss", "train/lr", "train/grad_norm", "eval/val_loss", "eval/val_bpb"}
    for tag, key in [("train/loss", "loss"), ("train/lr", "lr"), ("train/grad_norm", "grad_norm"),
                     ("eval/val_loss", "val_loss"), ("eval/val_bpb", "val_bpb")]:
        assert curves[tag] == jsonl_curve(records, key), tag
    assert curves["eval/val_loss"] == [(0, 5.0), (6, 1.5)]  # the eval at iter 4 is gone


@pytest.mark.slow
def test_train_writes_tensorboard_and_resumes_its_curves(char_data, tmp_path):
    """train.py with tensorboard_log: loss, lr, grad norm every step, val loss, bpb and HellaSwag
    at evaluations, read back equal to metrics.jsonl. A run that went on past its checkpoint and
    is resumed from it with another learning rate replaces the old curves from there on."""
    out, hs = str(tmp_path / "out"), write_hellaswag(tmp_path / "hs.jsonl", SHORT)
    run = dict(tensorboard_log=True, eval_tasks="hellaswag", hellaswag_path=hs, eval_interval=4,
               eval_tasks_interval=8, lr_decay_iters=8)
    run_train(out, char_data, max_iters=4, **run)
    shutil.copy(os.path.join(out, "ckpt.pt"), str(tmp_path / "ckpt4.pt"))
    run_train(out, char_data, init_from="resume", max_iters=8, **run)
    shutil.copy(str(tmp_path / "ckpt4.pt"), os.path.join(out, "ckpt.pt"))
    run_train(out, char_data, init_from="resume", max_iters=8, learning_rate=5e-4, **run)
    records = read_metrics(out)
    from gpt_trainer.optim import get_lr
    lr_at_5 = [r["lr"] for r in records if r["iter"] == 5 and "lr" in r]
    assert lr_at_5 == [pytest.approx(get_lr(5, 5e-4, 1e-4, 2, 8))], "the resumed run's learning rate"
    curves = tensorboard_curves(out)
    for tag, key in [("train/loss", "loss"), ("train/lr", "lr"), ("train/grad_norm", "grad_norm"),
                     ("eval/val_loss", "val_loss"), ("eval/val_bpb", "val_bpb"),
                     ("eval/hellaswag_acc_norm", "hellaswag_acc_norm")]:
        assert curves[tag] == jsonl_curve(records, key), tag
    assert [s for s, _ in curves["train/loss"]] == list(range(8))
    assert [s for s, _ in curves["eval/val_loss"]] == [0, 4, 8]
    assert [s for s, _ in curves["eval/hellaswag_acc"]] == [0, 8]
    assert all(r["grad_norm"] > 0 for r in records if "loss" in r)
