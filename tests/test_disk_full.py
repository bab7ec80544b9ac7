"""Where the cache lives: a cache directory on a file system that fills up, or that cannot be written. Real tmpfs
mounts (this needs root; elsewhere the tests skip, saying so)."""

from __future__ import annotations

import contextlib
import re
import subprocess

import pytest
import torch

from conftest import ONE_THREAD, PIPELINES, read_report, run_process, tracked_nothing

DIGITS = PIPELINES / "digits.yaml"
TEACHER_BYTES = 376_000  # the digits teacher's weights (a 32-wide CNN): more than the small file system holds


@contextlib.contextmanager
def tmpfs(path, options: str):
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 256 kB file system: the digits teacher does not fit."""
    with tmpfs(tmp_path / "small-disk", "size=256k") as mount:
        yield mount


def test_a_full_disk_is_one_line_naming_the_entry_and_leaves_nothing(small_disk):
    from kdpipe.atomic import DiskFull, save_torch
    from kdpipe.cache_store import lookup, store, store_json

    cache = small_disk / "cache"
    weights = {"w": torch.zeros(TEACHER_BYTES // 4)}
    writes = {  # torch.save to a path (no errno: torch says "unexpected pos"), to a file by kdpipe, and plain text
        cache / "teachers" / "t.pt": lambda entry: store(entry, lambda tmp: torch.save(weights, tmp)),
        cache / "teacher-outputs" / "o.pt": lambda entry: save_torch(weights, entry),
        cache / "teacher-validate" / "v.json": lambda entry: store_json(entry, list(range(100_000))),
    }
    for entry, write in writes.items():
        with pytest.raises(DiskFull) as caught:
            write(entry)
        assert re.fullmatch(rf"disk full while writing {re.escape(str(entry))} \(0\.\d MB left on "
                            rf"{re.escape(str(small_disk))}\)", str(caught.value)), str(caught.value)
        assert not lookup(entry, pytest.fail) and list(entry.parent.iterdir()) == []  # no entry, no partial file


def test_a_run_whose_cache_disk_fills_ends_in_one_line_and_records_it(workdir, small_disk):
    from mlflow.tracking import MlflowClient

    cache = small_disk / "cache"
    # One teacher epoch: the run ends when the trained teacher is cached, whatever it learnt.
    proc = run_process("run", DIGITS, "--runs-dir", workdir / "runs", "--set", "teacher.train.epochs=1",
                       env={"KDPIPE_CACHE_DIR": str(cache), **ONE_THREAD})
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    said = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: stage 'teacher' failed: DiskFull: disk full while writing {re.escape(str(cache))}"
                        rf"/teachers/\w+\.pt \(0\.\d MB left on {re.escape(str(small_disk))}\)", said), said
    [report_path] = (workdir / "runs").glob("*/*/report.json")  # the run directory is on a disk with room
    report = read_report(str(report_path))
    assert (report["status"], report["failed_stage"]) == ("failed", "teacher")
    assert report["error"] == said.removeprefix("error: ")
    run = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").get_run(report["mlflow"]["run_id"])
    assert run.info.status == "FAILED" and run.data.tags["kdpipe.failed_stage"] == "teacher"
    assert [p for p in cache.rglob("*") if p.is_file()] == []  # no partial entry left to fill the disk


def test_a_read_only_cache_directory_is_refused_before_anything_is_made(workdir, tmp_path):
    with tmpfs(tmp_path / "read-only", "ro,size=64k") as mount:
        cache = mount / "cache"
        env = {"KDPIPE_CACHE_DIR": str(cache)}
        expected = f"KDPIPE_CACHE_DIR: cannot write to the cache directory {cache}: {mount} is not writable\n"
        for command in (("check", DIGITS), ("run", DIGITS, "--runs-dir", workdir / "runs")):
            proc = run_process(*command, env=env)
            assert (proc.returncode, proc.stderr, proc.stdout) == (2, f"{DIGITS}: {expected}", ""), proc.stderr[-3000:]
        assert not (workdir / "runs").exists() and tracked_nothing(workdir)
