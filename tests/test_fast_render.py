"""Fast chat rendering (docs/performance.md): the skeleton's pieces with the contents between them give
the template's own text, checked against Jinja; anything else renders with Jinja."""

from __future__ import annotations

import itertools

import pytest
from conftest import load_tokenizer, require_shared

from plw_data.config import DataConfig
from plw_data.prepare.encode import Encoder
from plw_data.prepare.formats import Conversation, iter_conversations
from plw_data.prepare.skeleton import prints_contents_verbatim


def _conv(*pairs: tuple[str, str]) -> Conversation:
    msgs = tuple({"role": r, "content": c} for r, c in pairs)
    return Conversation(msgs, tuple(r == "assistant" for r, _ in pairs))


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "llama-3-instruct"])
def test_verbatim_templates_render_fast_and_equal_jinja(name: str) -> None:
    tok = load_tokenizer(name)
    cfg = DataConfig(tokenizer=name, format="alpaca", check_render=True)
    enc = Encoder(tok, cfg)
    assert enc.fast
    path = str(require_shared("alpaca/alpaca_data_first5000.json"))
    items = [(r.index, r.file, r.row, c) for r, c in itertools.islice(iter_conversations([path], cfg), 40)]
    # outer whitespace a trimming template (Llama-3) would strip: Jinja renders that row
    items.append((40, "x", 40, _conv(("user", " padded\n"), ("assistant", "ok"))))
    job = enc.render(items)
    for (_, _, _, conv), text in zip(items, job.texts):
        assert text == tok.apply_chat_template(list(conv.messages), tokenize=False)
    assert enc.renders["mismatch"] == 0 and enc.renders["checked"] == enc.renders["fast"]
    assert enc.renders["fast"] == (40 if name == "llama-3-instruct" else 41)


def test_rows_are_sampled_without_check_render() -> None:
    name = "smollm2-135m-instruct"
    enc = Encoder(load_tokenizer(name), DataConfig(tokenizer=name))
    items = [(i, "x", i, _conv(("user", f"question {i}"), ("assistant", f"answer {i}"))) for i in range(640)]
    enc.render(items)
    assert enc.renders["fast"] == 640
    assert 1 + 3 <= enc.renders["checked"] <= 1 + 30  # the pattern's first row, then about 1 in 64


def test_content_dependent_template_falls_back_to_jinja() -> None:
    """A template the static check lets through but that rewrites contents: the first row of the
    pattern is rendered both ways, the mismatch is counted and the pattern renders with Jinja."""
    import copy

    name = "smollm2-135m-instruct"
    tok = copy.copy(load_tokenizer(name))  # the session's shared tokenizer keeps its own template
    tok.chat_template = "{{ messages | map(attribute='content') | map('upper') | join('|') }}"
    assert prints_contents_verbatim(tok.chat_template)
    enc = Encoder(tok, DataConfig(tokenizer=name))
    items = [(i, "x", i, _conv(("user", f"q{i}"), ("assistant", f"a{i}"))) for i in range(3)]
    job = enc.render(items)
    assert job.texts == [f"Q{i}|A{i}" for i in range(3)]
    assert enc.renders == {"checked": 1, "mismatch": 1, "jinja": 3}


@pytest.mark.parametrize(
    "template, verbatim",
    [
        ("{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] | trim + '\\n' }}{% endfor %}", True),
        ("{% for m in messages %}{% set c = m.content %}{{ c }}{% endfor %}", True),
        ("{% for m in messages %}{% if 'x' in m['content'] %}x{% endif %}{{ m['content'] }}{% endfor %}", False),
        ("{% for m in messages %}{% set c = m.content %}{{ c | length }}{% endfor %}", False),
        ("{% for m in messages %}{{ m['content'].split('</think>')[-1] }}{% endfor %}", False),
        ("{% for m in messages %}{{ m['content'] | replace('a', 'b') }}{% endfor %}", False),
        ("{{ messages | tojson }}", False),
        ("{% for m in messages %}{% for k, v in m.items() %}{{ v }}{% endfor %}{% endfor %}", False),
    ],
)
def test_static_check(template: str, verbatim: bool) -> None:
    assert prints_contents_verbatim(template) is verbatim


def test_template_files_that_branch_on_contents_are_not_fast() -> None:
    qwen = (require_shared("chat_templates/llama.cpp/Qwen-Qwen2.5-7B-Instruct.jinja")).read_text()
    assert not prints_contents_verbatim(qwen)


def test_check_render_changes_no_byte(tmp_path) -> None:
    import json

    from plw_data.prepare.pipeline import prepare

    rows = json.loads(require_shared("alpaca/alpaca_data_first5000.json").read_text())[:30]
    src = tmp_path / "a.json"
    src.write_text(json.dumps(rows))
    name = "llama-3-instruct"
    tok = str(require_shared(f"tokenizers/{name}"))
    outs = {}
    for check in (False, True):
        cfg = DataConfig(tokenizer=tok, format="alpaca", check_render=check)
        outs[check] = tmp_path / f"out-{check}"
        prepare([str(src)], cfg, outs[check], progress=False)
    files = sorted(p.relative_to(outs[False]) for p in outs[False].rglob("*") if p.is_file() and p.name != "run.json")
    assert files and all((outs[False] / f).read_bytes() == (outs[True] / f).read_bytes() for f in files)
    renders = json.loads((outs[True] / "run.json").read_text())["renders"]
    assert renders == {"checked": 30, "fast": 30}
