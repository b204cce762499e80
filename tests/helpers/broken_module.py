"""A user's module that fails while it is imported (tests/test_examples.py)."""
raise RuntimeError("this module is broken on purpose")
