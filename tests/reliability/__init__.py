"""Reliability and security suite (issue 6). A package so its conftest never shadows tests/conftest.py."""
