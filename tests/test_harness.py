"""
gpt_trainer/harness.py: our model inside lm-evaluation-harness, on local task files written here (no
network: dataset_path json with data_files). References: the harness's own HF backend (HFLM) on
the same model exported to a transformers directory, evaluate.py's HellaSwag scorer, and our
val loss / bits per byte on the same text.
"""
import json
import math
import os
import random
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import asdict

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before datasets is imported: never download
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from trainutil import REPO, char_data, child_env, need_tiktoken, one_error_line, read_metrics, run_train  # noqa: E402,F401

pytest.importorskip("lm_eval")
from gpt_trainer import evaluation, harness  # noqa: E402
from gpt_trainer.checkpoint import save_checkpoint  # noqa: E402
from gpt_trainer.dataloader import TokenFile  # noqa: E402
from gpt_trainer.tokenizer import CharTokenizer, TiktokenTokenizer  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

EVALUATE = os.path.join(REPO, "evaluate.py")
BLOCK = 48

# HellaSwag-shaped examples: a context, endings that follow it after a space, the right one's index
EXAMPLES = [
    ("A man is on a roof. He", ["is using wrap to wrap skis.", "is ripping tiles off.", "is holding a cube.",
                                "starts pulling up shingles."], 3),
    ("A woman walks in. She", ["sits down at a table.", "eats the door.", "flies away.", "is a chair."], 0),
    ("Two dogs run. They", ["chase a ball.", "read a book.", "bake bread!", "sing loudly;"], 2),
    ("The boy jumps.", ["He lands on his feet.", "He is a tree.", "Then, he sleeps.", "Then he runs off."], 1),
    ("A cook stirs a pot. The cook", ["adds salt.", "drives a car.", "swims.", "tastes it."], 3),
    ("Ein Mann fährt Fahrrad. Er", ["hält an der Ampel — und wartet.", "isst Käse.", "fliegt.", "singt «Ça va»."], 1),
    ("The instructor shows the class how to hold the paddle, then explains each stroke to the group. The class",
     ["practices the strokes in the water.", "goes home.", "eats lunch.", "paints a wall."], 0),
    ("A girl opens a book. She", ["reads the first page.", "throws it.", "eats it.", "sleeps."], 2),
]


def write_task(tmp, name, output_type, rows, body):
    """A task YAML and its jsonl data in tmp; returns the YAML's path."""
    data = os.path.join(tmp, f"{name}.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    path = os.path.join(tmp, f"{name}.yaml")
    with open(path, "w") as f:
        f.write(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                f"test_split: test\noutput_type: {output_type}\n{body}")
    return path


def mc_task(tmp, examples=EXAMPLES):
    rows = [{"ctx": c, "endings": e, "label": label} for c, e, label in examples]
    body = ('doc_to_text: "{{ctx}}"\ndoc_to_choice: "{{endings}}"\ndoc_to_target: label\n'
            "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return write_task(tmp, "tiny_mc", "multiple_choice", rows, body)


def rolling_task(tmp, texts):
    body = ('doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n'
            "  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    return write_task(tmp, "tiny_text", "loglikelihood_rolling", [{"text": t} for t in texts], body)


def gen_task(tmp, prompts):
    body = ('doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
            'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 6\n  do_sample: false\n'
            "metric_list:\n  - metric: exact_match\n")
    return write_task(tmp, "tiny_gen", "generate_until", [{"prompt": p, "answer": "x"} for p in prompts], body)


def decisive_gpt(vocab_size, seed=0):
    """A random GPT-2-shaped model whose logits spread widely (the embedding scaled up), so that
    which ending or token wins is decided far above float rounding between implementations."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=BLOCK, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        model.transformer.wte.weight.mul_(40)
    return model.eval()


@pytest.fixture(scope="module")
def gpt2_model(tmp_path_factory):
    """(model, tokenizer, checkpoint path, exported HF dir): a GPT-2 BPE model as train.py saves
    it, and the same exported with hf.py (GPT-2's tokenizer files included)."""
    need_tiktoken("gpt2")
    from export import export_hf
    tmp = tmp_path_factory.mktemp("harness_model")
    model = decisive_gpt(50304)
    ckpt = str(tmp / "ckpt.pt")
    save_checkpoint({"model": model.state_dict(), "model_args": asdict(model.config), "iter_num": 0,
                     "best_val_loss": 1e9, "config": {"dataset": "none"}, "meta": {"encoding": "gpt2"}}, ckpt)
    export_hf(ckpt, str(tmp / "hf"))
    return model, TiktokenTokenizer("gpt2"), ckpt, str(tmp / "hf")


def hf_backend(hf_dir, batch_size=3):
    from lm_eval.models.huggingface import HFLM
    return HFLM(pretrained=hf_dir, device="cpu", batch_size=batch_size, dtype="float32")


def run_harness(lm, task_path):
    """The harness's evaluate() on a task file: (results, {doc_id: [per-request responses]})."""
    from lm_eval.evaluator import evaluate as lm_evaluate
    results = lm_evaluate(lm=lm, task_dict=harness.load_harness_tasks([task_path]), bootstrap_iters=0,
                          log_samples=True, verbosity="WARNING")
    samples = next(iter(results["samples"].values()))
    return results, {s["doc_id"]: [r[0] for r in s["resps"]] for s in samples}


# -----------------------------------------------------------------------------
# multiple choice: the same answers as the harness's HF backend and as evaluate.py's scorer


def test_multiple_choice_matches_hf_backend_and_our_scorer(gpt2_model, tmp_path):
    model, tok, _, hf_dir = gpt2_model
    task = mc_task(str(tmp_path))
    ours, our_resps = run_harness(harness.GPTLM(model=model, tokenizer=tok, batch_size=3), task)
    theirs, their_resps = run_harness(hf_backend(hf_dir), task)
    # every ending's log-likelihood and greedy flag, then the task's numbers
    for doc_id, resps in their_resps.items():
        assert [r[0] for r in our_resps[doc_id]] == pytest.approx([r[0] for r in resps], abs=1e-3)
        assert [r[1] for r in our_resps[doc_id]] == [r[1] for r in resps]
    ours, theirs = harness.flatten_results(ours), harness.flatten_results(theirs)
    assert ours["lm_eval:tiny_mc_n"] == theirs["lm_eval:tiny_mc_n"] == len(EXAMPLES)
    assert ours["lm_eval:tiny_mc_acc"] == theirs["lm_eval:tiny_mc_acc"]
    assert ours["lm_eval:tiny_mc_acc_norm"] == pytest.approx(theirs["lm_eval:tiny_mc_acc_norm"], abs=1e-9)
    assert 0 < ours["lm_eval:tiny_mc_acc"] < 1, "a test where every answer is right (or wrong) proves little"
    # evaluate.py's HellaSwag scorer: context, then " " + ending, lowest total loss = the harness's acc
    encoded, left_out = evaluation.encode_examples(
        [{"ctx": c, "endings": e, "label": label} for c, e, label in EXAMPLES], tok, BLOCK)
    assert left_out == 0
    scores = evaluation.score_multiple_choice(model, encoded, 3, nullcontext(), "cpu")
    assert scores["acc"] == ours["lm_eval:tiny_mc_acc"]
    losses = evaluation.ending_losses(model, [row for _, endings in encoded for row in endings], 3, nullcontext(), "cpu")
    logliks = [r[0] for doc_id in sorted(our_resps) for r in our_resps[doc_id]]
    assert (-losses).tolist() == pytest.approx(logliks, abs=1e-3)


def test_char_model_scores_what_it_can_read(char_data, tmp_path, capsys):
    """A character outside a char model's vocabulary scores -inf (never chosen) and is counted."""
    with open(os.path.join(char_data, "meta.json")) as f:
        tok = CharTokenizer(json.load(f)["chars"])
    model = decisive_gpt(tok.vocab_size)
    readable = [ex for ex in EXAMPLES if all(c in tok.chars for c in ex[0] + " " + " ".join(ex[1]))]
    task = mc_task(str(tmp_path), readable + [("A cat. It", ["naps.", "sings «la».", "hops.", "runs."], 1)])
    loaded = harness.load_harness_tasks([task])
    r = harness.score_harness(loaded, model, tok, 4, nullcontext())
    assert r["lm_eval:tiny_mc_n"] == len(readable) + 1
    assert "1 requests held characters outside the model's vocabulary" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# perplexity: the harness's rolling windows against our val loss and bits per byte


def text_of_whole_blocks(tok, blocks):
    """Text whose GPT-2 tokens fill exactly `blocks` windows of BLOCK tokens (cut at a word)."""
    words = ("The quick brown fox jumps over the lazy dog; café naïve façade, 東京 and Straße, "
             "to be or not to be, that is the question.").split() * 40
    for start in range(20):
        for n in range(len(words) - start):
            text = " ".join(words[start:start + n])
            if len(tok.encode(text)) >= blocks * BLOCK:
                break
        if len(tok.encode(text)) == blocks * BLOCK:
            return text
    raise AssertionError("no cut fills whole blocks")


def test_rolling_loglikelihood_equals_our_val_loss(gpt2_model, tmp_path):
    """The harness scores a text in disjoint windows of block_size tokens, the first conditioned
    on end-of-text, each later one on the block before (its own tokens). Our val loss over the
    same windows, as evaluation.estimate_loss computes it on a split of exactly one window each,
    gives the same nats, and the same bits per byte as the harness's bits_per_byte."""
    model, tok, _, hf_dir = gpt2_model
    text = text_of_whole_blocks(tok, 3)
    task = rolling_task(str(tmp_path), [text])
    ours, resps = run_harness(harness.GPTLM(model=model, tokenizer=tok, batch_size=2), task)
    loglik = resps[0][0]
    stream = np.array([tok.eot_token] + tok.encode(text), dtype=np.uint16)
    windows = {}  # splits of exactly one window each, as open_dataset's files
    for j in range(3):
        stream[j * BLOCK:(j + 1) * BLOCK + 1].tofile(tmp_path / f"w{j}.bin")
        windows[f"w{j}"] = TokenFile(str(tmp_path / f"w{j}.bin"), np.uint16)
    token_bytes = evaluation.token_byte_lengths(tok, model.config.vocab_size)
    r = evaluation.estimate_loss(model, windows, BLOCK, 1, 1, nullcontext(), "cpu", token_bytes=token_bytes)
    nats = sum(r[f"w{j}_loss"] * BLOCK for j in range(3))
    assert -loglik == pytest.approx(nats, rel=1e-5)
    bpb = harness.flatten_results(ours)["lm_eval:tiny_text_bits_per_byte"]
    assert bpb == pytest.approx(nats / math.log(2) / len(text.encode("utf-8")), rel=1e-5)
    assert bpb == pytest.approx(np.mean([r[f"w{j}_bpb"] for j in range(3)]), rel=0.05)  # per-window bytes differ
    # and the harness's HF backend on the exported model
    _, their_resps = run_harness(hf_backend(hf_dir), task)
    assert their_resps[0][0] == pytest.approx(loglik, rel=1e-5)


@pytest.mark.slow
def test_command_val_and_rolling_task_agree(gpt2_model, tmp_path):
    """evaluate.py --tasks=val,lm_eval:FILE on a checkpoint: a val split of one window (end-of-text
    and BLOCK tokens of text) has the val bpb that the harness reports as bits_per_byte."""
    from gpt_trainer.dataprep import write_dataset
    model, tok, ckpt, _ = gpt2_model
    text = text_of_whole_blocks(tok, 1)
    ids = np.array([tok.eot_token] + tok.encode(text), dtype=np.uint16)
    data_dir = str(tmp_path / "data")
    write_dataset(data_dir, tok, {"train": ids, "val": ids})
    task = rolling_task(str(tmp_path), [text])
    results = str(tmp_path / "results.json")
    p = subprocess.run([sys.executable, EVALUATE, f"--ckpt={ckpt}", f"--data_dir={data_dir}", "--device=cpu",
                        f"--tasks=val,lm_eval:{task}", "--eval_iters=2", "--batch_size=2", f"--results={results}"],
                       cwd=REPO, env=child_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
                                               HF_DATASETS_CACHE=str(tmp_path / "hf_cache")),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(results) as f:
        r = json.load(f)
    assert r["lm_eval:tiny_text_bits_per_byte"] == pytest.approx(r["val_bpb"], rel=1e-5)
    assert r["lm_eval:tiny_text_n"] == 1
    assert "lm_eval:tiny_text_bits_per_byte" in p.stdout and "val bpb" in p.stdout


# -----------------------------------------------------------------------------
# generation, errors, the run's RNGs


def test_generate_until_matches_hf_backend(gpt2_model, tmp_path):
    """Greedy generation through our KV cache, prompts of several lengths batched, gives the HF
    backend's text (its left-padded batch on the exported model), cut at the stop strings."""
    model, tok, _, hf_dir = gpt2_model
    task = gen_task(str(tmp_path), [ex[0] for ex in EXAMPLES] + ["Two dogs run. They"])
    _, ours = run_harness(harness.GPTLM(model=model, tokenizer=tok, batch_size=3), task)
    _, theirs = run_harness(hf_backend(hf_dir), task)
    assert ours == theirs
    assert any(len(r[0]) > 3 for r in ours.values()), "generations that are not all empty"


def test_missing_task_file_and_local_data_are_named(tmp_path):
    with pytest.raises(harness.HarnessError, match="task file not found"):
        harness.load_harness_tasks([str(tmp_path / "nope.yaml")])
    task = mc_task(str(tmp_path))
    os.remove(os.path.join(tmp_path, "tiny_mc.jsonl"))
    with pytest.raises(harness.HarnessError, match="tiny_mc.jsonl.*relative to the directory"):
        harness.load_harness_tasks([task])


@pytest.mark.slow
def test_unknown_task_is_one_line(gpt2_model, tmp_path):
    _, _, ckpt, _ = gpt2_model
    p = subprocess.run([sys.executable, EVALUATE, f"--ckpt={ckpt}", "--device=cpu", "--tasks=lm_eval:no_such_task_xyz"],
                       cwd=REPO, env=child_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1
    assert "not a registered task" in one_error_line(p.stderr)


def test_scoring_leaves_the_run_rngs_alone(gpt2_model, tmp_path):
    """Scored inside train.py's loop, the harness must not reseed: a resumed run's dropout masks
    and data would otherwise differ from an uninterrupted one's."""
    model, tok, _, _ = gpt2_model
    loaded = harness.load_harness_tasks([gen_task(str(tmp_path), ["A man is on a roof."])])
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    harness.score_harness(loaded, model, tok, 2, nullcontext())
    assert torch.equal(torch.get_rng_state(), before[0])
    assert (np.random.get_state()[1] == before[1]).all() and random.getstate() == before[2]


def test_a_stop_signal_ends_scoring_within_a_batch(gpt2_model, tmp_path):
    """evaluation.score_tasks asks should_stop before every batch of the harness's requests too
    (one process): a signal during a long harness eval is heard within a batch, as in ours."""
    model, tok, _, _ = gpt2_model
    tasks = {"lm_eval": evaluation.HarnessTasks(harness.load_harness_tasks([mc_task(str(tmp_path))]), tok, 0)}
    asked = []
    with pytest.raises(evaluation.Interrupted):
        evaluation.score_tasks(tasks, model, 2, nullcontext(), "cpu", should_stop=lambda: asked.append(1) or len(asked) > 2)
    assert len(asked) == 3 and model.training is False  # stopped at the third batch of 16; the mode restored


# -----------------------------------------------------------------------------
# during training, and the harness's own command line


@pytest.mark.slow
def test_train_scores_harness_tasks_at_its_interval(char_data, tmp_path):
    """eval_tasks=lm_eval:FILE in train.py: the task's numbers at every eval_tasks_interval in
    metrics.jsonl, and the last equal to evaluate.py's on the final checkpoint; plot=True has
    written out_dir/metrics.png with the run's numbers."""
    with open(os.path.join(char_data, "meta.json")) as f:
        chars = set(json.load(f)["chars"])
    readable = [ex for ex in EXAMPLES if set(ex[0] + " " + " ".join(ex[1])) <= chars]
    task = mc_task(str(tmp_path), readable)
    out = str(tmp_path / "out")
    env = child_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    run_train(out, char_data, env=env, eval_tasks=f"lm_eval:{task}", eval_tasks_interval=5, max_iters=10,
              eval_interval=5, plot=True)
    from test_plot import expected, lines_of
    from gpt_trainer import plotting as plot
    assert os.path.exists(os.path.join(out, "metrics.png"))
    lines = lines_of(plot.make_figure(plot.load_runs([out])))
    assert lines[("val loss", out)] == expected(out, "val_loss") and lines[("val loss", out)][0] == [0, 5, 10]
    scored = [r for r in read_metrics(out) if "lm_eval:tiny_mc_acc" in r]
    assert [r["iter"] for r in scored] == [0, 5, 10]
    assert all(r["lm_eval:tiny_mc_n"] == len(readable) for r in scored)
    results = str(tmp_path / "r.json")
    p = subprocess.run([sys.executable, EVALUATE, f"--out_dir={out}", "--device=cpu", f"--tasks=lm_eval:{task}",
                        f"--results={results}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(results) as f:
        r = json.load(f)
    assert r["lm_eval:tiny_mc_acc"] == scored[-1]["lm_eval:tiny_mc_acc"]
    assert r["lm_eval:tiny_mc_acc_norm"] == scored[-1]["lm_eval:tiny_mc_acc_norm"]


@pytest.mark.slow
def test_harness_cli_with_our_model(gpt2_model, tmp_path):
    """`python harness.py run --model gpt-trainer ...` is lm_eval's own command line with our
    model registered; it scores the checkpoint as evaluate.py does."""
    model, tok, ckpt, _ = gpt2_model
    task = mc_task(str(tmp_path))
    out = tmp_path / "cli"
    p = subprocess.run([sys.executable, os.path.join(REPO, "harness.py"), "run", "--model", "gpt-trainer",
                        "--model_args", f"path={ckpt}", "--device", "cpu", "--tasks", task, "--output_path", str(out)],
                       cwd=REPO, env=child_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f.startswith("results")]
    with open(files[0]) as f:
        acc = json.load(f)["results"]["tiny_mc"]["acc,none"]
    r = harness.score_harness(harness.load_harness_tasks([task]), model, tok, 4, nullcontext())
    assert acc == r["lm_eval:tiny_mc_acc"]


@pytest.mark.slow
def test_two_processes_equal_one(gpt2_model, tmp_path):
    """Under torchrun the harness shares the requests out across ranks (our all_gather,
    gather_object and barrier over torch.distributed) and gathers the numbers on rank 0."""
    from trainutil import free_port
    _, tok, ckpt, _ = gpt2_model
    tasks = f"lm_eval:{mc_task(str(tmp_path))},{rolling_task(str(tmp_path), [text_of_whole_blocks(tok, 2), 'Short.'])}"
    env = child_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    results = []
    for nproc in (1, 2):
        out = str(tmp_path / f"r{nproc}.json")
        launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
                  "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}"] if nproc > 1 else [sys.executable]
        p = subprocess.run([*launch, EVALUATE, f"--ckpt={ckpt}", "--device=cpu", f"--tasks={tasks}",
                            f"--results={out}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        with open(out) as f:
            results.append(json.load(f))
    assert results[0].keys() == results[1].keys()
    assert results[0]["lm_eval:tiny_mc_n"] == len(EXAMPLES) and results[0]["lm_eval:tiny_text_n"] == 2
    for key, value in results[0].items():
        assert results[1][key] == pytest.approx(value, rel=1e-6), key
