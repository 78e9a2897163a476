"""Release: an update's entry in updates.json, read and written as the same JSON (what `rdscale info`, `verify`,
`--abort` and readers of a run being updated rely on)."""

from __future__ import annotations

import json
from pathlib import Path

from rdscale.io.runs import Run
from rdscale.run.update import Release, followed_release, read_releases, releases

RUNNING = {"name": "B1", "inputs": ["/data/b.fasta"], "base": 4, "before": {"proteins.lance": 3, "shards.lance": 5},
           "previous": "initial", "previous_versions": {"proteins.lance": 3, "shards.lance": 5},
           "previous_proteins": 30, "status": "running", "started": "2026-01-01T00:00:00Z"}
DONE = {**RUNNING, "status": "done", "versions": {"proteins.lance": 9, "shards.lance": 12},
        "report": {"release": "B1", "proteins": 31}, "finished": "2026-01-01T00:01:00Z"}


def test_round_trip_keeps_the_json_entry():
    for entry in (RUNNING, DONE):
        release = Release.from_dict(json.loads(json.dumps(entry)))
        assert release.to_dict() == entry
        assert list(release.to_dict()) == list(entry)  # same key order: the file reads as before
    running = Release.from_dict(RUNNING)
    assert not running.done and "versions" not in running.to_dict() and "finished" not in running.to_dict()
    assert Release.from_dict(DONE).done
    assert Release.from_dict({**RUNNING, "base": "4"}).base == 4  # numbers as JSON may hold them


def test_state_file_read_by_every_reader(tmp_path):
    run = Run(tmp_path)
    assert read_releases(run) == [] and followed_release(run) is None and releases(run) == []
    Path(run.update_state).write_text(json.dumps({"releases": [RUNNING]}))
    assert read_releases(run) == [Release.from_dict(RUNNING)]
    assert followed_release(run).name == "B1"
    assert "release B1 is running or was interrupted" in run.update_in_progress()
    assert [(r["name"], r["status"]) for r in releases(run)] == [("initial", "done"), ("B1", "running")]
    assert Release.from_dict(RUNNING).resume_command(run) == f"rdscale update {run} --release B1 --fasta /data/b.fasta"
    Path(run.update_state).write_text(json.dumps({"releases": [DONE]}))
    assert run.update_in_progress() is None
    assert releases(run)[-1] == {"name": "B1", "versions": DONE["versions"], "proteins": 31, "status": "done",
                                 "report": DONE["report"]}
