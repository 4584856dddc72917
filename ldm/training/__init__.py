"""Training logic shared by train/*.py, the CLI and tests."""
