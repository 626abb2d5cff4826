"""The tables of docs/results.md are what the committed per-run data in docs/data gives: each cell's
mean ± std (sample std, as the benchmarks print it) is recomputed here from the runs, or, for the
protocol tables, printed from them by their own command, so a table cannot drift from its data,
nor quote runs that are not committed."""

from __future__ import annotations

import csv
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
T975 = {3: 4.303, 5: 2.776}  # Student's t at 97.5% for n - 1 degrees of freedom


def runs(name: str) -> list[dict[str, str]]:
    with (DOCS / "data" / name).open() as f:
        return list(csv.DictReader(f))


def tables(caption: str) -> list[list[list[str]]]:
    """The markdown tables from the paragraph that starts with ``caption`` to the next table caption
    or section: each a list of rows of cells (bold marks removed, the alignment row skipped)."""
    text = (DOCS / "results.md").read_text()
    assert text.count(caption) == 1, caption
    rest = text[text.index(caption) + len(caption):]
    ends = [i for i in (rest.find("\n**Table"), rest.find("\n## ")) if i >= 0]
    return markdown_tables(rest[:min(ends, default=len(rest))])


def markdown_tables(text: str) -> list[list[list[str]]]:
    """The markdown tables in ``text``, as :func:`tables` gives them."""
    found: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.replace("**", "").strip() for c in line.strip().strip("|").split("|")]
            if not set("".join(cells)) <= set("-: "):
                current.append(cells)
        elif current:
            found.append(current)
            current = []
    return found


def accuracies(rows: list[dict[str, str]], seeds: int, key: str = "test_acc", **match: object) -> list[float]:
    """The accuracies of the runs whose columns equal ``match`` (numbers compared as numbers); there
    must be ``seeds`` of them."""
    def equal(value: str, wanted: object) -> bool:
        # (a grid value computed as a product, γ·η, may differ from its printed form in the last bit)
        return math.isclose(float(value), wanted, rel_tol=1e-9) if isinstance(wanted, (int, float)) \
            else value == wanted

    picked = [float(r[key]) for r in rows if all(equal(r[k], v) for k, v in match.items())]
    assert len(picked) == seeds, (match, len(picked))
    return picked


def summary(accs: list[float]) -> str:
    return f"{statistics.mean(accs):.1%} ± {statistics.stdev(accs):.1%}"


def grid_rows(table: list[list[str]]) -> list[tuple[str, list[tuple[float, str]]]]:
    """A table whose header row holds grid values: each body row's label with its (value, cell) pairs."""
    header, *body = table
    return [(row[0], [(float(v), cell) for v, cell in zip(header[1:], row[1:]) if v]) for row in body]


def test_table_1_and_3_are_batch_csv():
    data = runs("batch.csv")
    (table1,) = tables("**Table 1.**")
    methods = table1[0][1:-1]
    assert methods == ["SGD", "SGD + warm-up", "Nesterov + warm-up, tuned", "LARS", "LARS + warm-up"]
    for row in table1[1:]:
        batch = int(row[0])
        for method, cell in zip(methods, row[1:-1]):
            assert cell == summary(accuracies(data, 3, method=method, batch_size=batch)), (batch, method)
        tuned = {float(r["lr"]) for r in data if r["method"] == methods[2] and int(r["batch_size"]) == batch}
        assert tuned == {float(row[-1])}
    (table3,) = tables("**Table 3.**")
    columns = {"neither (SGD)": "SGD", "warm-up alone": "SGD + warm-up", "LARS alone": "LARS", "both": "LARS + warm-up"}
    assert table3[0][1:] == list(columns)
    for row in table3[1:]:
        for method, cell in zip(columns.values(), row[1:]):
            assert cell == summary(accuracies(data, 3, method=method, batch_size=int(row[0])))


def test_table_2_is_eta_csv():
    data = runs("eta.csv")
    found = tables("**Table 2.**")[:4]  # (a fifth summarises them)
    assert [t[0][0] for t in found] == ["η", "γ·η", "η", "γ·η"]
    for table, (batch, sweep) in zip(found, [(1024, "eta"), (1024, "gamma"), (8192, "eta"), (8192, "gamma")]):
        ((_, cells),) = grid_rows(table)
        for value, cell in cells:
            grid = {"eta": value} if sweep == "eta" else {"gamma_eta": value}
            accs = accuracies(data, 3, key="val_acc", batch_size=batch, sweep=sweep, **grid)
            assert cell == summary(accs), (batch, sweep, value)


def test_table_4_is_finetune_csv():
    data = runs("finetune.csv")
    adamw, lars = tables("**Table 4.**")
    assert adamw[0][0] == "AdamW lr" and lars[0][0] == "LARS γ·η"
    for label, cells in grid_rows(adamw):
        for value, cell in cells:
            assert cell == summary(accuracies(data, 3, method="AdamW", value=value)), value
    methods = {"LARS": "LARS", "LARS + layer decay 0.8": "LARS + layer decay"}  # the table's label: the CSV's
    assert [label for label, _ in grid_rows(lars)] == list(methods)
    for label, cells in grid_rows(lars):
        method = methods[label]
        for value, cell in cells:
            assert cell == summary(accuracies(data, 3, method=method, value=value)), (method, value)


def test_table_6_is_finetune_head_csv():
    (table,) = tables("**Table 6.")
    ((label, cells),) = grid_rows(table)
    assert label == "LARS, head not adapted"
    for value, cell in cells:
        assert cell == summary(accuracies(runs("finetune_head.csv"), 3, method=label, value=value)), value


def test_table_8_is_finetune_lamb_csv_beside_table_4s_runs():
    """LAMB's runs are in finetune_lamb.csv; AdamW's and LARS's are table 4's (finetune.csv)."""
    adamw, lamb, lars = tables("**Table 8.")
    for table, method, data in ((adamw, "AdamW", runs("finetune.csv")), (lamb, "LAMB", runs("finetune_lamb.csv")),
                                (lars, "LARS", runs("finetune.csv"))):
        assert table[0][0].split()[0] == method
        ((_, cells),) = grid_rows(table)
        for value, cell in cells:
            assert cell == summary(accuracies(data, 3, method=method, value=value)), (method, value)


def test_table_7_is_ranger_csv():
    data, tuning = runs("ranger.csv"), runs("ranger_tuning.csv")
    final, ranger_grid, lars_ranger_grid = tables("**Table 7.**")
    methods = {"Ranger, tuned": "Ranger", "LARS + Ranger, tuned": "LARS + Ranger", "LARS (rule)": "LARS",
               "Nesterov + warm-up, tuned": "Nesterov + warm-up, tuned"}
    assert final[0][1:] == list(methods)
    for row in final[1:]:
        batch = int(row[0])
        for method, cell in zip(methods.values(), row[1:]):
            picked = [r for r in data if r["method"] == method and int(r["batch_size"]) == batch]
            assert cell.startswith(summary(accuracies(picked, 3))), (batch, method)
            lr, coefficient = float(picked[0]["lr"]), float(picked[0]["trust_coefficient"] or 1)
            setting = {"Ranger": f"lr {lr:g}", "LARS + Ranger": f"γ·η {lr * coefficient:g}",
                       "LARS": "", "Nesterov + warm-up, tuned": f"lr {lr:g}"}[method]
            assert cell.endswith(f"({setting})" if setting else "%"), (batch, method)
    for table, method in ((ranger_grid, "Ranger"), (lars_ranger_grid, "LARS + Ranger")):
        ((_, cells),) = grid_rows(table)
        for value, cell in cells:
            (acc,) = accuracies(tuning, 1, key="val_acc", method=method, batch_size=8192, value=value)
            assert cell == f"{acc:.1%}", (method, value)


def test_table_9_is_lamb_final_csv():
    data = runs("lamb_final.csv")
    (table,) = tables("**Table 9.**")
    assert table[0][2:] == ["AdamW", "LAMB", "LARS"]
    for row in table[1:]:
        for method, cell in zip(table[0][2:], row[2:]):
            accs = accuracies(data, 5, method=method, batch_size=int(row[0]))
            half = T975[5] * statistics.stdev(accs) / math.sqrt(5)
            assert cell.startswith(f"{summary(accs)} [{100 * half:.1f}]"), (row[0], method)


def numbers(row: list[str]) -> list[float]:
    """Every number in a row's cells, in order ("1,024" is one number; words and signs of % dropped)."""
    return [float(x) for cell in row for x in re.findall(r"[-+]?\d*\.?\d+(?:e[-+]?\d+)?", cell.replace(",", ""))]


@pytest.mark.parametrize("captions, command", [
    (["**Table 12, validation.**", "**Table 12, test.**"],
     ["finetune.py", "protocol", "--from-csv", "docs/data/finetune_protocol"]),
    (["**Table 10.**"], ["large_batch.py", "protocol", "--from-csv", "docs/data/protocol_5ep"]),
    (["**Table 11.**"], ["large_batch.py", "protocol", "--from-csv", "docs/data/protocol_20ep"]),
], ids=["table 12", "table 10", "table 11"])
def test_tables_10_to_12_are_what_their_commands_print_from_their_csvs(captions, command):
    """The protocol commands print their tables again from the committed CSVs (``--from-csv``); the
    tables here hold the same numbers, row by row (the docs write settings more briefly and leave out
    the count of diverged runs, which is 0 throughout)."""
    if command[0] == "finetune.py":
        pytest.importorskip("transformers")
    root = DOCS.parent
    printed = subprocess.run([sys.executable, str(root / "benchmarks" / command[0]), *command[1:]], cwd=root,
                             capture_output=True, text=True, timeout=300, check=True).stdout
    assert re.findall(r"div (\d+)/", printed) == ["0"] * len(re.findall("div ", printed))  # no diverged runs
    printed = re.sub(r"; div \d+/\d+", "", printed)
    ours = [t for caption in captions for t in tables(caption)]
    theirs = markdown_tables(printed)[-len(ours):]
    assert len(ours) == len(theirs) > 0
    for mine, printed_table in zip(ours, theirs):
        assert sorted(numbers(row) for row in mine) == sorted(numbers(row) for row in printed_table)


def signed(points: float, decimals: int) -> str:
    return f"{points:+.{decimals}f}".replace("-", "−")


@pytest.mark.parametrize("caption, name, decimals", [("**Table 13.**", "precision.csv", 2),
                                                     ("**Table 14.**", "finetune_precision.csv", 1)])
def test_tables_13_and_14_are_their_precision_csvs(caption, name, decimals):
    """Each state's accuracy, and each seed's difference from its float32 run in points (table 13
    with two decimals and the 95% interval, table 14 with one and the mean training loss)."""
    data = runs(name)
    (table,) = tables(caption)
    assert table[0][:4] == ["method", "state", "accuracy", "per-seed difference from float32"]
    for method, state, accuracy, differences, *loss in table[1:]:
        mine = [r for r in data if r["method"] == method and r["state_precision"] == state]
        accs = [float(r["test_acc"]) for r in mine]
        assert len(accs) == 3
        mean, std = statistics.mean(accs), statistics.stdev(accs)
        if decimals == 2:
            assert accuracy == f"{mean:.2%} ± {std:.2%} [± {T975[3] * std / math.sqrt(3):.2%}]", (method, state)
        else:
            assert accuracy == f"{mean:.1%} ± {std:.1%}", (method, state)
            assert loss == [f"{statistics.mean(float(r['train_loss']) for r in mine):.4f}"], (method, state)
        base = {r["seed"]: float(r["test_acc"]) for r in data
                if r["method"] == method and r["state_precision"] == "float32"}
        expected = ", ".join(signed(100 * (float(r["test_acc"]) - base[r["seed"]]), decimals) for r in mine)
        assert differences == ("—" if state == "float32" else expected), (method, state)


@pytest.mark.parametrize("name", sorted(p.name for p in (DOCS / "data").glob("*.csv")))
def test_every_data_file_is_linked_from_the_results(name):
    assert f"(data/{name})" in (DOCS / "results.md").read_text()
