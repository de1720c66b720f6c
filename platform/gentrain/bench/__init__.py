"""Benchmarks that print a table and write JSON; they measure, they never pass or fail.

    gentrain bench data --samples 20000
"""
