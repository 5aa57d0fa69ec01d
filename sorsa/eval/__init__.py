"""Benchmarks: generation, GSM-8K, MATH, HumanEval, the code sandbox."""
