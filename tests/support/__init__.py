"""Test support: the backend matrix, process control and the HTTP helper (re-exported
by conftest.py, which keeps only the pytest hooks and fixtures)."""
