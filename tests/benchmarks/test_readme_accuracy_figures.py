"""The README's "What to expect" table of the accuracy benchmark is what ``--summarize`` reads from
the kept runs in ``benchmarks/results/``: a README figure names the command that produces it, and
this test runs that command on every row."""

from __future__ import annotations

import re

import pytest
from paths import ROOT, load_benchmark

#: One row: worlds, the kept results files (relative to benchmarks/results/; several joined by " + "
#: when the worlds came from more than one run), an optional ``--summarize-matching`` value, the
#: targets met and their total, the mean Bag rescaled R^2.
ROW = re.compile(r"^\| (\d{3}-\d{3}) \| (`[\w/.]+\.json`(?: \+ `[\w/.]+\.json`)*)"
                 r"(?: \(`--summarize-matching (\w+)`\))? \| (\d+) of (\d+) \| (0\.\d{4}) \|")


def expectation_rows() -> list[tuple[str, str, str, int, int, str]]:
    """The rows of the README table that follows "**What to expect**"."""
    text = (ROOT / "README.md").read_text()
    start = text.index("**What to expect**")
    table = text[start:text.index("\n\n", text.index("\n|", start))]
    body = [line for line in table.splitlines() if line.startswith("|")][2:]  # past the header and |---|
    rows = [ROW.match(line) for line in body]
    assert rows and all(rows), f"a row of the README's What to expect table is not in the expected form:\n{table}"
    return [(m[1], m[2], m[3] or "run", int(m[4]), int(m[5]), m[6]) for m in rows if m]


def test_the_table_has_rows_of_three_worlds_each() -> None:
    """The table has at least three rows, each a group of three worlds (15 targets)."""
    rows = expectation_rows()
    assert len(rows) >= 3
    assert all(total == 15 for *_, total, _ in rows)


@pytest.mark.parametrize("row", expectation_rows(), ids=lambda r: r[0])
def test_each_row_is_what_summarize_reads_from_its_file(row, capsys) -> None:
    worlds, names, matching, met, total, mean = row
    paths = [ROOT / "benchmarks" / "results" / name.strip("`") for name in names.split(" + ")]
    for path in paths:
        assert path.exists(), f"the README names {path}, which is not kept"
    bench = load_benchmark("bench_accuracy")
    assert bench.main(["--summarize", *map(str, paths), "--summarize-matching", matching]) == []
    out = capsys.readouterr().out
    seeds = sorted(int(line.split("|")[2]) for line in out.splitlines()
                   if any(line.startswith(f"| {path} |") for path in paths))
    first, last = (int(w) for w in worlds.split("-"))
    assert seeds == list(range(first, last + 1))
    assert f"{met} of {total} targets on {len(seeds)} worlds; mean Bag rescaled R^2 {mean}" in out
