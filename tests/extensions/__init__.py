"""Extensions written outside the package, one file each (see tests/test_extensions.py)."""
