"""The tokenizer loader: the same tokenizer AutoTokenizer gives, without importing torch where it can."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import CHAT_TOKENIZERS, REPO, tokenizer_dir

from plw_data.tokenizer import generic_tokenizer_folder, load_tokenizer


def _state(tok) -> dict:
    return {
        "type": type(tok).__name__,
        "backend": tok.backend_tokenizer.to_str(),
        "template": tok.chat_template,
        "special": tok.special_tokens_map,
        "added": {i: str(t) for i, t in tok.added_tokens_decoder.items()},
        "init": {k: str(v) for k, v in tok.init_kwargs.items()},
        "ids": (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok)),
    }


@pytest.mark.parametrize("name", [*CHAT_TOKENIZERS, "gpt2"])
def test_load_tokenizer_equals_auto_tokenizer(name):
    from transformers import AutoTokenizer

    folder = tokenizer_dir(name)
    ours, auto = load_tokenizer(str(folder)), AutoTokenizer.from_pretrained(str(folder))
    assert _state(ours) == _state(auto)
    if ours.chat_template:
        msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
        assert ours.apply_chat_template(msgs, tokenize=False) == auto.apply_chat_template(msgs, tokenize=False)


def test_generic_folder_rules(tmp_path):
    src = tokenizer_dir("smollm2-135m-instruct")
    folder = tmp_path / "tok"
    shutil.copytree(src, folder)
    assert generic_tokenizer_folder(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert not generic_tokenizer_folder(folder)  # a model type may choose another class: AutoTokenizer decides
    (folder / "config.json").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "auto_map": {"AutoTokenizer": ["x.Y", None]}}))
    assert not generic_tokenizer_folder(folder)  # custom code
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "GPT2Tokenizer"}))
    assert not generic_tokenizer_folder(folder)
    assert not generic_tokenizer_folder(tokenizer_dir("gpt2"))


def test_prepare_imports_neither_torch_nor_pandas(tmp_path):
    """A whole `plw-data prepare` with a tokenizer folder runs without importing torch (1.3 s) or pandas
    (0.2 s, which pyarrow imports for ``pa.array``): neither is used."""
    rows = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(20)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    code = (
        "import sys\n"
        "from plw_data.cli.main import main\n"
        f"sys.argv = ['plw-data', 'prepare', {str(tmp_path / 'a.json')!r}, '--format', 'alpaca', '-q',\n"
        f"            '-t', {str(tokenizer_dir('llama-3-instruct'))!r}, '--output', {str(tmp_path / 'out')!r}]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('torch' in sys.modules, 'pandas' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False"]
    assert (tmp_path / "out" / "manifest.json").is_file()
