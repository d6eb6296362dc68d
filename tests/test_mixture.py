"""Mixtures: the mixture file, the share rules (pure functions), `prepare --mix` end to end, and a
PLW per source in plw-train and rg-stats."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, require_shared, tokenizer_dir

from plw_data import schema as S
from plw_data.config import DataConfig, build_config
from plw_data.errors import ConfigError
from plw_data.prepare.mixture import (
    Mixture,
    Share,
    Source,
    parse_mixture,
    plan_mixture,
    take_rows,
    take_tokens,
)

RACE_TEMPLATE = "Context:{article}\nQuestion:{question}\nOptions:{options}"


# -- share rules (pure) ----------------------------------------------------------------------------


def _mix(*shares: Share, unit: str = "rows", total: int | None = None) -> Mixture:
    return Mixture("m.yaml", tuple(Source(f"s{k}", ("x.jsonl",), s) for k, s in enumerate(shares)), unit, total)  # type: ignore[arg-type]


@pytest.mark.parametrize("n_pool,n", [(10, 0), (10, 3), (10, 10), (10, 23), (7, 70)])
def test_take_rows_is_whole_copies_then_a_sample_without_replacement(n_pool: int, n: int) -> None:
    t = take_rows(n_pool, n, np.random.default_rng(1))
    assert t.rows == n and (t.copies, t.sampled) == divmod(n, n_pool)
    times = np.bincount(t.members, minlength=n_pool)
    assert set(times.tolist()) <= {t.copies, t.copies + 1} and int((times == t.copies + 1).sum()) == t.sampled
    again = take_rows(n_pool, n, np.random.default_rng(1))
    assert np.array_equal(t.members, again.members)


def test_take_rows_depends_on_the_seed() -> None:
    a = take_rows(1000, 100, np.random.default_rng(1)).members
    b = take_rows(1000, 100, np.random.default_rng(2)).members
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("n_tokens", [0, 1, 57, 500, 1234, 5000])
def test_take_tokens_never_exceeds_and_is_short_by_less_than_the_next_example(n_tokens: int) -> None:
    lengths = np.random.default_rng(0).integers(1, 40, 37)
    t = take_tokens(lengths, n_tokens, np.random.default_rng(5))
    got = int(lengths[t.members].sum())
    assert got <= n_tokens
    assert t.copies == n_tokens // int(lengths.sum())
    perm = np.random.default_rng(5).permutation(len(lengths))
    if t.sampled < len(lengths):  # the next example of the seeded order would not have fitted
        assert got + lengths[perm[t.sampled]] > n_tokens
    assert np.array_equal(np.sort(perm[: t.sampled]), np.unique(t.members[np.bincount(t.members)[t.members] > t.copies]))


def test_fraction_of_rows_with_other_sources() -> None:
    pools = [np.full(100, 10), np.full(50, 10), np.full(30, 10)]
    takes = plan_mixture(_mix(Share("rows", 60), Share("rows", 20), Share("fraction", 0.2)), pools, seed=0)
    assert [t.rows for t in takes] == [60, 20, 20]  # 0.2 * (60 + 20) / 0.8


def test_fractions_only_take_the_largest_mixture_without_repeats() -> None:
    pools = [np.full(100, 1), np.full(50, 1), np.full(300, 1)]
    takes = plan_mixture(_mix(Share("fraction", 0.5), Share("fraction", 0.25), Share("fraction", 0.25)), pools, seed=0)
    assert [t.rows for t in takes] == [100, 50, 50] and all(np.bincount(t.members).max() == 1 for t in takes)


def test_fraction_of_tokens_with_a_total_upsamples() -> None:
    pools = [np.full(10, 100), np.full(10, 7)]
    takes = plan_mixture(_mix(Share("fraction", 0.5), Share("fraction", 0.5), unit="tokens", total=4000), pools, seed=3)
    assert int(pools[0][takes[0].members].sum()) == 2000 and takes[0].copies == 2
    got = int(pools[1][takes[1].members].sum())
    assert 2000 - 7 < got <= 2000 and takes[1].copies == 28


def test_plan_is_deterministic_and_sources_draw_independently() -> None:
    pools = [np.full(40, 3), np.full(40, 3)]
    mix = _mix(Share("rows", 10), Share("rows", 10))
    a, b = plan_mixture(mix, pools, seed=9), plan_mixture(mix, pools, seed=9)
    assert all(np.array_equal(x.members, y.members) for x, y in zip(a, b))
    assert not np.array_equal(a[0].members, a[1].members)


@pytest.mark.parametrize("data,message", [
    ({"sources": []}, "'sources' must be a non-empty list"),
    ({"sources": [{"name": "a", "inputs": "x", "rows": 1, "tokens": 2}]}, "give one of rows, tokens, fraction"),
    ({"sources": [{"name": "a", "inputs": "x", "max_length": 64}]}, "max_length is shared by all sources"),
    ({"sources": [{"name": "a", "inputs": "x", "promt_template": "{q}"}]}, "unknown option(s) promt_template"),
    ({"sources": [{"name": "a", "inputs": "x"}, {"name": "a", "inputs": "y"}]}, "source name 'a' is used twice"),
    ({"sources": [{"name": "a", "inputs": "x", "fraction": 0.7}, {"name": "b", "inputs": "y", "fraction": 0.7}]},
     "the fractions add up to 1.4 > 1"),
    ({"sources": [{"name": "a", "inputs": "x", "fraction": 0.5}]}, "must add up to 1"),
    ({"sources": [{"name": "a", "inputs": "x", "rows": -1}]}, "rows must be a non-negative integer"),
    ({"sources": [{"name": "a b", "inputs": "x"}]}, "name must be"),
    ({"unit": "bytes", "sources": [{"name": "a", "inputs": "x"}]}, "unit must be rows or tokens"),
])
def test_bad_mixture_files_are_one_line_errors(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_mixture(data, "mix.yaml")
    assert message in str(e.value) and str(e.value).startswith("mix.yaml") and "\n" not in str(e.value)


def test_source_options_are_checked_as_a_recipe() -> None:
    mix = parse_mixture({"format": "alpaca", "sources": [{"name": "a", "inputs": "x", "train_on": "sometimes"}]}, "m.yaml")
    with pytest.raises(ConfigError, match=r"train_on: expected one of all, last"):
        mix.source_config(DataConfig(), 0)
    mix = parse_mixture({"sources": [{"name": "a", "inputs": "x", "format": "alpaca", "eval_inputs": ["e.json"]}]}, "m.yaml")
    cfg = mix.source_config(build_config(DataConfig, {}, {"eval_fraction": 0.1, "max_length": 64}), 0)
    assert (cfg.format, cfg.eval_input, cfg.eval_fraction, cfg.max_length) == ("alpaca", ["e.json"], 0.0, 64)


# -- prepare --mix end to end --------------------------------------------------------------------


def _head(src: Path, dst: Path, n: int) -> Path:
    opener = gzip.open if src.name.endswith(".gz") else open
    if src.name.endswith(".json"):  # a JSON array (Alpaca)
        dst.write_text("".join(json.dumps(r) + "\n" for r in json.loads(src.read_text())[:n]))
        return dst
    with opener(src, "rt") as f:
        dst.write_text("".join(islice(f, n)))
    return dst


def three_sources(tmp_path: Path, **shares: dict) -> Path:
    race = _head(require_shared("race/dev.jsonl.gz"), tmp_path / "race.jsonl", 20)
    alpaca = _head(require_shared("alpaca/alpaca_data_random2000.json"), tmp_path / "alpaca.jsonl", 30)
    gsm = _head(require_shared("gsm8k/test.jsonl"), tmp_path / "gsm.jsonl", 25)
    with race.open("a") as f:
        f.write('{"article": "broken\n')  # one malformed row: dropped, still counted for race
    sources = [
        {"name": "race", "inputs": [str(race)], "format": "prompt-completion", "prompt_template": RACE_TEMPLATE,
         "completion_template": "{answer}", "eval_fraction": 0.1, **shares.get("race", {})},
        {"name": "alpaca", "inputs": [str(alpaca)], "format": "alpaca", **shares.get("alpaca", {})},
        {"name": "gsm8k", "inputs": [str(gsm)], "format": "prompt-completion", "prompt_template": "{question}",
         "completion_template": "{answer}", "eval_inputs": [str(_head(require_shared("gsm8k/train.jsonl"), tmp_path / "g.jsonl", 6))],
         **shares.get("gsm8k", {})},
    ]
    path = tmp_path / "mix.yaml"
    path.write_text(json.dumps({"max_length": 512, "seed": 3, "sources": sources}))  # JSON is YAML
    return path


def run_prepare(mix: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "plw_data.cli.main", "prepare", "--mix", str(mix), "--tokenizer",
           str(tokenizer_dir("smollm2-135m-instruct")), "--output", str(out), "-q", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)


def _written(out: Path) -> dict[str, np.ndarray]:
    cols: dict[str, list] = {"example_index": [], "seq_lengths": []}
    for split in ("train", "eval"):
        for batch in S.iter_record_batches(out / split):
            for name, values in cols.items():
                values.append(S.flat_values(batch, name))
    return {k: np.concatenate(v) for k, v in cols.items()}


def test_three_source_mixture_counts_add_up(tmp_path: Path) -> None:
    mix = three_sources(tmp_path, race={"rows": 40}, alpaca={"tokens": 3000}, gsm8k={"fraction": 0.25})
    res = run_prepare(mix, tmp_path / "out")
    assert res.returncode == 0, res.stderr
    m = json.loads((tmp_path / "out" / S.MANIFEST).read_text())
    src = m["sources"]
    assert list(src) == ["race", "alpaca", "gsm8k"]
    # every source's rows: kept + dropped (errors and the rows its share left out) = its input rows
    for name, s in src.items():
        assert s["input_rows"] == s["kept"] + sum(s["dropped"].values()), name
        assert s["index_range"][1] - s["index_range"][0] == s["input_rows"]
    assert [s["input_rows"] for s in src.values()] == [21, 30, 31]
    assert src["race"]["dropped"] == {"malformed_json": 1}
    assert sum(s["input_rows"] for s in src.values()) == m["counts"]["input_rows"] == sum(i["rows"] for i in m["inputs"])
    # race: 18 after its 2-example eval split, 40 = 2 whole copies + 4 sampled
    assert (src["race"]["available"], src["race"]["eval"], src["race"]["taken"]) == (18, 2, 40)
    assert (src["race"]["copies"], src["race"]["sampled"]) == (2, 4)
    # alpaca: whole examples worth at most 3000 tokens
    assert 2000 < src["alpaca"]["tokens"]["prompt"] + src["alpaca"]["tokens"]["completion"] + src["alpaca"]["tokens"]["template"] <= 3000
    # gsm8k: a quarter of the training rows, its eval from its own eval file
    assert src["gsm8k"]["taken"] == round(0.25 * (40 + src["alpaca"]["taken"]) / 0.75)
    assert src["gsm8k"]["eval"] == 6 and src["gsm8k"]["input_rows"] == 25 + 6
    assert m["splits"]["train"]["examples"] == sum(s["taken"] for s in src.values())
    assert m["counts"]["repeated"] == m["splits"]["train"]["examples"] + m["splits"]["eval"]["examples"] - m["counts"]["kept"]
    for cat in ("prompt", "completion", "template"):
        assert m["splits"]["train"][f"{cat}_tokens"] == sum(s["tokens"][cat] for s in src.values())
    # on disk: each example's index lies in its source's range; a repeated example keeps its index
    w = _written(tmp_path / "out")
    dropped = [json.loads(line) for line in (tmp_path / "out" / S.DROPPED).read_text().splitlines()]
    seen = np.concatenate([w["example_index"], [d["index"] for d in dropped]])
    assert np.array_equal(np.unique(seen), np.arange(m["counts"]["input_rows"]))
    times = np.bincount(w["example_index"])
    lo, hi = src["race"]["index_range"]
    assert times[lo:hi].max() == 3 and len(w["example_index"]) - len(np.unique(w["example_index"])) == m["counts"]["repeated"]
    not_sampled = [d for d in dropped if d["reason"] == "not_sampled"]
    assert len(not_sampled) == sum(s["dropped"].get("not_sampled", 0) for s in src.values()) > 0
    assert all(Path(d["file"]).exists() and d["row"] >= 0 for d in not_sampled)


def test_mixture_is_deterministic_verifies_and_rerun_is_a_noop(tmp_path: Path) -> None:
    from plw_data.prepare.verify import verify

    mix = three_sources(tmp_path, race={"rows": 7}, alpaca={"rows": 9}, gsm8k={"rows": 5})
    assert run_prepare(mix, tmp_path / "a").returncode == 0
    assert run_prepare(mix, tmp_path / "b").returncode == 0
    shard = lambda d: min((d / "train").glob("*.arrow")).read_bytes()
    assert shard(tmp_path / "a") == shard(tmp_path / "b")
    verify(tmp_path / "a")  # no repeats: the plain coverage rule holds
    again = run_prepare(mix, tmp_path / "a")
    assert again.returncode == 0 and (tmp_path / "a" / S.MANIFEST).exists()
    other = run_prepare(mix, tmp_path / "c", "--seed", "4")
    assert other.returncode == 0 and shard(tmp_path / "c") != shard(tmp_path / "a")


def test_mixture_errors_are_one_line(tmp_path: Path) -> None:
    mix = three_sources(tmp_path)
    res = run_prepare(mix, tmp_path / "o", str(tmp_path / "race.jsonl"))
    assert res.returncode == 2 and res.stderr.strip() == "error: with --mix the inputs come from the mixture file; give no INPUT"
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources:\n  - name: a\n    inputs: nope.jsonl\n    fromat: alpaca\n")
    res = run_prepare(bad, tmp_path / "o")
    assert res.returncode == 2 and res.stderr.strip() == f"error: {bad}: sources[0] (a): unknown option(s) fromat"


def test_mixture_verifies_and_rows_carry_their_source(tmp_path: Path) -> None:
    """Needs the lead's storage: the source_index writer and verify's rule for repeats."""
    import datasets

    from plw_data.prepare.verify import verify

    mix = three_sources(tmp_path, race={"rows": 40}, alpaca={"rows": 10}, gsm8k={"rows": 12})
    assert run_prepare(mix, tmp_path / "out").returncode == 0
    m = json.loads((tmp_path / "out" / S.MANIFEST).read_text())
    ds = datasets.load_from_disk(str(tmp_path / "out" / "train"))
    assert S.SOURCE_INDEX in ds.column_names
    verify(tmp_path / "out")  # up-sampled copies: counts.repeated, each distinct row once
    ranges = [s["index_range"] for s in m["sources"].values()]
    taken = np.zeros(3, np.int64)
    for row in ds:
        assert len(row[S.SOURCE_INDEX]) == len(row[S.SEQ_LENGTHS])
        for idx, k in zip(row[S.EXAMPLE_INDEX], row[S.SOURCE_INDEX]):
            assert ranges[k][0] <= idx < ranges[k][1]
            taken[k] += 1
    assert taken.tolist() == [s["taken"] for s in m["sources"].values()]


# -- PLW per source: parsing, --prompt-share, per-source eval sums, training ------------------------


def _manifest(tokens: dict[str, dict[str, int]]) -> dict:
    sources, start = {}, 0
    for name, t in tokens.items():
        sources[name] = {"index_range": [start, start + 10], "tokens": t, "eval_tokens": t}
        start += 10
    return {"sources": sources}


def _train_cfg(**kw):
    from plw_data.train.config import TrainConfig

    return build_config(TrainConfig, {}, {"model": "m", "data": "d", "output": "o", **kw})


def test_per_source_plw_parsing() -> None:
    from plw_data.train.schedule import Schedule

    m = _manifest({"race": {}, "alpaca": {}, "gsm8k": {}})
    names, plw = _train_cfg(prompt_loss_weight="race=linear:1:0.1@epoch=1, alpaca=1,*=0.05").plw_for(m)
    assert names == ["race", "alpaca", "gsm8k"] and list(plw) == names
    assert plw["race"] == Schedule("linear", (1.0, 0.1), plw["race"].positions) and str(plw["race"]) == "linear:1:0.1@epoch=1"
    assert (plw["alpaca"].value(0, 10, 5), plw["gsm8k"].value(3, 10, 5)) == (1.0, 0.05)
    names, plw = _train_cfg(prompt_loss_weight="step:1:0.1@epoch=1").plw_for(m)  # one schedule for all: '=' inside
    assert isinstance(plw, Schedule) and plw.kind == "step"
    for spec, message in [
        ("race=0.1,typo=1,*=1", "--prompt-loss-weight: unknown source(s) typo (sources: race, alpaca, gsm8k)"),
        ("race=0.1,alpaca=1", "--prompt-loss-weight: no PLW for source(s) gsm8k"),
    ]:
        with pytest.raises(ConfigError) as e:
            _train_cfg(prompt_loss_weight=spec).plw_for(m)
        assert str(e.value).startswith(message)
    for spec in ("race=0.1,0.2", "race=-1", "race=0.1,race=0.2"):
        with pytest.raises(ConfigError):
            _train_cfg(prompt_loss_weight=spec)
    with pytest.raises(ConfigError, match="not a mixture"):  # an old single-source DIR has no sources
        _train_cfg(prompt_loss_weight="race=0.1").plw_for({"splits": {}})


@pytest.mark.parametrize("share", [0.0, 0.25, 0.5, 0.9])
def test_prompt_share_reproduces_the_formula_on_each_source(share: float) -> None:
    from plw_data.rg.policy import loss_shares

    tokens = {"race": {"prompt": 163464, "completion": 800, "template": 12400},
              "alpaca": {"prompt": 9000, "completion": 40000, "template": 25000},
              "gsm8k": {"prompt": 20000, "completion": 50000, "template": 6000}}
    names, plw = _train_cfg(prompt_share=share).plw_for(_manifest(tokens))
    for name, t in tokens.items():
        w = plw[name].value(0, 1, 1)
        assert w == pytest.approx(share * t["completion"] / ((1 - share) * (t["prompt"] + t["template"])), rel=1e-12)
        s = loss_shares(t, w)
        assert s["prompt"] + s["template"] == pytest.approx(share)
    single = {"splits": {"train": {"prompt_tokens": 30, "completion_tokens": 10, "template_tokens": 10}}}
    names, plw = _train_cfg(prompt_share=share).plw_for(single)  # an old single-source DIR: one PLW
    assert names == [] and plw.value(0, 1, 1) == pytest.approx(share * 10 / ((1 - share) * 40))
    with pytest.raises(ConfigError, match=r"--prompt-share must be in \[0, 1\)"):
        _train_cfg(prompt_share=1.0)


def test_eval_sums_per_source_add_up_to_the_whole() -> None:
    import torch

    from plw_data.batch.metrics import eval_sums, eval_sums_by_source, source_of_tokens

    g = torch.Generator().manual_seed(0)
    B, L = 3, 40
    example_id = torch.sort(torch.randint(0, 30, (B, L), generator=g), dim=1).values
    example_id[:, -3:] = -1  # padding
    labels = torch.where(example_id < 0, torch.full((B, L), -100), torch.randint(0, 50, (B, L), generator=g))
    args = (torch.rand(B, L, generator=g), torch.rand(B, L, generator=g) > 0.5, labels,
            torch.randint(0, 3, (B, L), generator=g), example_id, torch.randint(0, 50, (B, L), generator=g), torch.tensor([7]))
    source = source_of_tokens(example_id, torch.tensor([0, 10, 25, 30]))
    assert source[example_id < 0].eq(-1).all() and source[(example_id >= 10) & (example_id < 25)].eq(1).all()
    per = eval_sums_by_source(*args, source, 3)
    assert torch.allclose(per.sum(0), eval_sums(*args))


def test_mixture_trains_with_a_plw_per_source_and_reports_eval_per_source(tmp_path: Path, tiny_model: Path) -> None:
    from plw_data.train import train

    mix = three_sources(tmp_path, race={"rows": 12}, alpaca={"rows": 6}, gsm8k={"rows": 6})
    assert run_prepare(mix, tmp_path / "data").returncode == 0
    cfg = _train_cfg(model=str(tiny_model), data=str(tmp_path / "data"), output=str(tmp_path / "out"),
                     dtype="fp32", progress=False, max_steps=2, micro_batch_size=4, prompt_loss_weight="race=linear:1:0.1,*=1")
    events = train(cfg)
    plws = [e["prompt_loss_weight"] for e in events if "train_loss" in e]
    assert plws == [{"race": 1.0, "alpaca": 1.0, "gsm8k": 1.0}, {"race": pytest.approx(0.1), "alpaca": 1.0, "gsm8k": 1.0}]
    ev = [e for e in events if "eval_completion_loss" in e][-1]
    for name in ("race", "gsm8k"):
        assert ev[f"eval_completion_loss/{name}"] is not None and ev[f"eval_examples/{name}"] > 0
    assert ev["eval_completion_loss/alpaca"] is None and ev["eval_examples/alpaca"] == 0  # no eval split asked for
    assert sum(ev[f"eval_examples/{n}"] for n in ("race", "alpaca", "gsm8k")) == ev["eval_examples"]


def test_rg_stats_reports_each_source_and_loss_shares_under_a_plw_map(tmp_path: Path) -> None:
    from plw_data.rg.report import RgOptions, run

    mix = three_sources(tmp_path, race={"rows": 30}, alpaca={"rows": 10}, gsm8k={"rows": 8})
    assert run_prepare(mix, tmp_path / "data").returncode == 0
    m = json.loads((tmp_path / "data" / S.MANIFEST).read_text())
    results = run([f"mix={tmp_path / 'data'}"], DataConfig(), RgOptions(plw="race=0.01,*=1", json=tmp_path / "r.json"), quiet=True)
    by_name = {r["name"]: r for r in results}
    assert list(by_name) == ["mix", "mix/race", "mix/alpaca", "mix/gsm8k"]
    for key in ("total_prompt", "total_completion", "n"):  # the sources partition the whole
        assert by_name["mix"][key] == sum(by_name[f"mix/{n}"][key] for n in ("race", "alpaca", "gsm8k"))
    doc = json.loads((tmp_path / "r.json").read_text())
    (shares,) = doc["loss_shares"]
    for name, row in shares["sources"].items():
        assert row["tokens"] == m["sources"][name]["tokens"]  # masks on disk agree with the manifest
        assert row["plw"] == (0.01 if name == "race" else 1.0)
        t, w = row["tokens"], row["plw"]
        assert row["loss_share"]["completion"] == pytest.approx(t["completion"] / (w * (t["prompt"] + t["template"]) + t["completion"]))
    assert sum(r["of_mixture"] for r in shares["sources"].values()) == pytest.approx(1.0)
    assert sum(shares["mixture"]["loss_share"].values()) == pytest.approx(1.0)
    # --prompt-share: every source's prompt side carries exactly S
    run([str(tmp_path / "data")], DataConfig(), RgOptions(prompt_share=0.3, json=tmp_path / "s.json"), quiet=True)
    (shares,) = json.loads((tmp_path / "s.json").read_text())["loss_shares"]
    for row in shares["sources"].values():
        assert row["loss_share"]["prompt"] + row["loss_share"]["template"] == pytest.approx(0.3)
        assert row["plw"] == pytest.approx(0.3 / 0.7 * row["rg"])
    with pytest.raises(ConfigError, match="unknown source"):
        run([str(tmp_path / "data")], DataConfig(), RgOptions(plw="nope=1"), quiet=True)


def test_plw_trainer_on_a_mixture_weighs_and_reports_each_source(tmp_path: Path, tiny_model: Path) -> None:
    """transformers' Trainer through PLWTrainer: a PLW per source from PLWCollator.for_prepared, and the
    eval metrics per source plw-train reports."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, TrainingArguments

    from plw_data.batch.collate import PLWCollator
    from plw_data.hf import PLWTrainer

    mix = three_sources(tmp_path, race={"rows": 12}, alpaca={"rows": 6}, gsm8k={"rows": 6})
    assert run_prepare(mix, tmp_path / "data").returncode == 0
    ds = datasets.load_from_disk(str(tmp_path / "data"))
    collate = PLWCollator.for_prepared(tmp_path / "data", prompt_loss_weight={"race": 0.01, "alpaca": 1.0, "gsm8k": 0.5})
    assert collate.sources == ("race", "alpaca", "gsm8k")
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=2, per_device_train_batch_size=2, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, learning_rate=1e-3)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    trainer = PLWTrainer(model=model, args=args, train_dataset=ds["train"], eval_dataset=ds["eval"], data_collator=collate)
    trainer.train()
    ev = trainer.evaluate()
    for name in ("race", "gsm8k"):
        assert ev[f"eval_completion_loss/{name}"] > 0 and ev[f"eval_examples/{name}"] > 0
    assert sum(ev.get(f"eval_examples/{n}", 0) for n in ("race", "alpaca", "gsm8k")) == ev["eval_examples"]


def test_a_failed_mixture_run_leaves_nothing_behind(tmp_path: Path) -> None:
    """--on-error fail on the malformed RACE row, and a mixture whose templates name missing fields:
    one line, exit 2, and neither .plw-tmp nor the output folder the run created is left."""
    mix = three_sources(tmp_path, race={"rows": 10}, alpaca={"rows": 5}, gsm8k={"rows": 5})
    res = run_prepare(mix, tmp_path / "out", "--on-error", "fail")
    assert res.returncode == 2 and "race.jsonl: line 21" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"sources": [{"name": "race", "inputs": [str(tmp_path / "race.jsonl")],
                                            "prompt_template": "{nope}", "completion_template": "{answer}", "rows": 5}]}))
    res = run_prepare(bad, tmp_path / "out2")
    assert res.returncode == 2 and "no row kept" in res.stderr and "missing_field" in res.stderr
    assert not (tmp_path / "out2").exists()
