"""Vocabularies: models whose tokenizers differ (docs/vocab.md)."""
