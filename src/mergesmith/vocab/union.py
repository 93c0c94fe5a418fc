"""The output's vocabulary, and where each row of every input's vocabulary tensors lands in it.

With ``tokenizer_source`` (or a ``tokenizer:`` block) a recipe's models are aligned token by
token, with mergekit's meaning (mergekit 0.1.5, ``tokenizer/build.py`` and ``embed.py``):

- **The output's tokens.** ``base`` or a model: that model's tokenizer. ``union``: the base
  model's tokens (the first model's without a base) at their own ids, then, at the next ids, every
  other model's ordinary tokens the base lacks, then every model's added tokens the vocabulary
  still lacks (models in recipe order, a model's tokens by id). Then any ``tokenizer.tokens`` key
  still missing. Each model keeps only tokens whose id is below its ``vocab_size``.
- **Rows.** Output row ``r`` of model ``m``'s aligned tensor is ``m``'s own row for token ``r``
  when it has the token and the token is not forced. Otherwise it is a filled row, the same for
  every model that lacks the token:
  the token's ``source`` when ``tokens:`` gives one (a model's row for the same token, a model's
  row for another token, or zero); else the one model that has it (the donor); else, when the
  tensor's base model has it, the base's row; else the average of the models that have it (with
  none: zero). Rows past the last token (``pad_to_multiple_of``, or a source model with more rows
  than tokens) get the mean of the model's aligned token rows (John Hewitt, "Initializing New Word
  Embeddings for Pretrained Language Models", 2021).

Then the merge method runs on the aligned rows. ``RowMap`` holds this per vocabulary tensor as
index vectors: a block of output rows is gathered from the stored tensors by index (only the pages
of those rows are read), so no dense permutation matrix is ever built (mergekit #73 built one of
16 GB) and a vocabulary tensor can stream in row blocks like any other.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from mergesmith.recipe import TokenSetting, TokenizerSettings
from mergesmith.vocab.tokenizers import AddedToken, OutputTokenizer, Vocabulary, read_vocabulary


GATHER_ROWS = 4096  # rows gathered and cast at once


@dataclass
class VocabularyPlan:
    """The output's tokens and rows, and every model's own row for each output token."""

    settings: TokenizerSettings
    tokens: dict[str, int]  # output token -> output row
    rows: int  # rows of the output's vocabulary tensors (tokens, then padding)
    vocabularies: dict[str, Vocabulary]  # by model reference
    own_rows: dict[str, torch.Tensor]  # model -> int64 [token rows]: its row for each output token, -1: none
    tokenizer: OutputTokenizer
    notes: list[str] = field(default_factory=list)

    @property
    def token_rows(self) -> int:
        """Rows that hold a token (the ones past them are padding)."""
        return max(self.tokens.values(), default=-1) + 1

    def row_map(self, models: list[str], input_rows: list[int], base: Optional[str], where: str,
                problems: list[str]) -> Optional["RowMap"]:
        """How the inputs of one vocabulary tensor (``models``, holding ``input_rows`` rows each, in
        input order; ``base``: its slice's base model) are laid on the output's rows; None, with
        problems noted, when a token's source cannot be read."""
        n = self.token_rows
        take = []
        for model, have in zip(models, input_rows):
            own = self.own_rows[model].clone()
            own[own >= have] = -1  # a tensor shorter than the model's vocab_size: those tokens have no row
            take.append(own)
        forced = torch.zeros(n, dtype=torch.bool)
        for token, setting in self.settings.tokens.items():
            if setting.force and token in self.tokens:
                forced[self.tokens[token]] = True
        present = torch.stack(take) >= 0 if take else torch.zeros((0, n), dtype=torch.bool)
        first = {}  # a model listed twice is one model (mergekit keys inputs by model)
        for k, model in enumerate(models):
            first.setdefault(model, k)
        distinct = sorted(first.values())
        needs = forced | ~present[distinct].all(dim=0)
        by_row = {r: t for t, r in self.tokens.items()}
        fills: list[tuple[int, list[tuple[int, int]]]] = []
        for r in needs.nonzero().flatten().tolist():
            token = by_row.get(r)
            if token is None:
                continue  # a row with no token (a hole in the ids): zero, as mergekit leaves it
            terms = self._fill_terms(token, r, take, models, first, distinct, base, input_rows, where, problems)
            if terms is None:
                return None
            fills.append((r, terms))
        for k in range(len(take)):
            take[k][forced] = -1
        return RowMap(self.rows, n, take, fills)

    def _fill_terms(self, token: str, row: int, take: list[torch.Tensor], models: list[str], first: dict[str, int],
                    distinct: list[int], base: Optional[str], input_rows: list[int], where: str,
                    problems: list[str]) -> Optional[list[tuple[int, int]]]:
        """The (input, stored row) pairs whose average fills ``token``'s row; [] for zero."""
        setting = self.settings.tokens.get(token, TokenSetting())
        having = [k for k in distinct if take[k][row] >= 0]
        source = setting.source
        if source is not None and source.kind == "zero":
            return []
        if source is not None:
            k = first.get(source.model)
            if k is None:
                problems.append(f"{where}: tokenizer.tokens[{token!r}].source names {source.model}, which is not "
                                f"among the inputs of a vocabulary tensor; name a model merged there")
                return None
            if source.kind == "model":
                if take[k][row] < 0:
                    problems.append(f"{where}: tokenizer.tokens[{token!r}].source is {source.model}, which has no "
                                    f"token {token!r}; give {{kind: model_token, model: ..., token: ...}} instead")
                    return None
                return [(k, int(take[k][row]))]
            vocab = self.vocabularies[source.model]
            src_row = source.token_id if source.token is None else vocab.ids.get(source.token)
            if src_row is None or src_row >= input_rows[k]:
                what = f"token {source.token!r}" if source.token is not None else f"row {source.token_id}"
                problems.append(f"{where}: tokenizer.tokens[{token!r}].source: {source.model} has no {what}"
                                f" (it has {input_rows[k]} rows); check the token's spelling")
                return None
            return [(k, int(src_row))]
        if len(having) == 1:
            return [(having[0], int(take[having[0]][row]))]
        if not having:
            self._note_once(f"token {token!r} is in no model's vocabulary; its rows are zero")
            return []
        if base is not None and base in first and take[first[base]][row] >= 0:
            return [(first[base], int(take[first[base]][row]))]
        return [(k, int(take[k][row])) for k in having]

    def _note_once(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


@dataclass
class RowMap:
    """One vocabulary tensor's inputs laid on the output's rows.

    ``take[k][r]``: input ``k``'s stored row for output row ``r`` (-1: a filled row). ``fills``:
    each filled row (in row order) and the (input, stored row) pairs it averages (none: zero), in input order, so
    that the sum runs in mergekit's order. Rows ``token_rows..rows-1`` are padding: the mean of
    the input's aligned token rows.
    """

    rows: int
    token_rows: int
    take: list[torch.Tensor]
    fills: list[tuple[int, list[tuple[int, int]]]]
    _means: dict[int, torch.Tensor] = field(default_factory=dict)

    def is_identity(self, k: int, input_rows: int) -> bool:
        """Whether input ``k``'s aligned tensor is its stored tensor, row for row (every row its own:
        none filled, forced or padding)."""
        n = self.token_rows
        return self.rows == n == input_rows and torch.equal(self.take[k], torch.arange(n))

    def block(self, k: int, stored: list[torch.Tensor], lo: int, hi: int, dtype: torch.dtype,
              chunk_rows: Optional[int] = None) -> torch.Tensor:
        """Rows ``lo:hi`` of input ``k`` aligned to the output, in ``dtype``. ``stored``: every input's
        tensor as stored (a view of its file: only the rows gathered are read)."""
        top = min(hi, self.token_rows)
        out = torch.zeros((hi - lo, *stored[k].shape[1:]), dtype=dtype)
        if top > lo:
            own = self.take[k][lo:top]
            keep = (own >= 0).nonzero().flatten()
            # In pieces, so that the gathered rows and their cast never add more than a piece's worth.
            for at in range(0, keep.numel(), GATHER_ROWS):
                rows = keep[at:at + GATHER_ROWS]
                out[rows] = stored[k].index_select(0, own[rows]).to(dtype)
            for row, terms in self._fills_in(lo, top):
                if own[row - lo] < 0:
                    out[row - lo] = self.fill(row, terms, stored, dtype, out.shape[1:])
        if hi > self.token_rows:
            whole = out[:top] if lo == 0 and top == self.token_rows else None
            out[max(lo, self.token_rows) - lo:] = self.padding_mean(k, stored, dtype, whole,
                                                                    chunk_rows or max(1, hi - lo))
        return out

    def _fills_in(self, lo: int, hi: int):
        """The filled rows in ``lo:hi`` (``fills`` is sorted by row: only those are visited)."""
        start = bisect.bisect_left(self.fills, lo, key=lambda fill: fill[0])
        return itertools.takewhile(lambda fill: fill[0] < hi, itertools.islice(self.fills, start, None))

    @staticmethod
    def fill(row: int, terms: list[tuple[int, int]], stored: list[torch.Tensor], dtype: torch.dtype,
             shape: torch.Size) -> torch.Tensor:
        """A filled row: the terms' rows summed in order onto zero, divided by their count."""
        value = torch.zeros(shape, dtype=dtype)
        for k, src in terms:
            value = value + stored[k][src].to(dtype)
        return value / len(terms) if terms else value

    def padding_mean(self, k: int, stored: list[torch.Tensor], dtype: torch.dtype, whole: Optional[torch.Tensor],
                     chunk_rows: int) -> torch.Tensor:
        """The mean of input ``k``'s aligned token rows, for its padding rows. ``whole``: those rows,
        already aligned (the tensor read whole: the mean is then exactly ``torch.mean``); else they
        are aligned again block by block and summed in float64 (once per input, then kept)."""
        if k in self._means:
            return self._means[k]
        if whole is not None:
            mean = torch.mean(whole, dim=0)
        else:
            total = torch.zeros(stored[k].shape[1:], dtype=torch.float64)
            for lo in range(0, self.token_rows, chunk_rows):
                hi = min(lo + chunk_rows, self.token_rows)
                total += self.block(k, stored, lo, hi, dtype).sum(dim=0, dtype=torch.float64)
            mean = (total / self.token_rows).to(dtype)
        self._means[k] = mean
        return mean


# ----------------------------------------------------------------------------- building the vocabulary


def build_vocabulary(settings: TokenizerSettings, models: list[tuple[str, Path, dict]], base: Optional[str],
                     reference: str, where: str) -> tuple[Optional[VocabularyPlan], list[str]]:
    """The output's vocabulary from every model's tokenizer (``models``: reference, folder, config, the
    merged models and the tokenizer source), or every problem found. ``base``: the recipe's base model;
    ``reference``: the model whose tokenizer ``union`` and ``base`` start from."""
    problems: list[str] = []
    vocabularies: dict[str, Vocabulary] = {}
    for ref, path, config in models:
        got = read_vocabulary(ref, path, config)
        if isinstance(got, str):
            problems.append(f"{where}: {got}")
        else:
            vocabularies[ref] = got
    if problems:
        return None, problems
    start = reference if settings.source in ("union", "base") else settings.source
    source = vocabularies[start]
    if source.beyond and not source.beyond_added:
        problems.append(f"{where}: {start}: its tokenizer has tokens past its vocab_size {source.rows} that are not "
                        f"added tokens (e.g. {next(iter(source.beyond))!r}); its embeddings do not cover its "
                        "tokenizer: fix vocab_size in its config.json")
        return None, problems
    tokens = dict(source.ids)
    appended: list[tuple[int, AddedToken]] = []

    def append(token: str, added: AddedToken) -> None:
        if token not in tokens:
            tokens[token] = max(tokens.values(), default=-1) + 1
            appended.append((tokens[token], added))

    if settings.source == "union":
        order = [start] + [ref for ref, _, _ in models if ref != start and ref != settings.source]
        ordinary: dict[str, None] = {}
        added_tokens: dict[str, AddedToken] = {}
        notes = []
        for ref in order:
            vocab = vocabularies[ref]
            names = {a.content for a in vocab.added.values()}
            for token, _ in sorted(vocab.ids.items(), key=lambda item: item[1]):
                if token not in names:
                    ordinary.setdefault(token, None)
            for i in sorted(vocab.added):
                a = vocab.added[i]
                if a.content in added_tokens and added_tokens[a.content] != a:
                    notes.append(f"token {a.content!r} is added with different settings by several models; "
                                 "the first model's are kept")
                added_tokens.setdefault(a.content, a)
        for token in ordinary:
            if token not in added_tokens:
                append(token, AddedToken(token))
        for token, added in added_tokens.items():
            append(token, added)
    for token in settings.tokens:
        append(token, AddedToken(token))
    token_rows = max(tokens.values(), default=-1) + 1
    rows = max(token_rows, source.rows)  # never fewer rows than the tokenizer's own model (mergekit #425)
    multiple = settings.pad_to_multiple_of
    if multiple and rows % multiple:
        rows += multiple - rows % multiple
    own_rows = {}
    for ref, vocab in vocabularies.items():
        own = torch.full((token_rows,), -1, dtype=torch.int64)
        for token, row in tokens.items():
            i = vocab.ids.get(token)
            if i is not None:
                own[row] = i
        own_rows[ref] = own
    plan = VocabularyPlan(settings, tokens, rows, vocabularies, own_rows, OutputTokenizer(source, appended))
    for ref, vocab in vocabularies.items():
        if vocab.beyond:
            plan.notes.append(f"{ref}: {len(vocab.beyond)} tokens of its tokenizer lie past its vocab_size "
                              f"{vocab.rows} (e.g. {next(iter(vocab.beyond))!r}); they have no row and are left out")
    if settings.source == "union":
        plan.notes += list(dict.fromkeys(notes))
    plan.notes.append(f"vocabulary: {settings.source} of the tokenizers, {token_rows} tokens"
                      + (f", {rows} rows (padded)" if rows > token_rows else "")
                      + (f"; {len(appended)} tokens added to {start}'s" if appended else ""))
    return plan, problems

