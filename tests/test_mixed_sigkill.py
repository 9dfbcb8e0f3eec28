"""SIGKILL campaign: the real server killed during change sets of files and one database.

The campaign and its checks live in tests/mixed_sigkill_harness.py: each round sends one
``apply_changes`` of new versions of every file (one by an edit), a directory in every other
round and a schema migration in every fifth, with the database rows that record each file's
sha256, to ``atomictools serve`` over stdio, SIGKILLs the server at a random moment of the
call, restarts it (startup recovery), runs ``atomictools.recover`` and checks: no torn file,
files and database at one version (and the one the kill allows), no journal record, no set left
for a person, no temp, member, claim or marker row left (but the round's own stale marker row
and young lone claim the harness describes, each checked to go later), ``PRAGMA
integrity_check`` ok. The naive control (files, then the rows in a transaction of their own)
must show mixed rounds.

``ATOMICTOOLS_MIXED_SIGKILL_ROUNDS`` (default 16), ``ATOMICTOOLS_MIXED_SIGKILL_CONTROL_ROUNDS``
(default 16), ``ATOMICTOOLS_MIXED_SIGKILL_SEED`` and ``ATOMICTOOLS_MIXED_SIGKILL_DRIVER``
(server or child) tune the test (some 25 s on two cores); the long campaign is
``python tests/benchmarks/bench_mixed_sigkill.py --rounds 300``.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from atomictools.engine.changes import markers
from atomictools.engine.changes.record import RECORD_SUFFIX
from atomictools.engine.changes.sweep import GRACE_SECONDS
from atomictools.engine.durable.tempfiles import claim_name_for
from tests.conftest import SummaryReport, summary_report
from tests.mixed_sigkill_harness import (
    SET_DIR,
    Campaign,
    Lane,
    Settings,
    connect,
    file_path,
    header_of,
    look,
    make_version,
    parse_version,
    run_campaign,
)

ROUNDS = int(os.environ.get("ATOMICTOOLS_MIXED_SIGKILL_ROUNDS", "16"))
SEED = int(
    os.environ.get("ATOMICTOOLS_MIXED_SIGKILL_SEED", str(random.SystemRandom().getrandbits(32)))
)
DRIVER = os.environ.get("ATOMICTOOLS_MIXED_SIGKILL_DRIVER", "server")
CONTROL_ROUNDS = int(os.environ.get("ATOMICTOOLS_MIXED_SIGKILL_CONTROL_ROUNDS", "16"))

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs POSIX processes")


@pytest.fixture(scope="module")
def report(pytestconfig: pytest.Config) -> SummaryReport:
    return summary_report(pytestconfig, "SIGKILL campaign: files and a database")


def test_verifier_tells_complete_versions_from_torn_ones() -> None:
    old = make_version(1, 7, "x" * 5000).encode()
    new = make_version(1, 8, "y" * 5000).encode()
    assert parse_version(old, 1) == 7
    assert parse_version(new, 1) == 8
    assert parse_version(new, 2) is None  # another file's content
    assert parse_version(new[:-1], 1) is None
    assert parse_version(new + b"y", 1) is None
    assert parse_version(new[:2500] + old[2500:], 1) is None
    edited = header_of(1, 8).encode() + old[len(header_of(1, 7)) :]
    assert parse_version(edited, 1) == 8  # an edit of the header keeps the file whole


def test_the_checks_see_a_mixed_state(tmp_path: Path) -> None:
    """The control: a set whose files land but whose rows do not is seen as mixed."""
    lane = Lane(tmp_path, "server", random.Random(1), Campaign("control"), Settings(nfiles=2))
    lane.setup()
    seen, files = look(lane.root, lane.db, 2)
    assert seen.problems(2, files) == []
    assert seen.integrity == "ok"
    (lane.root / file_path(0)).write_text(make_version(0, 1, "new body"))
    seen, files = look(lane.root, lane.db, 2)
    assert seen.problems(2, files)  # a file ahead of the database
    with connect(lane.db) as conn:
        conn.execute("INSERT INTO sets (version, files) VALUES (1, 2)")
    seen, files = look(lane.root, lane.db, 2)
    assert seen.problems(2, files)  # the other file and the rows behind


def _marker_lane(tmp_path: Path) -> tuple[Lane, Callable[[str], str]]:
    lane = Lane(tmp_path, "server", random.Random(1), Campaign("checks"), Settings(nfiles=2))
    lane.setup()
    journals = os.path.realpath(lane.state / "journals")
    return lane, lambda txid: os.path.join(journals, txid + RECORD_SUFFIX)


def _add_marker(lane: Lane, txid: str, record: str) -> None:
    with connect(lane.db) as conn:
        conn.execute("BEGIN IMMEDIATE")
        markers.insert(conn, txid, record)
        conn.execute("COMMIT")


def test_the_checks_allow_only_the_rounds_own_stale_marker(tmp_path: Path) -> None:
    """A stale marker row is allowed only as the round's set's own after a kill between its
    record's removal and the row's, and only until a set commits."""
    lane, record = _marker_lane(tmp_path)
    t1, t2 = "20261207T000000-000000000001", "20261207T000000-000000000002"
    _add_marker(lane, t1, record(t1))
    lane.check_markers("r1", "finished, marker left", t1, committed=True)
    assert (lane.campaign.leftovers, lane.campaign.stale_markers) == (0, 1)
    lane.check_markers("r2", "prepared, not committed", t2, committed=False)  # nothing commits
    assert lane.campaign.leftovers == 0
    lane.check_markers("r3", "answered", t2, committed=True)  # its set had to drop the row
    assert lane.campaign.leftovers == 1

    for phase, txid, name, committed in [
        ("finished, marker left", t1, markers.decided_name(t1), True),  # recovery drops it
        ("prepared, not committed", t1, t1, False),  # recovery decided, then dropped it
        ("finished, marker left", t1, t2, True),  # another set's
    ]:
        lane, record = _marker_lane(tmp_path / name.replace("/", "-") / phase)
        _add_marker(lane, name, record(txid))
        lane.check_markers("r", phase, txid, committed=committed)
        assert lane.campaign.leftovers == 1, (phase, name)
    lane, record = _marker_lane(tmp_path / "live")
    _add_marker(lane, t1, record(t1))
    Path(record(t1)).parent.mkdir(parents=True, exist_ok=True)
    Path(record(t1)).write_text("{}")  # its record is there: recovery is not done
    lane.check_markers("r", "finished, marker left", t1, committed=True)
    assert lane.campaign.leftovers == 1


def test_the_checks_allow_only_the_rounds_own_young_lone_claim(tmp_path: Path) -> None:
    """A claim may stay after a recovery only as the round's set's, alone, left by a kill
    before any journal record, and younger than the sweep's grace period when it ran."""
    lane, record = _marker_lane(tmp_path)
    t1, t2 = "20261207T000000-000000000001", "20261207T000000-000000000002"
    claim = lane.root / SET_DIR / claim_name_for(t1)
    claim.symlink_to(record(t1))
    now = time.time()
    assert not lane.young_claim(claim, "staging (preparing record)", t1, now)  # handled
    assert not lane.young_claim(claim, "prepared, not committed", t1, now)
    assert not lane.young_claim(claim, "staging", t2, now)  # another set's
    assert not lane.young_claim(claim, "staging", t1, now + GRACE_SECONDS)  # old: swept
    assert lane.young_claim(claim, "staging", t1, now)
    assert lane.young_claims == [claim]
    assert lane.young_claim(claim, "answered", t2, now + 1)  # later rounds: while young
    assert not lane.young_claim(claim, "answered", t2, now + GRACE_SECONDS)
    assert lane.campaign.young_claims == 1


def _report(report: SummaryReport, campaign: Campaign) -> None:
    report.add(f"{campaign.summary()} seed={SEED}")
    report.add(
        "  kill phases: "
        + ", ".join(f"{k} {n}" for k, n in campaign.phases.most_common())
        + " | timings: "
        + ", ".join(f"{k} {n}" for k, n in campaign.timings.most_common())
    )


def test_server_killed_during_mixed_sets_leaves_files_and_database_together(
    tmp_path: Path, report: SummaryReport
) -> None:
    campaign = run_campaign(ROUNDS, tmp_path, driver=DRIVER, seed=SEED)
    _report(report, campaign)
    details = "\n".join(campaign.problems[:20])
    assert campaign.rounds == ROUNDS
    assert campaign.anomalies == 0, details


def test_control_committing_files_and_rows_apart_is_seen_mixed(
    tmp_path: Path, report: SummaryReport
) -> None:
    """The naive control (files, then the rows in a transaction of their own) killed at random
    must show mixed rounds: the campaign sees a mix when there is one."""
    campaign = run_campaign(CONTROL_ROUNDS, tmp_path, driver="naive", seed=SEED)
    _report(report, campaign)
    assert campaign.rounds == CONTROL_ROUNDS
    assert campaign.mixed > 0, "\n".join(campaign.problems[:20])
    assert campaign.torn == 0
