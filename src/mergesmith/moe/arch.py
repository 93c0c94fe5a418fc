"""Output architectures: which inputs each takes, its config.json, its tensor names.

Tensor names are those transformers 5.25's ``save_pretrained`` writes (one tensor per
expert matrix; transformers fuses them into ``experts.gate_up_proj``/``down_proj`` while
loading, and splits them again when saving). The same folder loads in transformers 4.

- Mixtral:   ``model.layers.L.block_sparse_moe.experts.E.{w1,w2,w3}.weight`` (w1 gate, w3 up,
  w2 down) and ``block_sparse_moe.gate.weight`` (E, H)
- Qwen2-MoE: ``model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight``, ``mlp.gate.weight``,
  ``mlp.shared_expert.{gate,up,down}_proj.weight`` and ``mlp.shared_expert_gate.weight`` (1, H)
- Qwen3-MoE: as Qwen2-MoE without the shared expert
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mergesmith.moe.config import PROMPT_MODES, MoEConfig

PROJECTIONS = ("gate", "up", "down")
MIXTRAL_NAMES = {"gate": "w1", "up": "w3", "down": "w2"}
# Keys every output config takes from the base model's config as they are.
COMMON_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
               "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
               "rope_parameters", "rope_theta", "rope_scaling", "attention_dropout")


@dataclass(frozen=True)
class OutputArch:
    name: str  # as mergekit names it; the recipe's `architecture` is matched against it by prefix
    model_type: str
    class_name: str
    input_types: tuple[str, ...]
    shared_experts: int  # how many shared experts it must have

    def expert_name(self, layer: int, expert: int, proj: str) -> str:
        if self.model_type == "mixtral":
            return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{MIXTRAL_NAMES[proj]}.weight"
        return f"model.layers.{layer}.mlp.experts.{expert}.{proj}_proj.weight"

    def router_name(self, layer: int) -> str:
        block = "block_sparse_moe" if self.model_type == "mixtral" else "mlp"
        return f"model.layers.{layer}.{block}.gate.weight"

    def shared_expert_name(self, layer: int, proj: str) -> str:
        return f"model.layers.{layer}.mlp.shared_expert.{proj}_proj.weight"

    def shared_gate_name(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.shared_expert_gate.weight"


MIXTRAL = OutputArch("Mixtral", "mixtral", "MixtralForCausalLM", ("llama", "mistral"), 0)
QWEN2_MOE = OutputArch("Qwen MoE", "qwen2_moe", "Qwen2MoeForCausalLM", ("llama", "mistral", "qwen2"), 1)
QWEN3_MOE = OutputArch("Qwen3 MoE", "qwen3_moe", "Qwen3MoeForCausalLM", ("qwen3",), 0)
ARCHS = (MIXTRAL, QWEN2_MOE, QWEN3_MOE)
NOT_YET = ("Deepseek MoE",)  # mergekit writes it too; mergesmith does not yet


def refusal(arch: OutputArch, config: MoEConfig, model_types: list[str]) -> Optional[str]:
    """Why ``arch`` cannot hold these inputs (None: it can)."""
    shared = config.shared_experts or []
    if len(shared) != arch.shared_experts:
        return f"{arch.name} takes {arch.shared_experts} shared experts, the config has {len(shared)}"
    if shared and config.gate_mode in PROMPT_MODES and not shared[0].positive_prompts:
        return f"{arch.name}'s shared expert gate is built from its positive_prompts; give it some"
    if len(set(model_types)) != 1:
        return f"{arch.name} needs every input model of one model_type (got {', '.join(sorted(set(model_types)))})"
    if model_types[0] not in arch.input_types:
        return f"{arch.name} takes {' or '.join(arch.input_types)} models, not {model_types[0]}"
    return None


def select_arch(config: MoEConfig, model_types: list[str], where: str) -> tuple[Optional[OutputArch], list[str]]:
    """mergekit's choice: candidates matching ``architecture`` by prefix, those that can hold the inputs,
    Mixtral first if it is one of them, else the first. Returns (arch, problems)."""
    wanted = (config.architecture or "").lower()
    candidates = [a for a in ARCHS if a.name.lower().startswith(wanted)]
    if not candidates:
        later = [n for n in NOT_YET if n.lower().startswith(wanted)]
        known = ", ".join(a.name for a in ARCHS)
        why = f"{later[0]} output is not supported yet" if later else "no output architecture matches it"
        return None, [f"{where}: architecture = {config.architecture!r}: {why}; use one of {known}"]
    reasons = {a.name: refusal(a, config, model_types) for a in candidates}
    fitting = [a for a in candidates if reasons[a.name] is None]
    if not fitting:
        return None, [f"{where}: no output architecture can hold these models: "
                      + "; ".join(f"{name}: {why}" for name, why in reasons.items())]
    return next((a for a in fitting if a is MIXTRAL), fitting[0]), []


def output_config(arch: OutputArch, base: dict, num_experts: int, experts_per_token: int, dtype: str,
                  attention_bias: bool) -> dict:
    """The output's config.json: the base's shared settings plus the MoE fields of ``arch``."""
    out = {k: base[k] for k in COMMON_KEYS if k in base}
    out.update(architectures=[arch.class_name], model_type=arch.model_type, dtype=dtype,
               num_experts_per_tok=experts_per_token)
    if arch is MIXTRAL:
        out.update(num_local_experts=num_experts, sliding_window=None)
        return out
    out.update(num_experts=num_experts, moe_intermediate_size=base["intermediate_size"], decoder_sparse_step=1,
               norm_topk_prob=True, mlp_only_layers=[], use_sliding_window=False, sliding_window=None)
    if arch is QWEN2_MOE:
        out.update(shared_expert_intermediate_size=base["intermediate_size"], qkv_bias=attention_bias)
    else:
        out["attention_bias"] = attention_bias
    return out
