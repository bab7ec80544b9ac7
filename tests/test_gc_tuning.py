"""kdpipe.gc_tuning: what a run imports is frozen out of Python's cyclic collections (and out of the interpreter's
teardown), the collector is left as the run found it, and KDPIPE_GC_FREEZE=0 turns it off. What it saves is
measured by benchmarks/startup.py, not here."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

from conftest import FAST, LENIENT, PIPELINES, cli, sets

PROBE = """
import gc, json, sys
from kdpipe import gc_tuning
seen = {"before": gc.get_freeze_count()}
with gc_tuning.imports_uncollected():
    seen["enabled_within"] = gc.isenabled()
    import xml.dom.minidom, email.mime.multipart  # modules nothing here imported before
seen["after"], seen["enabled_after"] = gc.get_freeze_count(), gc.isenabled()
gc.disable()
with gc_tuning.imports_uncollected():
    import json.tool
seen["still_disabled"] = not gc.isenabled()
gc.enable()
with gc_tuning.frozen_while_running():
    seen["while_running"] = gc.get_freeze_count()
seen["left"] = gc.get_freeze_count()
print(json.dumps(seen))
"""


def probe(env: dict[str, str] | None = None) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout)


def test_imports_within_are_frozen_and_the_collector_is_left_as_found():
    seen = probe()
    assert seen["before"] == 0 and not seen["enabled_within"] and seen["enabled_after"]
    assert seen["after"] > 1000  # every object alive, the new modules' included
    assert seen["still_disabled"]  # a collector the caller disabled stays disabled
    assert seen["while_running"] >= seen["after"] and seen["left"] == 0


def test_kdpipe_gc_freeze_0_leaves_the_collector_alone():
    seen = probe({**os.environ, "KDPIPE_GC_FREEZE": "0"})
    assert seen["after"] == seen["while_running"] == seen["left"] == 0 and seen["enabled_after"]


def test_a_run_keeps_its_imports_out_of_its_collections_and_leaves_nothing_frozen(workdir):
    frozen_at_collections = []

    def record(phase, info):
        if phase == "start":  # any generation: a full one may not come at all in a process that imported all before
            frozen_at_collections.append(gc.get_freeze_count())

    gc.callbacks.append(record)
    try:
        result = cli("run", PIPELINES / "digits.yaml", *sets(*FAST, *LENIENT))
    finally:
        gc.callbacks.remove(record)
    assert result.exit_code == 0, result.output
    # torch, torch._dynamo, MLflow and the ONNX exporter: millions of objects no collection scans again, from the
    # command's start (a few collections before, while typer parses the command line, and after its end see none)
    frozen = [count for count in frozen_at_collections if count > 500_000]
    assert len(frozen) > 10 and len(frozen) > 0.9 * len(frozen_at_collections), frozen_at_collections
    assert gc.get_freeze_count() == 0 and gc.isenabled()


def test_the_cli_process_exits_without_collecting_what_is_alive():
    code = ("import atexit, gc, sys\nfrom kdpipe.cli import main\n"
            "atexit.register(lambda: print('frozen at exit', gc.get_freeze_count()))\n"
            "sys.argv = ['kdpipe', '--version']\nmain()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split("frozen at exit")[1]) > 1000
