"""Where a study lives, and how an interrupted one is continued without losing or repeating work.

``None`` puts an SQLite file in the run folder; any Optuna RDB URL (``postgresql://…``,
``mysql://…``, ``sqlite:///…``) or the path of a journal file (``JournalFileBackend``: safe for
several processes on one machine or on a shared file system) is accepted instead, so that several
``autocomp search`` processes can share one study.

A trial a killed process left RUNNING must neither count nor block: every trial records its
owner (host and process id) when it starts, and on resume the RUNNING trials whose owner process
on this host is gone are marked FAIL and their candidate re-queued — live processes sharing the
study are left alone. COMPLETE trials are never touched, so none is lost or repeated.
"""

from __future__ import annotations

import os
import socket
import sqlite3
from datetime import datetime
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, Trial, TrialState
from sqlalchemy.engine import make_url

DEFAULT_FILE = "study.db"


def open_storage(
    storage: str | Path | BaseStorage | None, run_dir: Path
) -> tuple[BaseStorage, str]:
    """The storage object and the string that names it (pass it back to reopen the study).

    A storage object is used as it is (e.g. ``InMemoryStorage`` for experiments that need no
    record)."""
    if isinstance(storage, BaseStorage):
        return storage, type(storage).__name__
    if storage is None:
        url = f"sqlite:///{(run_dir / DEFAULT_FILE).resolve()}"
    elif "://" in str(storage):
        url = str(storage)
    else:
        path = Path(storage).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path))), str(path)
    database = make_url(url).database if url.startswith("sqlite:") else None
    if database:
        Path(database).parent.mkdir(parents=True, exist_ok=True)
        return RDBStorage(url, engine_kwargs={"creator": lambda: _sqlite_connect(database)}), url
    return RDBStorage(url), url


def _sqlite_connect(path: str) -> sqlite3.Connection:
    """Optuna writes every suggested parameter in its own transaction; with SQLite's default
    rollback journal each one waits for an fsync (~20 ms here, 2 s for a trial of the mbv3 space).
    WAL with ``synchronous=NORMAL`` drops that wait and stays consistent: a committed trial
    survives a killed process, only an OS crash or power loss may lose the last few. WAL needs a
    local file system; share a study across machines through a journal file or a database server.
    ``timeout``: wait for another process's lock rather than fail."""
    conn = sqlite3.connect(path, timeout=60, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def existing_trials(
    storage: str | Path | BaseStorage | None, run_dir: Path, study_name: str
) -> int | None:
    """How many trials the study already holds (None: no such study), without creating anything
    where nothing exists yet, so that a refused run leaves nothing behind."""
    if isinstance(storage, BaseStorage):
        pass
    elif storage is None:
        if not (run_dir / DEFAULT_FILE).exists():
            return None
    elif "://" not in str(storage) and not Path(storage).exists():
        return None
    store, _ = open_storage(storage, run_dir)
    if study_name not in optuna.get_all_study_names(store):
        return None
    return len(optuna.load_study(study_name=study_name, storage=store).trials)


def claim(trial: Trial) -> None:
    """Record who runs ``trial``, so that a resume can tell an orphan from a live peer's trial."""
    trial.set_user_attr("owner", {"host": socket.gethostname(), "pid": os.getpid()})


def recover_orphans(study: optuna.Study) -> list[int]:
    """Mark FAIL the RUNNING trials whose owner process on this host is gone; re-queue their
    candidates (their params) so that the work is retried. Returns the failed trial numbers."""
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _orphaned(trial):
            continue
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        if trial.params:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        failed.append(trial.number)
    return failed


#: A trial with no owner yet was asked a moment ago by a live process, or by one killed between
#: ``ask`` and ``claim``; after this many seconds it can only be the latter.
UNCLAIMED_GRACE_S = 30.0


def _orphaned(trial: FrozenTrial) -> bool:
    owner = trial.user_attrs.get("owner")
    if not owner:
        start = trial.datetime_start
        return start is not None and (datetime.now() - start).total_seconds() > UNCLAIMED_GRACE_S
    if owner.get("host") != socket.gethostname():
        return False
    pid = int(owner["pid"])
    return pid == os.getpid() or not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
