"""Token surgery's math: which donor tokens the model already knows, and the rest by OMP.

``mergesmith tokensurgeon MODEL DONOR OUT`` gives MODEL the tokenizer of DONOR. Every row of
the output's embedding (and LM head) belongs to one donor token id, and is found in this order:

1. **Exact match.** Both vocabularies are normalised to what a token *means* (``normalise``): a
   byte-level BPE surface (``Ġhello``, ``Ã©``) and a SentencePiece one (``▁hello``, ``é``) both
   become the bytes ``b" hello"`` / ``b"\\xc3\\xa9"``; a special token that fills a role
   (``bos_token``, ``eos_token``, ...) becomes that role, so the donor's ``</s>`` takes the row of
   the model's ``<|endoftext|>`` when both are the end of sequence. A donor token whose key the
   model has takes the model's row, bit for bit.
2. **Byte match** (on by default): SentencePiece's byte-fallback token ``<0x41>`` and a one-byte
   token ``A`` are the same byte.
3. **Prefix match** (off by default, as mergekit): the model's longest token that is a prefix of
   the donor's (``" hel"`` for ``" hello"``), stopping before a prefix that is only whitespace.
4. **Approximation** of every other token. ``omp`` (the default) works as mergekit-tokensurgeon's
   default does: with S the tokens both tokenizers share, the donor's own row d_t of the token is
   written as a sparse combination of the donor's rows of k shared tokens,

       d_t ≈ Σ_{j ∈ J} c_j · D_j,   |J| = k   (orthogonal matching pursuit; Pati et al. 1993),

   and the model gets the same combination of *its* rows of those shared tokens,
   m_t = Σ_{j ∈ J} c_j · M_j. The coefficients are found in the donor's space, so the two models
   may have different hidden sizes. The LM head is approximated the same way, on its own: the
   pursuit runs again over the donor's LM head rows (the donor's embedding where it ties them).
   ``mean`` gives every such token the mean of all the model's rows; ``zero`` gives it zeros.
   These are the baselines OMP should beat.

OMP (``orthogonal_matching_pursuit``) picks, k times, the shared row with the largest
|⟨residual, D_j⟩| (rows not normalised, as mergekit), then projects the target onto the span of
the rows picked so far (Gram-Schmidt, each new row orthogonalised twice: "twice is enough",
Giraud et al. 2005) and takes the least-squares coefficients c = R⁻¹ Qᵀ d_t at the end.

Where we follow mergekit 0.1.5 and where we differ (docs/vocab.md says why):

- Same: OMP on the donor's (unnormalised, uncentred) rows, k = 64, batches of 512 targets,
  coefficients applied to the model's rows of the same shared tokens in float32; a separate
  pursuit for the LM head; special tokens matched by role; mean over all the model's rows;
  tokens whose donor id has no donor row get zeros; auxiliary vocabulary tensors (an LM head
  bias) keep the rows of matched tokens and get zeros elsewhere (mergekit keeps exact matches
  only; byte and prefix matches are off there by default).
- Normalisation: mergekit strips only the word-start marker (``Ġ`` or ``▁``, chosen by the
  tokenizer's Python class, which transformers 5 no longer exposes for tokenizer.json-only
  folders), so a byte-level ``Ã©`` never matches a SentencePiece ``é`` and ``Ċ`` never
  matches ``\\n``; we decode the byte-level alphabet to bytes, so they match. Its byte match takes
  ``ord(char)`` as the byte (wrong above 127); ours compares bytes.
- A token that is both bos and eos is matched as eos (mergekit: as bos), see
  ``normalised_vocabulary``.
- mergekit keys every ``additional_special_tokens`` entry to one key, so only one of them can
  match; ours keys them by their text.
- When the residual is already zero (the target lies in the span of the rows picked) or a new
  row is a combination of those already picked, mergekit's pursuit keeps dividing by a clamped
  near-zero norm (large, noisy coefficients, notably when k is near the donor's hidden size);
  ours gives that step coefficient 0. Otherwise the two pick the same rows and coefficients
  agree to float32 rounding (tests/vocab/test_surgeon.py).
- Byte matches are on by default (mergekit: off), since a byte token and the one-byte token are
  the same text; ``--byte-match/--prefix-match embed`` means the input embedding only (mergekit
  swaps its ``embed`` and ``lm_head`` values).
- The output keeps the donor's row count where its embedding is padded past its tokenizer
  (mergekit cuts it to the tokenizer's length); rows that no token uses are zero.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch

# A token's meaning: ("text", bytes), ("byte", int) for a byte-fallback token, ("special", role).
TokenKey = tuple[str, object]
APPROXIMATIONS = ("omp", "mean", "zero")
MATCH_SCOPES = ("yes", "no", "embed", "lm_head")
ROLES = ("eos_token", "bos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


# --- vocabularies -----------------------------------------------------------------------------

def byte_level_alphabet() -> dict[str, int]:
    """The printable character GPT-2's byte-level BPE writes for each byte, inverted (char -> byte).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are shifted to U+0100 on, in
    byte order (Radford et al. 2019, the ``bytes_to_unicode`` table of GPT-2's encoder).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shift)
            shift += 1
    return {c: b for b, c in chars.items()}


_BYTE_LEVEL = byte_level_alphabet()


def surface_kind(tokenizer_json: Optional[dict]) -> str:
    """How a tokenizer writes text into its tokens: ``byte_level`` (GPT-2's alphabet, ``Ġ`` = space),
    ``metaspace`` (SentencePiece's ``▁`` = space) or ``plain``, from its tokenizer.json
    (``None``: a slow SentencePiece tokenizer, which is metaspace)."""
    if tokenizer_json is None:
        return "metaspace"
    text = repr({k: tokenizer_json.get(k) for k in ("pre_tokenizer", "decoder", "normalizer")})
    if "'ByteLevel'" in text:
        return "byte_level"
    if "'Metaspace'" in text or "▁" in text:
        return "metaspace"
    return "plain"


def normalise(token: str, kind: str, added: bool = False) -> TokenKey:
    """What ``token`` spells, whatever the tokenizer's surface form (see the module docstring).

    Added tokens are stored as plain text by every kind of tokenizer, so they are not decoded; a
    byte-fallback token ``<0xNN>`` is a byte even where it was added (as mergekit reads it).
    """
    m = _BYTE_TOKEN.match(token)
    if m:
        return ("byte", int(m[1], 16))
    if kind == "byte_level" and not added and all(c in _BYTE_LEVEL for c in token):
        return ("text", bytes(_BYTE_LEVEL[c] for c in token))
    if kind == "metaspace" and not added:
        token = token.replace("▁", " ")
    return ("text", token.encode("utf-8", "surrogatepass"))


def normalised_vocabulary(vocab: dict[str, int], kind: str, added: Iterable[str] = (),
                          roles: Optional[dict[str, str]] = None) -> dict[TokenKey, int]:
    """Each token's key -> its id. ``roles`` maps a role (``eos_token``) to its token's text.

    A token in several roles takes the first in ``ROLES`` order: end of sequence first, so that a
    GPT-style ``<|endoftext|>`` (bos and eos at once) takes the row of the model's end of
    sequence, which its LM head has learnt to predict (mergekit takes bos first, a row never
    predicted). Two tokens with one key (rare: an added token spelling the same text as a token of
    the learnt vocabulary) keep the lower id."""
    added = set(added)
    role_of: dict[str, str] = {}
    for role in ROLES:
        text = (roles or {}).get(role)
        if isinstance(text, str) and text in vocab and text not in role_of:
            role_of[text] = role
    keys: dict[TokenKey, int] = {}
    for token, i in sorted(vocab.items(), key=lambda item: item[1]):
        key = ("special", role_of[token]) if token in role_of else normalise(token, kind, token in added)
        keys.setdefault(key, i)
    return keys


def prefixes(key: TokenKey) -> Iterable[TokenKey]:
    """The text key's proper prefixes, longest first, stopping at the first that is all whitespace."""
    kind, value = key
    if kind != "text":
        return
    assert isinstance(value, bytes)
    for n in range(len(value) - 1, 0, -1):
        if not value[:n].strip():
            return
        yield ("text", value[:n])


# --- matching ----------------------------------------------------------------------------------

@dataclass
class Assignment:
    """Where each donor token's row comes from, for one matrix."""
    copies: dict[int, int] = field(default_factory=dict)  # donor id -> the model's row copied
    approximate: list[int] = field(default_factory=list)  # donor ids to approximate, in id order
    unbacked: list[int] = field(default_factory=list)  # donor ids with no donor row: zeros
    counts: dict[str, int] = field(default_factory=lambda: {"exact": 0, "byte": 0, "prefix": 0})


def match_tokens(model_vocab: dict[TokenKey, int], donor_vocab: dict[TokenKey, int], model_rows: int,
                 donor_rows: Optional[int], byte_match: bool, prefix_match: bool) -> Assignment:
    """Exact, then byte, then prefix matches; every other donor token is left to approximate.

    Ids at or past a matrix's row count (a tokenizer longer than its embedding) are skipped on
    the model's side; on the donor's side (``donor_rows``; None when no donor rows are needed)
    they cannot be approximated and get zeros, as in mergekit.
    """
    model = {key: i for key, i in model_vocab.items() if i < model_rows}
    by_byte = {value[0]: i for (kind, value), i in model.items() if kind == "text" and len(value) == 1}
    out = Assignment()
    for key, donor_id in sorted(donor_vocab.items(), key=lambda item: item[1]):
        if key in model:
            out.copies[donor_id] = model[key]
            out.counts["exact"] += 1
            continue
        if byte_match:
            kind, value = key
            found = (model.get(("byte", value[0])) if kind == "text" and len(value) == 1
                     else by_byte.get(value) if kind == "byte" else None)
            if found is not None:
                out.copies[donor_id] = found
                out.counts["byte"] += 1
                continue
        if prefix_match:
            found = next((model[p] for p in prefixes(key) if p in model), None)
            if found is not None:
                out.copies[donor_id] = found
                out.counts["prefix"] += 1
                continue
        if donor_rows is not None and donor_id >= donor_rows:
            out.unbacked.append(donor_id)
        else:
            out.approximate.append(donor_id)
    return out


def shared_tokens(model_vocab: dict[TokenKey, int], donor_vocab: dict[TokenKey, int], model_rows: int,
                  donor_rows: int) -> tuple[list[int], list[int]]:
    """(model ids, donor ids) of the tokens both vocabularies hold with rows, in donor id order:
    the atoms OMP builds from (exact matches only, as mergekit)."""
    pairs = sorted((donor_vocab[key], i) for key, i in model_vocab.items()
                   if key in donor_vocab and i < model_rows and donor_vocab[key] < donor_rows)
    return [m for _, m in pairs], [d for d, _ in pairs]


# --- orthogonal matching pursuit ---------------------------------------------------------------

def orthogonal_matching_pursuit(targets: torch.Tensor, atoms: torch.Tensor, k: int, tol: float = 1e-6
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row y of ``targets`` (B, D): k rows of ``atoms`` (N, D) and coefficients c with
    y ≈ Σ_j c_j · atoms[idx_j], chosen greedily (orthogonal matching pursuit).

    Step t picks the unpicked atom a with the largest |⟨r, a⟩|, r = y − Q Qᵀ y the residual after
    projecting y on the atoms picked so far (Q their orthonormal basis, R the triangle with
    picked = Q R); at the end c = R⁻¹ Qᵀ y, the least-squares fit on the picked atoms. A step whose
    atom adds no new direction (‖a − Q Qᵀ a‖ ≤ tol ‖a‖), or that comes after y is already fitted
    (‖r‖ ≤ tol ‖y‖), gets coefficient 0. Computed in float32 (float64 if given). Returns
    (indices (B, k) int64, coefficients (B, k)).
    """
    batch, _ = targets.shape
    n = atoms.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"cannot pick k={k} of {n} atoms")
    work = targets.dtype if targets.dtype in (torch.float32, torch.float64) else torch.float32
    y = targets.to(work)
    a = atoms.to(device=y.device, dtype=work)
    q = y.new_zeros(batch, y.shape[1], k)
    r = y.new_zeros(batch, k, k)
    picked = torch.zeros(batch, k, dtype=torch.long, device=y.device)
    taken = torch.zeros(batch, n, dtype=torch.bool, device=y.device)
    rows = torch.arange(batch, device=y.device)
    y_norm = y.norm(dim=1)
    residual = y.clone()
    for t in range(k):
        scores = (residual @ a.T).abs().masked_fill_(taken, float("-inf"))
        idx = scores.argmax(dim=1)
        picked[:, t] = idx
        taken[rows, idx] = True
        atom = a[idx]
        basis = q[:, :, :t]
        proj = torch.zeros(batch, t, dtype=work, device=y.device)
        new = atom
        for _ in range(2):  # classical Gram-Schmidt twice keeps Q orthonormal in float32
            step = torch.bmm(basis.transpose(1, 2), new.unsqueeze(-1)).squeeze(-1)
            new = new - torch.bmm(basis, step.unsqueeze(-1)).squeeze(-1)
            proj = proj + step
        new_norm = new.norm(dim=1)
        live = (new_norm > tol * atom.norm(dim=1)) & (residual.norm(dim=1) > tol * y_norm)
        r[:, :t, t] = torch.where(live.unsqueeze(1), proj, 0.0)
        r[:, t, t] = torch.where(live, new_norm, 1.0)
        q[:, :, t] = torch.where(live.unsqueeze(1), new / new_norm.clamp_min(1e-30).unsqueeze(1), 0.0)
        fitted = torch.bmm(q[:, :, :t + 1], torch.bmm(q[:, :, :t + 1].transpose(1, 2), y.unsqueeze(-1)))
        residual = y - fitted.squeeze(-1)
    qty = torch.bmm(q.transpose(1, 2), y.unsqueeze(-1))
    coeffs = torch.linalg.solve_triangular(r, qty, upper=True).squeeze(-1)
    return picked, coeffs


def combine_rows(rows: torch.Tensor, picked: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """Σ_j coeffs[:, j] · rows[picked[:, j]] in float32, one term at a time (never a (B, k, D) copy)."""
    out = torch.zeros(picked.shape[0], rows.shape[1], dtype=torch.float32, device=coeffs.device)
    for j in range(picked.shape[1]):
        out += coeffs[:, j:j + 1].float() * rows[picked[:, j]].to(device=out.device, dtype=torch.float32)
    return out


# --- one matrix --------------------------------------------------------------------------------

def build_matrix(model_matrix: torch.Tensor, donor_matrix: Optional[torch.Tensor], assignment: Assignment,
                 shared: tuple[list[int], list[int]], out_rows: int, approximation: str, k: int,
                 batch_size: int = 512, device: str | torch.device = "cpu",
                 progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """The output matrix (``out_rows``, the model's width), in the model's dtype.

    Matched rows are copied bit for bit, approximated rows computed as the module docstring says
    (``donor_matrix`` is needed for ``omp`` only), every other row is zero. ``progress(n)`` is
    told each time n more rows are approximated.
    """
    out = torch.zeros(out_rows, model_matrix.shape[1], dtype=model_matrix.dtype)
    if assignment.copies:
        donor_ids = torch.tensor(list(assignment.copies), dtype=torch.long)
        model_ids = torch.tensor(list(assignment.copies.values()), dtype=torch.long)
        out[donor_ids] = model_matrix[model_ids]
    todo = assignment.approximate
    if not todo or approximation == "zero":
        if progress and todo:
            progress(len(todo))
        return out
    if approximation == "mean":
        out[torch.tensor(todo)] = model_matrix.float().mean(dim=0).to(model_matrix.dtype)
        if progress:
            progress(len(todo))
        return out
    if approximation != "omp":
        raise ValueError(f"unknown approximation {approximation!r}; use one of {', '.join(APPROXIMATIONS)}")
    assert donor_matrix is not None
    model_ids, donor_ids = (torch.tensor(ids, dtype=torch.long) for ids in shared)
    atoms = donor_matrix[donor_ids].to(device=device, dtype=torch.float32)
    model_shared = model_matrix[model_ids].to(device=device, dtype=torch.float32)
    for start in range(0, len(todo), batch_size):
        ids = torch.tensor(todo[start:start + batch_size], dtype=torch.long)
        targets = donor_matrix[ids].to(device=device, dtype=torch.float32)
        picked, coeffs = orthogonal_matching_pursuit(targets, atoms, k)
        out[ids] = combine_rows(model_shared, picked, coeffs).to(device="cpu", dtype=model_matrix.dtype)
        if progress:
            progress(len(ids))
    return out


def remap_rows(tensor: torch.Tensor, assignment: Assignment, out_rows: int) -> torch.Tensor:
    """An auxiliary vocabulary tensor (an LM head bias): exact, byte and prefix matches keep the
    model's rows, every other row is zero (a zero bias adds nothing to an approximated row's logit)."""
    out = tensor.new_zeros((out_rows, *tensor.shape[1:]))
    if assignment.copies:
        out[torch.tensor(list(assignment.copies))] = tensor[torch.tensor(list(assignment.copies.values()))]
    return out
