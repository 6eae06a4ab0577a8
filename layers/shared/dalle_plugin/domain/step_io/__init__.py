"""Each function's step contracts, one module per function (domain/run.py says why apart)."""
