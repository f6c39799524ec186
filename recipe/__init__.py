"""The headless recipe's machinery, used by train.py (notebooks 01-03 do not import it)."""
