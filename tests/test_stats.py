"""Rg statistics against hand-computed values; formatting; the figure; the rg-stats CLI end to end."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest

from plw_data.rg.stats import (
    QUANTILES,
    RgAccumulator,
    fmt_sig,
    plw_key,
    rg_statistics,
    rich_table,
    to_csv,
    to_json,
    to_markdown,
)

CONTRACT_KEYS = {
    "name", "n", "unit", "arithmetic_mean", "geometric_mean", "median", "ratio_of_sums",
    "fraction_below_1", "quantiles", "mean_prompt", "mean_completion", "skipped",
}  # fmt: skip

# Five examples: one without prompt (skipped), one without completion (Rg = 0).
# Kept Rg: 1/10 = 0.1, 0/4 = 0, 8/2 = 4, 5/5 = 1  ->  sorted [0, 0.1, 1, 4]
PROMPT = np.array([10, 0, 4, 2, 5])
COMPLETION = np.array([1, 3, 0, 8, 5])


@pytest.fixture
def small():
    return rg_statistics(PROMPT, COMPLETION, name="small", plws=(0, 0.1, 1), trim=0.25)


def test_small_sample_hand_computed(small):
    s = small
    assert s["name"] == "small" and s["unit"] == "tokens"
    assert s["n"] == 4
    assert s["skipped"] == {"no_prompt": 1}
    assert s["zero_completion"] == 1
    assert s["arithmetic_mean"] == pytest.approx((0 + 0.1 + 4 + 1) / 4)
    # geometric mean over Rg > 0 only: (0.1 * 4 * 1) ** (1/3)
    assert s["geometric_mean"] == pytest.approx(0.4 ** (1 / 3))
    assert s["median"] == pytest.approx((0.1 + 1) / 2)
    assert s["ratio_of_sums"] == pytest.approx((1 + 0 + 8 + 5) / (10 + 4 + 2 + 5))
    assert s["fraction_below_1"] == pytest.approx(2 / 4)  # 0 and 0.1; Rg = 1 is not below 1
    assert s["mean_prompt"] == pytest.approx(21 / 4)
    assert s["mean_completion"] == pytest.approx(14 / 4)
    assert s["total_prompt"] == 21 and s["total_completion"] == 14
    assert s["min"] == 0.0 and s["max"] == 4.0
    # trim 0.25 of n = 4 drops one value at each end: mean(0.1, 1)
    assert s["trimmed_mean"] == pytest.approx(0.55)


def test_quantiles_linear_interpolation(small):
    # sorted [0, 0.1, 1, 4]; position q * (n - 1)
    q = small["quantiles"]
    assert set(q) == {"p05", "p25", "p75", "p95"}
    assert q["p05"] == pytest.approx(0.1 * 0.15)  # pos 0.15 between 0 and 0.1
    assert q["p25"] == pytest.approx(0.1 * 0.75)  # pos 0.75
    assert q["p75"] == pytest.approx(1 + 3 * 0.25)  # pos 2.25 between 1 and 4
    assert q["p95"] == pytest.approx(1 + 3 * 0.85)  # pos 2.85
    rng = np.random.default_rng(0)
    p, c = rng.integers(1, 500, 1001), rng.integers(0, 300, 1001)
    s = rg_statistics(p, c, name="r")
    rg = c / p
    for key, level in QUANTILES.items():
        assert s["quantiles"][key] == pytest.approx(np.quantile(rg, level))
    assert s["median"] == pytest.approx(np.median(rg))


def test_prompt_share_for_several_plws(small):
    share = small["prompt_share"]
    assert list(share) == ["0", "0.1", "1"]
    assert share["0"] == 0.0
    assert share["0.1"] == pytest.approx(2.1 / (2.1 + 14))
    assert share["1"] == pytest.approx(21 / 35)
    # identity: share(w) = w / (w + ratio_of_sums)
    for w in (0.01, 0.5, 2.0):
        s = rg_statistics(PROMPT, COMPLETION, name="x", plws=[w])
        ros = s["ratio_of_sums"]
        assert s["prompt_share"][plw_key(w)] == pytest.approx(w / (w + ros))


def test_skewed_sample_geometric_far_below_arithmetic():
    # nine RACE-like examples (Rg 0.01) and one long-answer example (Rg 100)
    prompt = np.array([100] * 9 + [1])
    completion = np.array([1] * 9 + [100])
    s = rg_statistics(prompt, completion, name="skewed", trim=0.1)
    assert s["arithmetic_mean"] == pytest.approx((9 * 0.01 + 100) / 10)  # 10.009
    assert s["geometric_mean"] == pytest.approx(10 ** -1.6)  # 0.01**0.9 * 100**0.1
    assert s["median"] == pytest.approx(0.01)
    assert s["ratio_of_sums"] == pytest.approx(109 / 901)
    assert s["fraction_below_1"] == pytest.approx(0.9)
    assert s["arithmetic_mean"] / s["geometric_mean"] > 300
    # trim 0.1 of 10 drops the outlier (and one 0.01)
    assert s["trimmed_mean"] == pytest.approx(0.01)


def test_empty_prompt_everywhere_gives_none_not_nan():
    s = rg_statistics(np.zeros(3, int), np.array([1, 2, 3]), name="empty", plws=[0.1])
    assert s["n"] == 0
    assert s["skipped"] == {"no_prompt": 3}
    assert s["arithmetic_mean"] is None and s["geometric_mean"] is None
    assert s["quantiles"] == dict.fromkeys(QUANTILES)
    assert s["prompt_share"] == {"0.1": None}
    json.dumps(to_json([s]), allow_nan=False)


def test_all_completions_empty():
    s = rg_statistics(np.array([5, 7]), np.array([0, 0]), name="z")
    assert s["n"] == 2 and s["zero_completion"] == 2
    assert s["arithmetic_mean"] == 0.0 and s["median"] == 0.0 and s["ratio_of_sums"] == 0.0
    assert s["geometric_mean"] is None  # undefined over no positive Rg
    assert s["fraction_below_1"] == 1.0


def test_accumulator_batches_equal_one_call_and_merge_skips():
    rng = np.random.default_rng(1)
    p = rng.integers(0, 50, 5000)
    c = rng.integers(0, 80, 5000)
    t = np.minimum(p, 3)
    acc = RgAccumulator()
    for lo in range(0, 5000, 777):
        acc.update(p[lo : lo + 777], c[lo : lo + 777], template=t[lo : lo + 777])
    acc.skip("too_long", 2)
    batched = acc.result(name="d", plws=(0.1,), skipped={"too_long": 1, "empty_completion": 4})
    whole = rg_statistics(p, c, name="d", plws=(0.1,), template=t, skipped={"too_long": 3, "empty_completion": 4})
    assert batched == whole
    assert batched["skipped"] == {"empty_completion": 4, "no_prompt": int((p == 0).sum()), "too_long": 3}
    assert batched["mean_template"] == pytest.approx(t[p > 0].sum() / (p > 0).sum())
    values = acc.values()
    assert values.dtype == np.float64 and values.size == batched["n"]
    assert np.all(np.diff(values) >= 0)


@pytest.mark.parametrize(
    "prompt, completion, message",
    [([1, 2], [1], "differ in length"), ([1, -1], [1, 1], ">= 0"), ([[1]], [[1]], "1-D")],
)
def test_bad_counts_raise(prompt, completion, message):
    with pytest.raises(ValueError, match=message):
        rg_statistics(np.array(prompt), np.array(completion), name="bad")


def test_trim_out_of_range():
    with pytest.raises(ValueError, match="trim"):
        rg_statistics(PROMPT, COMPLETION, name="x", trim=0.5)


def test_json_has_contract_keys(small):
    doc = json.loads(json.dumps(to_json([small]), allow_nan=False))
    assert list(doc) == ["datasets"]
    (d,) = doc["datasets"]
    assert CONTRACT_KEYS <= set(d)
    assert set(d["quantiles"]) == {"p05", "p25", "p75", "p95"}
    assert isinstance(d["n"], int) and isinstance(d["skipped"], dict)


def test_csv_round_trip(small):
    other = rg_statistics(np.array([3, 3]), np.array([3, 6]), name="other", plws=(0.1,))
    rows = list(csv.DictReader(io.StringIO(to_csv([small, other]))))
    assert [r["name"] for r in rows] == ["small", "other"]
    assert float(rows[0]["geometric_mean"]) == pytest.approx(small["geometric_mean"])
    assert float(rows[0]["p95"]) == pytest.approx(small["quantiles"]["p95"])
    assert rows[0]["skipped"] == "no_prompt: 1" and rows[1]["skipped"] == "0"
    assert float(rows[0]["prompt_share_1"]) == pytest.approx(0.6)
    assert rows[1]["prompt_share_1"] == ""  # not asked for that dataset
    assert float(rows[1]["arithmetic_mean"]) == pytest.approx(1.5)


def test_markdown_and_terminal_tables(small):
    md = to_markdown([small]).splitlines()
    assert len(md) == 3
    header = [c.strip() for c in md[0].strip("|").split("|")]
    assert header[:11] == [
        "dataset", "n", "mean prompt", "mean completion", "arithmetic mean", "geometric mean",
        "median", "ratio of sums", "p05", "p95", "fraction < 1",
    ]  # fmt: skip
    assert header[11:14] == ["prompt share @PLW=0", "prompt share @PLW=0.1", "prompt share @PLW=1"]
    cells = [c.strip() for c in md[2].strip("|").split("|")]
    assert len(cells) == len(header) == md[1].count("|") - 1
    assert cells[0] == "small" and cells[5] == "0.737" and cells[10] == "0.500"
    from rich.console import Console

    console = Console(record=True, width=250)
    console.print(rich_table([small]))
    text = console.export_text()
    assert "small" in text and "0.737" in text and "no_prompt: 1" in text


@pytest.mark.parametrize("x, text", [(0.002314, "0.00231"), (7.6249, "7.62"), (440.4, "440"), (12345.6, "12,346"), (0, "0"), (None, "–")])
def test_fmt_sig(x, text):
    assert fmt_sig(x) == text


def test_plot_writes_png_with_two_axes_per_dataset(tmp_path):
    from plw_data.rg.plot import plot_rg

    rng = np.random.default_rng(0)
    data = [
        ("alpaca-like", rng.lognormal(0.5, 1.0, 500)),
        ("race-like", np.r_[0.0, rng.lognormal(math.log(0.004), 0.3, 500)]),
        ("constant", np.full(5, 0.5)),
    ]
    out = tmp_path / "sub" / "rg.png"
    fig = plot_rg(data, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes) == 2 * len(data)
    assert fig.axes[0].get_xscale() == "linear"
    assert fig.axes[len(data)].get_xscale() == "log"  # second row: log x
    wrapped = plot_rg(data, tmp_path / "wrapped.png", max_columns=2)  # 3 datasets: 2 bands of 2 columns
    assert len(wrapped.axes) == 2 * 3  # the empty slot of the last band is removed
    assert sum(ax.get_xscale() == "log" for ax in wrapped.axes) == 3
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert any(lab.startswith("arithmetic mean") for lab in labels)
    assert any(lab.startswith("geometric mean") for lab in labels)


# ---------------------------------------------------------------------------------------------
# The rg-stats command (registered here on a local app; cli/main.py registers the same function)


def _app():
    import typer

    from plw_data.cli.rg_stats import rg_stats

    app = typer.Typer()
    app.command("rg-stats")(rg_stats)
    app.callback()(lambda: None)  # keep the sub-command name, as in plw-data
    return app


def _invoke(*args: str):
    from typer.testing import CliRunner

    return CliRunner().invoke(_app(), ["rg-stats", *map(str, args)])


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_cli_words_hand_computed(tmp_path):
    rows = [
        {"q": "one two three four", "a": "yes"},  # 1/4
        {"q": "a b", "a": "c d e f"},  # 4/2
        {"q": "x", "a": "   "},  # empty completion: dropped by the converter
        {"a": "no question"},  # missing field
        {"q": "p q r s t u v w", "a": "z"},  # the 5th row: beyond --limit 4
    ]
    data = _write_jsonl(tmp_path / "toy.jsonl", rows)
    out = tmp_path / "stats.json"
    md, csv_path = tmp_path / "t.md", tmp_path / "t.csv"
    result = _invoke(
        f"toy={data}", "--unit", "words", "--prompt-template", "{q}", "--completion-template", "{a}",
        "--plw", "0.5", "--json", out, "--markdown", md, "--csv", csv_path, "--limit", "4", "-q",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (d,) = json.loads(out.read_text())["datasets"]
    assert CONTRACT_KEYS <= set(d)
    assert d["name"] == "toy" and d["unit"] == "words" and d["n"] == 2
    assert d["skipped"] == {"empty_completion": 1, "missing_field": 1}
    assert d["arithmetic_mean"] == pytest.approx((0.25 + 2) / 2)
    assert d["geometric_mean"] == pytest.approx(math.sqrt(0.25 * 2))
    assert d["ratio_of_sums"] == pytest.approx(5 / 6)
    assert d["prompt_share"]["0.5"] == pytest.approx(3 / (3 + 5))
    assert md.read_text().startswith("| dataset |") and "toy" in md.read_text()
    assert next(csv.DictReader(io.StringIO(csv_path.read_text())))["n"] == "2"


def test_cli_chars_and_default_name(tmp_path):
    data = _write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "abcd", "completion": "ab"}])
    out = tmp_path / "s.json"
    result = _invoke(data, "--unit", "chars", "--json", out)
    assert result.exit_code == 0, result.output
    (d,) = json.loads(out.read_text())["datasets"]
    assert d["name"] == "pairs" and d["arithmetic_mean"] == pytest.approx(0.5)
    assert "pairs" in result.output  # the terminal table


def test_cli_errors_are_one_clear_line(tmp_path):
    data = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "completion": "c"}, {"prompt": "p"}])
    cases = [
        ((tmp_path / "missing.jsonl",), "missing.jsonl: input not found"),
        ((data,), "--tokenizer is required"),
        ((data, "--unit", "bytes"), "--unit must be one of"),
        ((data, "--unit", "words", "--plw", "0.1,x"), "--plw must be"),
        ((data, "--unit", "words", "--on-error", "fail"), "bad.jsonl: line 2, field 'completion': missing_field"),
        ((tmp_path, "--unit", "words"), "not a prepared one"),
    ]
    for args, message in cases:
        result = _invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, result.stderr)


def test_parse_dataset_names():
    from plw_data.rg.measure import parse_dataset

    assert parse_dataset("race/dev.jsonl.gz").name == "dev"
    spec = parse_dataset("RACE dev=race/dev.jsonl.gz")
    assert (spec.name, spec.path) == ("RACE dev", "race/dev.jsonl.gz")
    assert parse_dataset("prepared/out").name == "out"


LLAMA2 = "llama-2-chat"


def _race_slice(tmp_path, n: int):
    """The first n rows of RACE dev as a temporary JSONL (never written into the repo)."""
    import gzip

    from conftest import require_shared

    src = require_shared("race/dev.jsonl.gz")
    with gzip.open(src, "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(n)]
    path = tmp_path / "race_dev_slice.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def test_cli_race_dev_llama2_end_to_end(tmp_path):
    """RACE (answer = one letter after a ~500-token passage): Rg ~ 0.004-0.006 in Llama-2-chat tokens."""
    from conftest import REPO, require_shared

    race = require_shared("race/dev.jsonl.gz")
    tok = require_shared(f"tokenizers/{LLAMA2}")
    out, png = tmp_path / "race.json", tmp_path / "race.png"
    result = _invoke(
        f"RACE dev={race}", "--tokenizer", tok, "--recipe", REPO / "recipes" / "race.yaml",
        "--limit", "200", "--json", out, "--plot", png, "-q",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (d,) = json.loads(out.read_text())["datasets"]
    assert d["n"] == 200 and d["skipped"] == {}
    assert 0.004 <= d["arithmetic_mean"] <= 0.006
    assert d["geometric_mean"] <= d["arithmetic_mean"]
    # completion = the answer letter + </s>; the prompt carries [INST] ... [/INST] template tokens
    assert d["mean_completion"] == pytest.approx(2.0)
    assert 0 < d["mean_template"] < 20
    assert d["prompt_share"]["1"] > 0.99
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_prepared_dir_matches_raw(tmp_path):
    """The counts read back from a prepared (packed) DIR's masks equal those of rendering the raw rows."""
    from conftest import REPO, require_shared

    from plw_data.config import DataConfig, build_config, load_recipe
    from plw_data.prepare.pipeline import prepare

    tok = str(require_shared(f"tokenizers/{LLAMA2}"))
    data = _race_slice(tmp_path, 60)
    bad = {**json.loads(data.read_text().splitlines()[0]), "answer": " "}
    data.write_text(data.read_text() + json.dumps(bad) + "\n")  # row 60: dropped by both paths
    recipe = REPO / "recipes" / "race.yaml"
    cfg = build_config(DataConfig, load_recipe(recipe), {"tokenizer": tok, "max_length": 1024})
    prepare([str(data)], cfg, tmp_path / "prepared", progress=False)
    raw_json, dir_json = tmp_path / "raw.json", tmp_path / "dir.json"
    common = ("--tokenizer", tok, "--recipe", recipe, "--max-length", "1024", "-q")
    assert _invoke(f"x={data}", *common, "--json", raw_json).exit_code == 0
    result = _invoke(f"x={tmp_path / 'prepared'}", "-q", "--json", dir_json)
    assert result.exit_code == 0, result.output
    (raw,) = json.loads(raw_json.read_text())["datasets"]
    (prepared,) = json.loads(dir_json.read_text())["datasets"]
    assert raw["n"] == 60 and raw["skipped"] == {"empty_completion": 1}
    assert prepared == raw
    limited = tmp_path / "limited.json"
    assert _invoke(f"x={tmp_path / 'prepared'}", "-q", "--limit", "7", "--json", limited).exit_code == 0
    assert json.loads(limited.read_text())["datasets"][0]["n"] == 7
