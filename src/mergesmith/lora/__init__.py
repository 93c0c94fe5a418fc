"""LoRA in adapter space: merge PEFT adapters into an adapter (``mergesmith.lora.merge``), extract
adapters from fine-tunes (``mergesmith.lora.extract``), on adapter folders read and written by
``mergesmith.lora.adapter`` with the algebra of ``mergesmith.lora.factors``.

Kept import-free, so that registering the commands does not load torch. See docs/lora.md.
"""
