"""The same weights in Hugging Face's ``GPT2LMHeadModel``: the reference for benchmarks and checks.

Our parameter names are Hugging Face's (``transformer.*``, Conv1D weights stored (in, out)) and
the LM head is tied to the token embedding, so the state dict loads as it is.
"""

from __future__ import annotations

import torch
from gpt2_service.model.gpt2 import GPT2
from transformers import GPT2Config as HFConfig
from transformers import GPT2LMHeadModel

HF_ACTIVATION = {"tanh": "gelu_new", "none": "gelu"}


def to_hf(model: GPT2) -> GPT2LMHeadModel:
    """A ``GPT2LMHeadModel`` (SDPA attention, eval mode) holding a copy of ``model``'s weights."""
    c = model.config
    config = HFConfig(
        vocab_size=c.vocab_size,
        n_positions=c.n_positions,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_inner=c.n_inner,
        layer_norm_epsilon=c.layer_norm_epsilon,
        activation_function=HF_ACTIVATION[c.activation],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    hf = GPT2LMHeadModel(config)
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"weights do not map onto GPT2LMHeadModel: missing={missing} unexpected={unexpected}")
    hf.tie_weights()
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    # EOS disabled (our ignore_eos): every generation runs to max_new_tokens with no extra
    # logits processor, which is also HF's fastest greedy path.
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf.to(dtype=next(model.parameters()).dtype).eval()


@torch.inference_mode()
def hf_greedy(hf: GPT2LMHeadModel, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Hugging Face ``generate``: greedy, exactly ``max_new_tokens`` each (EOS is disabled)."""
    input_ids = torch.tensor(prompts, dtype=torch.long)  # all prompts have the same length
    out = hf.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
    )
    return [row[input_ids.shape[1] :].tolist() for row in out]
