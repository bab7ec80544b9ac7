"""Every command the README and the tutorials show in a ```bash block runs here, as written, in a temporary working
directory: `kdpipe` commands as real processes, made fast only by what COMMANDS appends (`--set` overrides, a smaller
`--trials`), a PostgreSQL URL pointed at the throwaway server of tests/test_search_postgres.py, `mlflow ui` started
and asked for its health. A command added to those pages, or changed there, without its row in COMMANDS fails
`test_every_documented_command_has_a_case`, so CI never ships an untested command.

Commands that install are checked rather than run (they would reinstall the environment under test): `bash
scripts/install.sh EXTRAS` (the script exists and every extra named is one of pyproject.toml's), `pip install
'./kdpipe-VERSION-py3-none-any.whl[EXTRAS]'` (the wheel name is the one `python -m build` makes for this version,
with existing extras; tests/test_wheel.py builds and installs that wheel), `bash scripts/test.sh` (the script
exists and `.ci/run` runs exactly that command). `mkdocs build --strict` is built by tests/test_docs.py."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
import tomllib
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import FAST, LENIENT, ONE_THREAD, ROOT, run_process, sets
from servers import free_port
from test_search_postgres import postgres_url  # noqa: F401 - the fixture, for the PostgreSQL worker command

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs" / "tutorials").glob("*.md"))]
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Case:
    """How one documented command line is tested: `extra` is appended to each of its `kdpipe` steps; `setup` names
    a function preparing the working directory (the files the page has the reader make); `postgres`: its
    postgresql:// URL is the test server's."""
    extra: tuple[str, ...] = ()  # for `kdpipe run` and `kdpipe search` steps, and `mlflow ui`
    setup: str | None = None
    postgres: bool = False
    slow: bool = True


QUICK_RUN = (*sets(*FAST, *LENIENT),)

# Each documented command line (its words as the shell splits them, comment left out) -> how it is tested.
COMMANDS: dict[str, Case] = {
    "bash scripts/install.sh && .venv/bin/kdpipe run pipelines/digits.yaml": Case(QUICK_RUN),
    "bash scripts/test.sh": Case(slow=False),
    ".venv/bin/kdpipe run pipelines/digits.yaml --set distill.params.temperature=8 --set distill.method=none "
    "--set distill.params={}": Case(QUICK_RUN),
    "kdpipe run pipelines/digits.yaml --set distill.params.temperature=8 --set distill.method=none "
    "--set distill.params={}": Case(QUICK_RUN),
    "bash scripts/install.sh docs && .venv/bin/mkdocs build --strict": Case(slow=False),
    "pip install ./kdpipe-0.1.0-py3-none-any.whl[cpu] && kdpipe init && kdpipe run pipeline.yaml": Case(QUICK_RUN),
    ".venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db": Case(("--workers", "1")),
    "bash scripts/install.sh vision && .venv/bin/kdpipe run pets.yaml": Case(
        (*sets("distill.epochs=1", "validate.runs=20", "validate.warmup=2", "validate.batch_sizes=[1, 8]",
               "validate.gates.above_chance=null"),), setup="pets_folder"),  # the test's teacher is random: at chance
    "kdpipe run pipelines/digits.yaml --set export.quantize=qat --set export.deliver=best": Case(
        (*QUICK_RUN, *sets("export.qat_epochs=1"))),
    "kdpipe search pipelines/digits-search.yaml --storage study.journal --study digits --trials 10": Case(
        ("--trials", "2", *sets(*FAST, "distill.epochs=2"))),
    "kdpipe search pipelines/digits-search.yaml --storage postgresql://user:pw@db/optuna --trials 10": Case(
        ("--trials", "2", *sets(*FAST, "distill.epochs=2")), postgres=True),
}


def documented() -> dict[str, list[str]]:
    """Every command line of the pages' ```bash blocks (the shell's words, comments left out) -> the pages."""
    found: dict[str, list[str]] = {}
    for page in PAGES:
        for block in re.findall(r"^```bash\n(.*?)^```", page.read_text(), re.S | re.M):
            for line in block.splitlines():
                assert not line.rstrip().endswith("\\"), f"{page}: one command per line, please: {line}"
                words = shlex.split(line, comments=True)
                if words:
                    found.setdefault(" ".join(words), []).append(str(page.relative_to(ROOT)))
    return found


def test_every_documented_command_has_a_case():
    commands = documented()
    assert commands, "no ```bash block found"
    untested = sorted(set(commands) - set(COMMANDS))
    assert not untested, ("documented commands without a row in tests/test_doc_commands.py COMMANDS:\n"
                          + "\n".join(f"{c}  ({', '.join(commands[c])})" for c in untested))
    stale = sorted(set(COMMANDS) - set(commands))
    assert not stale, f"COMMANDS rows no page shows any more: {stale}"


def steps(command: str) -> list[list[str]]:
    """The `&&`-joined steps of a command line, each as words."""
    words, found = command.split(" "), [[]]
    for word in words:
        if word == "&&":
            found.append([])
        else:
            found[-1].append(word)
    return found


def pets_folder(workdir: Path, pages: list[str]) -> None:
    """What the image-folder tutorial has the reader make: pets.yaml (its YAML block), the folder data/pets/
    {train,val,test}/<class>/ of 32×32 RGB images, and the timm teacher's weights teacher.safetensors (random
    here, for the data's 3 classes)."""
    import numpy as np
    import timm
    from PIL import Image
    from safetensors.torch import save_file

    page = (ROOT / "docs" / "tutorials" / "image-folder.md").read_text()
    [pipeline] = [b for b in re.findall(r"^```yaml\n(.*?)^```", page, re.S | re.M) if b.startswith("name: pets")]
    (workdir / "pets.yaml").write_text(pipeline)
    rng = np.random.default_rng(0)
    colours = {"cat": (200, 40, 40), "dog": (40, 200, 40), "owl": (40, 40, 200)}
    for split, count in (("train", 8), ("val", 3), ("test", 3)):
        for name, colour in colours.items():
            folder = workdir / "data" / "pets" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    save_file(timm.create_model("resnet18", num_classes=len(colours)).state_dict(), str(workdir / "teacher.safetensors"))


def check_install_script(words: list[str]) -> None:
    assert (ROOT / "scripts" / "install.sh").is_file()
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for extra in (words[2].split(",") if len(words) > 2 else []):
        assert extra in extras, f"bash scripts/install.sh {words[2]}: pyproject.toml has no extra '{extra}'"


def check_wheel_install(words: list[str]) -> None:
    import kdpipe

    [wheel] = [w for w in words[2:] if ".whl" in w]
    match = re.fullmatch(r"\./kdpipe-(?P<version>[^-]+)-py3-none-any\.whl\[(?P<extras>[a-z,]+)\]", wheel)
    assert match and match["version"] == kdpipe.__version__, f"{wheel}: not the wheel of kdpipe {kdpipe.__version__}"
    check_install_script(["bash", "scripts/install.sh", match["extras"]])


def check_test_script(words: list[str]) -> None:
    assert words == ["bash", "scripts/test.sh"] and (ROOT / "scripts" / "test.sh").is_file()
    assert "\nbash scripts/test.sh\n" in (ROOT / ".ci" / "run").read_text()  # CI runs the README's test command


def serve_mlflow_ui(words: list[str], extra: tuple[str, ...], workdir: Path) -> None:
    """Start the documented `mlflow ui` on a free port and wait for it to answer /health."""
    port = free_port()
    server = subprocess.Popen([str(BIN / "mlflow"), *words[1:], *extra, "--port", str(port)], cwd=workdir,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert server.poll() is None, server.stderr.read()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                    assert answer.status == 200
                    return
            except OSError:
                time.sleep(0.5)
        raise AssertionError("mlflow ui did not answer /health within 120 s")
    finally:
        server.terminate()
        server.wait(timeout=30)


def run_step(words: list[str], case: Case, workdir: Path, storage: str | None) -> None:
    program = words[0].removeprefix(".venv/bin/")
    if words[:2] == ["bash", "scripts/install.sh"]:
        check_install_script(words)
    elif words[:2] == ["bash", "scripts/test.sh"]:
        check_test_script(words)
    elif words[:2] == ["pip", "install"]:
        check_wheel_install(words)
    elif program == "mkdocs":
        assert words[1:] == ["build", "--strict"]  # tests/test_docs.py::test_the_site_builds_strictly builds it
    elif program == "mlflow" and words[1] == "ui":
        serve_mlflow_ui(words, case.extra, workdir)
    elif program == "kdpipe":
        args = [storage if storage and w.startswith("postgresql://") else w for w in words[1:]]
        extra = case.extra if args[0] in ("run", "search") else ()  # `kdpipe init` takes no overrides
        done = run_process(*args, *extra, cwd=workdir, env=ONE_THREAD)
        assert done.returncode == 0, f"{' '.join(words)}: exit {done.returncode}\n{done.stderr[-4000:]}"
    else:
        raise AssertionError(f"no way to test the step '{' '.join(words)}': add one to run_step")


@pytest.mark.parametrize("command", [pytest.param(c, marks=[pytest.mark.slow] if case.slow else [], id=c[:70])
                                     for c, case in COMMANDS.items()])
def test_the_documented_command_runs(command, workdir, request):
    case = COMMANDS[command]
    (workdir / "pipelines").symlink_to(ROOT / "pipelines")  # the commands name the checkout's pipelines/
    if case.setup:
        globals()[case.setup](workdir, documented().get(command, []))
    storage = request.getfixturevalue("postgres_url") if case.postgres else None
    for words in steps(command):
        run_step(words, case, workdir, storage)
