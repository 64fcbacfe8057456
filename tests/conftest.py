"""Shared fixtures: the bundled MiniLM, unseen sentences, tiny Llama / GPT-2 models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Sentences that are not in autoq's bundled calibration set.
UNSEEN_SENTENCES = [
    "The lighthouse keeper painted the door bright blue last summer.",
    "Our flight was delayed because the pilot was stuck in traffic.",
    "She finally finished knitting the scarf her brother had asked for.",
    "The village school has only twelve pupils and one teacher.",
    "A sudden power cut stopped the escalators in the shopping centre.",
    "He prefers green tea in the morning and black coffee after lunch.",
    "The research group published its results in an open journal.",
    "Several streets were closed for the marathon on Sunday morning.",
    "The dog barked at the postman every single day without fail.",
    "Insurance premiums went up again after the winter storms.",
    "The chess tournament attracted players from twenty countries.",
    "We repainted the bedroom and bought a new lamp for the desk.",
    "The ferry crossing took longer than usual because of strong winds.",
    "Apples from the orchard were pressed into juice in October.",
    "The accountant found a small error in last month's invoices.",
    "Tourists queued for hours to see the famous painting.",
]


@pytest.fixture(scope="session")
def minilm_dir():
    from autoq.models import bundled_minilm_dir

    return bundled_minilm_dir()


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture
def minilm(minilm_dir):
    """A fresh fp32 MiniLM (tests may quantize it in place)."""
    import transformers

    return transformers.AutoModel.from_pretrained(minilm_dir).eval()


@pytest.fixture(scope="session")
def unseen_batch(minilm_tokenizer):
    return dict(minilm_tokenizer(UNSEEN_SENTENCES, padding=True, return_tensors="pt"))


def mean_pooled(model, batch) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def embedding_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean())


def tiny_llama(tie_word_embeddings: bool = False, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie_word_embeddings,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=128, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(config).eval()
