"""Models whose vocabularies differ: the output tokenizer (union, base or a model's, with added
tokens) and, for every input, where each row of its embedding and LM-head tensors lies in the
output's vocabulary (``tokenizers.py`` reads and writes tokenizer files, ``union.py`` builds the
vocabulary and the row maps). The engine gathers rows by index through these maps; docs/vocab.md."""
