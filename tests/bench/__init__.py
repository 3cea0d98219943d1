"""The benchmark, ``python -m tests.bench`` (``make bench``): the steps in ``runner.py``."""
