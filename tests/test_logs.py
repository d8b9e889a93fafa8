"""Log rate limiting: repeats of one message kind are counted, not written."""

from __future__ import annotations

import logging

import pytest

from edge_agent.cli import main
from edge_agent.ops import logs
from edge_agent.ops.logs import RateLimit


def _record(msg: str, *args: object, name: str = "edge_agent.x") -> logging.LogRecord:
    return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args, None)


def test_burst_then_suppressed_then_counted_after_the_window() -> None:
    now = [0.0]
    limit = RateLimit(burst=3, window_s=10.0, clock=lambda: now[0])
    passed = [limit.filter(_record("camera %s: bad frame %d", "c", i)) for i in range(100)]
    assert passed == [True] * 3 + [False] * 97
    # Another kind (other template or logger) has its own budget.
    assert limit.filter(_record("inference failed: %r", 1))
    assert limit.filter(_record("camera %s: bad frame %d", "c", 0, name="edge_agent.y"))
    now[0] = 10.0
    record = _record("camera %s: bad frame %d", "c", 100)
    assert limit.filter(record)
    assert record.getMessage() == "camera c: bad frame 100 [97 similar message(s) suppressed]"


def test_the_cli_installs_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # let basicConfig add its own
    main(["run", "--config", "/nonexistent/config.yaml"])
    handler = logging.getLogger().handlers[-1]
    assert any(isinstance(f, RateLimit) for f in handler.filters)
    log = logging.getLogger("edge_agent.test")
    for i in range(50):
        log.warning("repeated %d", i)
    err = capsys.readouterr().err
    assert err.count("repeated") == 10


def test_other_libraries_info_lines_only_with_verbose(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """faiss's loader logs eight INFO lines at every start: a user sees them with -v only; the
    product's own INFO lines and anyone's warnings always."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    for verbose in (False, True):
        root.handlers.clear()
        logs.setup(logging.DEBUG if verbose else logging.INFO)
        logging.getLogger("faiss.loader").info("Loading faiss with AVX512 support.")
        logging.getLogger("faiss.loader").warning("could not load the GPU build")
        logging.getLogger("edge_agent.export.fit").info("precision auto: int8")
        err = capsys.readouterr().err
        assert ("Loading faiss" in err) == verbose
        assert "could not load the GPU build" in err and "precision auto: int8" in err
