"""configurator.py: settings from config files and --key=value overrides (train.py's command
line itself: test_train.py)."""
import os

import pytest

import configurator

SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")  # for --help


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def test_configure_none_default_takes_anything():
    assert configurator.configure({"x": None}, ["--x=5"], SOURCE) == {"x": 5}
    assert configurator.configure({"x": None}, ["--x=abc"], SOURCE) == {"x": "abc"}
    assert configurator.configure({"x": None}, ["--x=1.5"], SOURCE) == {"x": 1.5}


def test_configure_types():
    settings = {"lr": 0.1, "n": 3, "flag": False, "name": "a", "compile": "auto"}
    got = configurator.configure(settings, ["--lr=1", "--n=4", "--flag=True", "--name=b c",
                                            "--compile=False"], SOURCE)
    assert got == {"lr": 1, "n": 4, "flag": True, "name": "b c", "compile": False}
    for bad in ("--n=1.5", "--n=abc", "--n=True", "--flag=1", "--lr=abc", "--name=3"):
        with pytest.raises(configurator.ConfigError, match=bad[2:].split("=")[0]):
            configurator.configure(settings, [bad], SOURCE)


def test_configure_unknown_key_suggests():
    with pytest.raises(configurator.ConfigError, match="learning_rat.*learning_rate"):
        configurator.configure({"learning_rate": 0.1}, ["--learning_rat=1"], SOURCE)
    with pytest.raises(configurator.ConfigError, match="must look like --key=value"):
        configurator.configure({"learning_rate": 0.1}, ["--learning_rate"], SOURCE)


def test_configure_config_file(tmp_path):
    settings = {"lr": 0.1, "n": 3}
    good = write(tmp_path / "good.py", "import math\nlr = 0.5\ndef helper():\n    return 1\n_private = 2\n")
    # files then overrides, in order
    assert configurator.configure(settings, [good], SOURCE) == {"lr": 0.5, "n": 3}
    assert configurator.configure(settings, [good, "--lr=0.25"], SOURCE) == {"lr": 0.25, "n": 3}
    assert configurator.configure(settings, ["--lr=0.25", good], SOURCE) == {"lr": 0.5, "n": 3}


def test_configure_config_file_unknown_key(tmp_path):
    bad = write(tmp_path / "bad.py", "lr = 0.5\nnn = 4\n")
    with pytest.raises(configurator.ConfigError) as e:
        configurator.configure({"lr": 0.1, "n": 3}, [bad], SOURCE)
    assert bad in str(e.value) and "'nn'" in str(e.value)


def test_configure_config_file_wrong_type_and_syntax(tmp_path):
    bad = write(tmp_path / "bad.py", "n = 'four'\n")
    with pytest.raises(configurator.ConfigError, match="bad.py.*n='four'"):
        configurator.configure({"lr": 0.1, "n": 3}, [bad], SOURCE)
    broken = write(tmp_path / "broken.py", "n = (\n")
    with pytest.raises(configurator.ConfigError, match="broken.py"):
        configurator.configure({"lr": 0.1, "n": 3}, [broken], SOURCE)
