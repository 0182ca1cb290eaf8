"""`backtrack bench soak`: a tiny real soak (Redis, replay-upstream and the proxy as child processes,
Redis stopped and restarted midway); its report counts no lost audit event and no child is left.

No timing is asserted: the numbers depend on the machine. The counts asserted are the ones the soak
exists for (every reset the clients saw is an event in Redis after the outage).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench.soak_client import count_resets, read_body, read_stream
from proxy.cli.main import main


def children() -> set[str]:
    """Process ids of this process's children that still exist."""
    return {
        pid for task in Path("/proc/self/task").iterdir() for pid in (task / "children").read_text().split()
    }


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_a_tiny_soak_loses_no_audit_event_across_a_redis_outage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = children()
    code = main(
        ["bench", "soak", "--streams", "2", "--minutes", "0.15", "--redis-down-seconds", "2",
         "--sample-seconds", "1", "--out", str(tmp_path)]
    )  # fmt: skip

    captured = capsys.readouterr()
    printed = captured.out
    assert code == 0, captured.err  # why it could not run
    report = json.loads((tmp_path / "soak.json").read_text(encoding="utf-8"))
    assert children() <= before
    assert report["audit"]["lost"] == 0
    assert report["audit"]["found"] == report["audit"]["unique_ids"] == report["audit"]["expected"]
    assert report["outcomes"]["ok"] > 0 and report["outcomes"]["reset"] > 0
    assert report["outcomes"]["error_before"] > 0
    assert report["outcomes"]["client_error"] == 0 and report["outcomes"]["incomplete"] == 0
    assert report["redis"]["restarted_at_s"] > report["redis"]["stopped_at_s"] > 0
    assert report["audit"]["proxy_counter"].get("dropped") == 0
    assert report["command"].startswith("backtrack bench soak --streams 2 --minutes 0.15")
    assert (tmp_path / "soak.md").read_text(encoding="utf-8").strip() in printed


def test_resets_are_read_from_every_dialect() -> None:
    openai = 'data: {"choices": [], "backtrack": {"event": "reset"}}\n\ndata: [DONE]\n\n'
    anthropic = (
        'event: backtrack_reset\ndata: {"type": "backtrack_reset", "event": "reset"}\n\n'
        'event: message_stop\ndata: {"type": "message_stop"}\n\n'
    )
    ollama = '{"done": false, "backtrack": {"event": "reset"}}\n{"done": true}\n'
    assert read_stream(openai) == read_stream(anthropic) == read_stream(ollama) == ("reset", 1)
    assert read_stream('data: {"error": {"message": "x"}}\n\ndata: [DONE]\n\n') == ("error_in_band", 0)
    assert read_stream('data: {"choices": []}\n\n') == ("incomplete", 0)
    assert read_body('{"backtrack": {"event": "resets", "resets": [{"event": "reset"}] }}') == ("reset", 1)
    assert count_resets({"event": "resets", "resets": [{"event": "reset"}, {"event": "reset"}]}) == 2
