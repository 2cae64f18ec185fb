"""Process settings (rr_alloc/runtime.py): opt-in, idempotent, switchable off."""

from rr_alloc import runtime


def test_tune_malloc_idempotent_and_reports_state(monkeypatch):
    monkeypatch.setattr(runtime, "_applied", None)
    first = runtime.tune_malloc()
    assert isinstance(first, bool)
    assert runtime.tune_malloc() is first
    import platform

    if platform.libc_ver()[0] == "glibc":
        assert first is True


def test_tune_malloc_env_off(monkeypatch):
    monkeypatch.setattr(runtime, "_applied", None)
    monkeypatch.setenv("RR_ALLOC_MALLOC_TUNING", "0")
    assert runtime.tune_malloc() is False


def test_import_does_not_tune(monkeypatch):
    import importlib

    monkeypatch.setattr(runtime, "_applied", None)
    importlib.reload(importlib.import_module("rr_alloc"))
    assert runtime._applied is None
