"""`feedfleet chaos`: the real fleet under supervisord, faults injected on a schedule, and
what a downstream consumer saw measured (see ``chaos/run.py``)."""
