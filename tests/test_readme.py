"""
Every command README.md and docs/*.md show is run as written, so a documented example cannot silently
break. plan() says how each one runs here: as written, with tiny settings appended where it
would train or sample for long (and torchrun's 8 processes as 2), or skipped with the reason
(a download from the internet, a second machine, a nanoGPT checkout). The slow test runs them
in README order in a scratch copy of the repository, so later commands see what earlier ones
wrote (the quick start's checkpoint, a prepared dataset).
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from trainutil import REPO, SHAKESPEARE, child_env

README = os.path.join(REPO, "README.md")
# every docs/*.md, run after the README's (whose commands prepare what theirs use): these first, in
# this order, then the others by name
FIRST = ("nanogpt.md", "evaluation.md", "cpu_speed.md", "gpu.md", "reliability.md")
DOCS = [os.path.join(REPO, "docs", name) for name in FIRST] + sorted(
    os.path.join(REPO, "docs", f) for f in os.listdir(os.path.join(REPO, "docs"))
    if f.endswith(".md") and f not in FIRST and f != "chat.md")  # tests/test_chat.py runs chat.md's, with an HF model
COMMAND = re.compile(r"^    (python|torchrun|pip|bash|hf |NANO|cd )")
# appended to every train.py run: a tiny model, two iterations, and a fresh start in an out_dir
# that an earlier command of the README already trained into
TINY_TRAIN = ("--device=cpu --compile=False --n_layer=1 --n_head=2 --n_kv_head=0 --n_embd=32 --block_size=32 "
              "--batch_size=2 --gradient_accumulation_steps=2 --max_iters=2 --eval_interval=2 "
              "--eval_iters=1 --warmup_iters=1 --lr_decay_iters=2 --overwrite=True")
TINY_SAMPLE = "--device=cpu --max_new_tokens=8"
TINY_EVALUATE = "--device=cpu --eval_iters=1 --max_examples=2"
TINY_BENCH_SAMPLE = ("--n_layer=1 --n_head=2 --n_embd=32 --block_size=32 --tokens=40 --repeats=1 "
                     "--measure_mb=8 --measure_n=128")
TINY_BENCH_TRAIN = ("--n_layer=1 --n_head=2 --n_embd=32 --block_size=32 --batch_size=2 --max_iters=3 "
                    "--warmup=1 --rounds=1 --measure_mb=8 --measure_n=128")
TINY_BENCH_QUALITY = "--n_layer=1 --n_head=2 --n_embd=32 --block_size=32 --max_iters=4 --eval_interval=2 --eval_iters=1"
SKIPS = [  # (a part of the command, why it cannot run here)
    ("python -m pytest", "the test suite itself"), ("bash .ci/run", "the test suite itself"),
    ("bash .ci/gpu", "needs a CUDA GPU and a nanoGPT checkout"),
    ("init_from=gpt2", "downloads OpenAI's GPT-2 from the Hugging Face hub"),
    ("finetune_shakespeare", "downloads OpenAI's GPT-2 XL from the Hugging Face hub"),
    ("out-shakespeare/", "needs the GPT-2 XL fine-tune above"),
    ("eval_gpt2", "downloads OpenAI's GPT-2 from the Hugging Face hub"),
    ("openwebtext/prepare.py", "downloads OpenWebText (54 GB)"),
    ("hf download", "downloads SmolLM2 from the Hugging Face hub"),
    ("SmolLM2", "needs SmolLM2-135M from the hub"), ("smollm2", "needs SmolLM2-135M from the hub"),
    ("--nnodes=2", "needs a second machine"), ("NANO", "needs a nanoGPT checkout ($NANOGPT): run by "
                                                       "tests/test_nanogpt.py with NANOGPT=DIR"),
    ("--index-url", "installs torch from download.pytorch.org; .ci/run installs the same CPU build"),
    ("--input=src/", "run with the inputs it names by tests/test_dataprep.py::test_readme_data_commands"),
    ("--input='logs", "run with the inputs it names by tests/test_dataprep.py::test_readme_data_commands"),
    ("--input=docs.parquet", "run with the inputs it names by tests/test_dataprep.py::test_readme_data_commands"),
    ("--input=hf:", "downloads a dataset from the Hugging Face hub"),
    ("--input=big/", "run with the inputs it names by tests/test_dataprep.py::test_readme_data_commands"),
    ("smollm2-135m-random", "a 135M-parameter measurement; tests/test_hf_llama.py trains imported models"),
    ("/tmp/bench_char", "the data of the 135M-parameter measurement above"),
    ("lm_eval:arc_easy", "downloads ARC and PIQA from the Hugging Face hub"),
]


def readme_commands(path=README):
    """The shell commands of the README (or a docs file): indented lines that start with a
    command, continuation lines (trailing backslash) joined, in order."""
    lines, commands = open(path).read().splitlines(), []
    i = 0
    while i < len(lines):
        if COMMAND.match(lines[i]):
            command = lines[i].strip()
            while command.endswith("\\"):
                i += 1
                command = command[:-1].rstrip() + " " + lines[i].strip()
            commands.append(command)
        i += 1
    return commands


def plan_part(part):
    """('run', shell command) or ('skip', reason) for one command of a `a && b` chain."""
    if part.startswith("pip install -r requirements.txt"):
        return "skip", "the environment the tests run in is installed from requirements.txt"
    if part.startswith("tensorboard --logdir"):
        return "logdir", part.split()[-1]
    part = part.replace("--nproc_per_node=8", "--nproc_per_node=2").replace(" ...", "")
    if "bench.py --sample" in part:
        return "run", f"{part} {TINY_BENCH_SAMPLE}"
    if "bench.py --quality" in part:
        return "run", f"{part} {TINY_BENCH_QUALITY}"
    if "bench.py" in part:
        return "run", f"{part} {TINY_BENCH_TRAIN}"
    if re.search(r"\btrain\.py\b", part) and "--help" not in part:
        return "run", f"{part} {TINY_TRAIN}"
    if "sample.py" in part:
        return "run", f"{part} {TINY_SAMPLE}"
    if "evaluate.py" in part:
        return "run", f"{part} {TINY_EVALUATE}"
    return "run", part


def plan(command):
    """The plan of every part of a README command (its `# comment` dropped)."""
    command = re.split(r"\s{2,}#\s", command)[0].strip()
    for fragment, why in SKIPS:
        if fragment in command:
            return [("skip", why)]
    return [plan_part(part.strip()) for part in command.split(" && ")]


def test_every_readme_command_has_a_plan():
    commands = readme_commands()
    quick_start = next(c for c in commands if "prepare.py" in c)  # after the install line
    assert "prepare.py" in quick_start and "train.py" in quick_start and "sample.py" in quick_start
    assert [kind for kind, _ in plan(quick_start)] == ["skip", "run", "run", "run"]
    # the README's test command is the one .ci/run runs
    assert "pip install -r requirements.txt && python -m pytest -q tests" in commands
    ci = open(os.path.join(REPO, ".ci", "run")).read().splitlines()
    assert "pip install -r requirements.txt && python -m pytest -q tests" in ci, "CI runs it as written"
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu && pip install -r requirements.txt" \
        in commands, "the README says how to install without CUDA wheels"
    plans = [p for c in commands for p in plan(c)]
    runs = [cmd for kind, cmd in plans if kind == "run"]
    assert len(runs) >= 15, "most of the README's commands run here"
    assert all("--nproc_per_node=8" not in cmd for cmd in runs)
    assert all(cmd.endswith(TINY_TRAIN) for cmd in runs if " train.py " in f" {cmd} " and "--help" not in cmd)


# -----------------------------------------------------------------------------
# running them


def hellaswag_fixture(path):
    """Two examples in HellaSwag's own jsonl format (the real file is downloaded online)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for ind in range(2):
            f.write(json.dumps({"ind": ind, "activity_label": "Talking", "ctx_a": "The king speaks to",
                                "ctx_b": "the", "ctx": "The king speaks to the", "split": "val",
                                "split_type": "indomain", "label": ind, "source_id": f"x~{ind}",
                                "endings": ["queen.", "people.", "lords.", "sea."]}) + "\n")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A copy of the repository with the inputs the README's commands read."""
    inputs = [os.path.join(REPO, "data", "shakespeare_char", "input.txt"), SHAKESPEARE]
    corpus = next((p for p in inputs if os.path.exists(p)), None)
    if corpus is None:
        pytest.skip("the README's commands prepare tinyshakespeare: put its input.txt at "
                    "data/shakespeare_char/input.txt")
    root = str(tmp_path_factory.mktemp("readme") / "repo")
    shutil.copytree(REPO, root, ignore=shutil.ignore_patterns(
        ".git", "out*", "*.bin", "__pycache__", ".pytest_cache", "wandb", "*.partial"))
    os.makedirs(os.path.join(root, "data", "openwebtext", "tmp"))
    for d in ("shakespeare_char", "shakespeare", "openwebtext/tmp"):
        shutil.copyfile(corpus, os.path.join(root, "data", d, "input.txt"))
    os.makedirs(os.path.join(root, "my_texts"))
    with open(corpus) as f, open(os.path.join(root, "my_texts", "plays.txt"), "w") as g:
        g.write(f.read()[:200_000])
    with open(os.path.join(root, "prompt.txt"), "w") as f:
        f.write("ROMEO:")
    hellaswag_fixture(os.path.join(root, "data", "hellaswag", "hellaswag_val.jsonl"))
    # config/train_gpt2.py trains on data/openwebtext: here a GPT-2 BPE stand-in of the same form
    p = subprocess.run([sys.executable, "data/shakespeare/prepare.py", "--out_dir=data/openwebtext/tmp"],
                       cwd=root, env=child_env(), capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"GPT-2 BPE is not available offline ({p.stderr.strip()[-200:]}); set TIKTOKEN_CACHE_DIR")
    for name in os.listdir(os.path.join(root, "data", "openwebtext", "tmp")):
        if name != "input.txt":
            os.replace(os.path.join(root, "data", "openwebtext", "tmp", name), os.path.join(root, "data", "openwebtext", name))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("command", readme_commands() + [c for doc in DOCS for c in readme_commands(doc)])
def test_readme_command(scratch, command):
    for kind, what in plan(command):
        if kind == "skip":
            continue
        if kind == "logdir":
            assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(scratch, what)))
            continue
        # `python` and `torchrun` are the ones of the interpreter running the tests
        env = child_env(PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
                        HF_DATASETS_OFFLINE="1")  # lm_eval tasks: local files only
        p = subprocess.run(what, shell=True, cwd=scratch, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"{what}\nexited {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
