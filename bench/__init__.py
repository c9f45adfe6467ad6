"""Benchmarks for vitaudit: ratios and rates measured in one run (`python bench/run.py`).

Importing this package runs nothing; see bench/run.py for the suite and bench/naive.py for
the store-every-map baseline.
"""
