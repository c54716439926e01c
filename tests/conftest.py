import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the scripts and the gpt_trainer package live at the repo root (nothing is installed)

# tiktoken downloads its encodings on first use; offline machines get them from ../shared
_cache = os.path.join(ROOT, "..", "shared", "tiktoken_cache")
if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(_cache):
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(_cache)


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tests run tiny tensors, where one thread is fastest, and threads fighting a busy
    # machine (and the OMP_NUM_THREADS=1 subprocesses) are very slow
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
