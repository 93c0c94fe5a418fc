"""Models whose vocabularies differ (docs/vocab.md).

For a merge: the output tokenizer (union, base or a model's, with added tokens) and, for every
input, where each row of its embedding and LM-head tensors lies in the output's vocabulary
(``tokenizers.py`` reads and writes tokenizer files, ``union.py`` builds the vocabulary and the
row maps, which the engine gathers by index). For ``mergesmith tokensurgeon``: a model given
another model's tokenizer (``surgeon.py`` the matching and the pursuit, ``transplant.py`` the
folders, ``cli.py``)."""
