"""Print pip constraints that pin every dependency at its lower bound in pyproject.toml (`name>=X` → `name==X`):
the project's dependencies and those of the extras named on the command line. CI's lower-bound environment installs
with them, so the bounds written are the bounds tested.  Usage: python scripts/lower_bounds.py [extra ...]"""

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
requirements = project["dependencies"] + [r for extra in sys.argv[1:] for r in project["optional-dependencies"][extra]]
for requirement in requirements:
    found = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^]]*\])?>=([0-9][0-9.]*)", requirement.replace(" ", ""))
    if found:  # constraints take no extras: psycopg[binary]>=3.3 → psycopg==3.3
        print(f"{found[1]}=={found[3]}")
