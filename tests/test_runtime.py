"""gpt_trainer/runtime.py: gradient accumulation from the batch settings, and devices."""
import pytest
import torch

from gpt_trainer.errors import ConfigError
from gpt_trainer.runtime import derive_grad_accum, resolve_device


def test_derive_grad_accum():
    assert derive_grad_accum(40, 0, 12, 1024, 1) == 40
    assert derive_grad_accum(40, 0, 12, 1024, 8) == 5
    assert derive_grad_accum(4, 0, 8, 32, 2) == 2
    # total_batch_size wins over gradient_accumulation_steps: 8 * 32 * 2 * 3 tokens
    assert derive_grad_accum(5, 8 * 32 * 2 * 3, 8, 32, 2) == 3
    assert derive_grad_accum(5, 524288, 16, 1024, 8) == 4


def test_derive_grad_accum_not_divisible_by_world_size():
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=3.*2"):
        derive_grad_accum(3, 0, 8, 32, 2)


def test_derive_grad_accum_total_batch_not_divisible():
    with pytest.raises(ConfigError, match="total_batch_size=1000"):
        derive_grad_accum(1, 1000, 8, 32, 1)
    with pytest.raises(ConfigError, match="total_batch_size"):
        derive_grad_accum(1, 8 * 32 * 3, 8, 32, 2)  # one rank's worth too few


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "mps", "gpu"])
def test_a_device_this_machine_lacks_is_one_error(device):
    kind = torch.device(device).type if device != "gpu" else "gpu"
    if kind == "cuda" and torch.cuda.is_available() or kind == "mps" and torch.backends.mps.is_available():
        pytest.skip(f"this machine has {device}")
    with pytest.raises(ConfigError, match=f"device={device!r}"):
        resolve_device(device)
