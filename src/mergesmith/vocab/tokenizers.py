"""Reading a model's vocabulary, and writing the output's tokenizer files.

A vocabulary is read through ``transformers.AutoTokenizer``: that is how the model's users
encode text, whatever the files are (``tokenizer.json``, a SentencePiece ``tokenizer.model``,
``vocab.json`` and ``merges.txt``). The output tokenizer is written as files, not through
``save_pretrained``: the source's files are copied and only the added tokens are edited in,
in every file that lists them (``tokenizer.json``'s ``added_tokens``, ``tokenizer_config.json``'s
``added_tokens_decoder``, ``added_tokens.json``). So a SentencePiece model keeps its
``tokenizer.model`` (a "slow" tokenizer stays loadable as one) and a fast one its
``tokenizer.json``; transformers' ``save_pretrained`` would write a fast tokenizer only
(mergekit issue #185).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


@dataclass(frozen=True)
class AddedToken:
    """An added token as tokenizers store it: matched whole in the text before the model splits it."""

    content: str
    special: bool = False
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = True
    single_word: bool = False

    def as_json(self, token_id: Optional[int] = None) -> dict[str, Any]:
        entry = {"content": self.content, "lstrip": self.lstrip, "normalized": self.normalized,
                 "rstrip": self.rstrip, "single_word": self.single_word, "special": self.special}
        return entry if token_id is None else {"id": token_id, **entry}


@dataclass
class Vocabulary:
    """One model's tokens and the rows they index: ``ids`` holds every token whose id is below
    ``rows`` (the model's vocab_size; a token past it has no row, and is left out with a note)."""

    model: str
    path: Path
    ids: dict[str, int]
    added: dict[int, AddedToken]  # the model's added tokens (special or not), by id
    rows: int
    beyond: dict[str, int] = field(default_factory=dict)  # tokens whose id is at or past rows

    @property
    def beyond_added(self) -> bool:
        """Whether every token past ``rows`` is an added token (which a written tokenizer can drop)."""
        return all(i in self.dropped_added for i in self.beyond.values())

    dropped_added: frozenset[int] = frozenset()  # ids of added tokens past rows


def read_vocabulary(model: str, path: Path, config: dict) -> Union[Vocabulary, str]:
    """The vocabulary of the model in ``path``, or a problem naming the folder and the fix."""
    files = [n for n in ("tokenizer.json", "tokenizer.model", "vocab.json") if (path / n).is_file()]
    if not files:
        return (f"{model}: no tokenizer files in {path} (tokenizer.json, tokenizer.model or vocab.json); "
                "the vocabularies are aligned token by token, so every merged model needs its tokenizer")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path))
        ids = dict(tok.get_vocab())
        added = {int(i): _added(info) for i, info in tok.added_tokens_decoder.items()}
    except Exception as err:  # a tokenizer transformers cannot load: name it, do not guess
        return (f"{model}: its tokenizer in {path} does not load ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); fix or replace the tokenizer files")
    rows = vocab_size_of(config)
    if rows is None:
        rows = max(ids.values(), default=-1) + 1
    return Vocabulary(model, path, {t: i for t, i in ids.items() if i < rows},
                      {i: a for i, a in added.items() if i < rows}, rows,
                      {t: i for t, i in ids.items() if i >= rows}, frozenset(i for i in added if i >= rows))


def vocab_size_of(config: dict) -> Optional[int]:
    """config.json's vocab_size (or its text_config's)."""
    for cfg in (config, config.get("text_config")):
        if isinstance(cfg, dict) and isinstance(cfg.get("vocab_size"), int):
            return cfg["vocab_size"]
    return None


def _added(info: Any) -> AddedToken:
    return AddedToken(str(info.content), bool(getattr(info, "special", False)), bool(getattr(info, "lstrip", False)),
                      bool(getattr(info, "rstrip", False)), bool(getattr(info, "normalized", True)),
                      bool(getattr(info, "single_word", False)))


# ----------------------------------------------------------------------------- the output's files


@dataclass
class OutputTokenizer:
    """The output tokenizer: the source model's files, its tokens at or past its rows removed, and
    ``appended`` added at the ids after its own (in order)."""

    source: Vocabulary
    appended: list[tuple[int, AddedToken]]


def tokenizer_files(out: OutputTokenizer) -> dict[str, Union[Path, str]]:
    """The files the output's tokenizer is made of: name -> a file to copy, or the text to write."""
    src = out.source.path
    files: dict[str, Union[Path, str]] = {n: src / n for n in TOKENIZER_FILES if (src / n).is_file()}
    # The source's added tokens past its rows have no embedding row; mergekit strips them too.
    dropped = out.source.dropped_added
    if not out.appended and not dropped:
        return files
    if "tokenizer.json" in files:
        data = json.loads(Path(files["tokenizer.json"]).read_text(encoding="utf-8"))
        data["added_tokens"] = [e for e in data.get("added_tokens", []) if int(e["id"]) not in dropped]
        data["added_tokens"] += [a.as_json(i) for i, a in out.appended]
        files["tokenizer.json"] = json.dumps(data, ensure_ascii=False, indent=2) + "\n"
    config_path = src / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    decoder = {k: v for k, v in (config.get("added_tokens_decoder") or {}).items()
               if int(k) < out.source.rows}
    decoder.update({str(i): a.as_json() for i, a in out.appended})
    config["added_tokens_decoder"] = decoder
    files["tokenizer_config.json"] = json.dumps(config, ensure_ascii=False, indent=2) + "\n"
    if "added_tokens.json" in files:
        listed = json.loads(Path(files["added_tokens.json"]).read_text(encoding="utf-8"))
        listed = {t: i for t, i in listed.items() if i < out.source.rows}
        listed.update({a.content: i for i, a in out.appended})
        files["added_tokens.json"] = json.dumps(listed, ensure_ascii=False, indent=2) + "\n"
    return files
