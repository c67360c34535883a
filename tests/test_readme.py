"""The README says what the defaults are: the demo tasks a server allows, and every
setting with its default value."""

from __future__ import annotations

import re

import httpx

from jobwire.settings import ENV_PREFIX, Settings
from tests.support import ROOT, run_server

README = (ROOT / "README.md").read_text()


def _section(heading: str) -> str:
    start = README.index(heading)
    end = README.find("\n## ", start + len(heading))
    return README[start : end if end != -1 else None]


def _first_column(table_after: str, text: str) -> list[str]:
    """The backticked names in the first column of the table that follows `table_after`."""
    lines = text[text.index(table_after) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    names = []
    for line in lines[start + 2 :]:  # past the header and its rule
        if not line.startswith("|"):
            break
        names.append(line.split("|")[1].strip().strip("`"))
    return names


async def test_the_readme_lists_the_demo_tasks_the_server_allows(settings: Settings) -> None:
    readme = _first_column("Demo tasks (", _section("## Reporting progress from a task"))
    async with run_server(settings) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        served = [t["name"] for t in (await http.get("/api/v1/tasks")).json()["tasks"]]
    assert sorted(readme) == sorted(served)


def _default(value: object) -> str | None:
    """A default as the README writes it (None: nothing to compare, e.g. unset)."""
    if isinstance(value, bool) or value in (None, "", ()):
        return None
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_the_configuration_table_names_every_setting_and_its_default() -> None:
    """Every `JOBWIRE_*` setting has a row (`JOBWIRE_S3_BUCKET`, `_PREFIX` names two), and
    the row's default column shows its default."""
    fields = {ENV_PREFIX + name.upper(): field.default for name, field in Settings.model_fields.items()}
    rows: dict[str, str] = {}
    for line in _section("## Configuration").splitlines():
        if not line.startswith("| `"):
            continue  # prose, the header, the rule
        cells = [c.strip() for c in line.split("|")[1:-1]]
        names = re.findall(r"`(JOBWIRE_[A-Z0-9_]+|_[A-Z0-9_]+)`", cells[0])
        if not names:  # HOST, PORT
            continue
        first = names[0].split("_")
        for name in names:
            if name.startswith("_"):  # a suffix: the first name's head with this tail
                name = next(
                    (h + name for k in range(len(first)) if (h := "_".join(first[:k])) + name in fields),
                    name,
                )
            rows[name] = cells[1]
    assert sorted(set(fields) - set(rows)) == []
    wrong = {
        name: (default, rows[name])
        for name, value in fields.items()
        if (default := _default(value)) is not None and f"`{default}`" not in rows[name]
    }
    assert wrong == {}
