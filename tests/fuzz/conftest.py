"""The fuzz tier drives the in-process HTTP app like ``tests/http`` does."""

from tests.http.conftest import make_client

__all__ = ["make_client"]
