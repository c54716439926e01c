"""gpt_trainer/metrics.py: metrics.jsonl, where a damaged line never blocks a resume and a
full disk is one line."""
import json
import os

import pytest

from gpt_trainer import metrics
from gpt_trainer.errors import UserError
from trainutil import FullDisk


GOOD = ['{"iter": 0, "loss": 4.0}\n', '{"iter": 1, "loss": 3.9}\n', '{"iter": 2, "loss": 3.8}\n']


@pytest.mark.parametrize("damage", ["not json\n", "\0" * 300, "[1, 2]\n", '{"iter": "3"}\n', '{"iter": 3, "lo'])
def test_damaged_metrics_lines_are_dropped_with_one_warning(tmp_path, capsys, damage):
    path = str(tmp_path / "metrics.jsonl")
    with open(path, "w") as f:
        f.writelines([GOOD[0], damage if damage.endswith("\n") else "", GOOD[1], GOOD[2], damage])
    assert metrics.read_metrics(str(tmp_path)) == [json.loads(line) for line in GOOD]
    metrics.truncate_metrics(path, 2)
    assert open(path).read() == GOOD[0] + GOOD[1]
    warnings = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(warnings) == 2 and warnings[0] == warnings[1]  # read, then truncate
    numbers = "lines 2, 5" if damage.endswith("\n") else "line 4"
    assert warnings[0].startswith(f"warning: {path}: dropped") and warnings[0].endswith(f"({numbers})")
    metrics.truncate_metrics(path, 2)  # nothing left to drop: not rewritten, no warning
    assert capsys.readouterr().err == ""


def test_metrics_full_disk_is_one_line(tmp_path, monkeypatch):
    path = str(tmp_path / "metrics.jsonl")
    open(path, "w").writelines(GOOD + ['{"iter": 3, "loss": 3.7}\n'])
    before = open(path).read()
    def full_disk_open(p, mode="r", **kw):
        return FullDisk(p, mode, 0) if "w" in mode or "a" in mode else open(p, mode, **kw)
    monkeypatch.setattr(metrics, "open", full_disk_open, raising=False)
    with pytest.raises(UserError) as e:
        metrics.append_metrics(path, {"iter": 4, "loss": 3.6})
    assert str(e.value).startswith(f"could not append to {path}: no space left on device; "
                                   f"the records before iter 4")
    with pytest.raises(UserError) as e:  # at resume
        metrics.truncate_metrics(path, 3)
    assert "no space left on device" in str(e.value) and "unchanged" in str(e.value)
    assert open(path).read() == before
    assert os.listdir(tmp_path) == ["metrics.jsonl"]
