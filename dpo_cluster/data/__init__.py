"""Preference data: sources, formats, tokenization, the Ray Data pipeline and its accounting.

Every stage speaks the records of `records`, so a row is kept, or dropped with exactly one
reason, wherever it fails.
"""
