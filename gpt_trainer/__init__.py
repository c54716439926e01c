"""gpt-trainer's library: the modules the top-level scripts (train.py, sample.py, evaluate.py,
bench.py, export.py) are built from. Each module has one job; see the README's file map."""
