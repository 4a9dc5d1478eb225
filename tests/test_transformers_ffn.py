"""MoE inside a Hugging Face transformer: its FFNs upcycled into modalmoe MoE layers compute
what the model computed (biases included) at step 0, for a BERT and a Llama-family model on
tiny random configs (and MiniLM-L6's real weights, slow tier), and fine-tune end to end."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from modalmoe.moe.layer import MoELayer  # noqa: E402
from modalmoe.moe.transformers_ffn import (  # noqa: E402
    UpcycledFFN,
    UpcycleError,
    moe_outputs,
    upcycle_transformer,
)


def tiny_bert(**kw):
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=100, **kw)  # fmt: skip
    return transformers.BertModel(config).eval()


def tiny_llama(**kw):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, vocab_size=100, **kw)  # fmt: skip
    return transformers.LlamaModel(config).eval()


IDS = torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "make, family",
    [(tiny_bert, "bert"), (tiny_llama, "llama"), (lambda: tiny_llama(mlp_bias=True), "llama")],
    ids=["bert", "llama", "llama-with-biases"],
)
@pytest.mark.parametrize(
    "experts, k, hidden", [(8, 2, None), (4, 1, 64), (8, 4, 16)], ids=["2-shards", "coarse", "4-shards"]
)
def test_the_upcycled_transformer_computes_the_same_hidden_states(make, family, experts, k, hidden):
    model = make()
    with torch.no_grad():
        before = model(input_ids=IDS).last_hidden_state
    report = upcycle_transformer(model, num_experts=experts, k=k, expert_hidden=hidden)
    assert report.family == family and len(report.replaced) == 2
    assert sum(isinstance(m, MoELayer) for m in model.modules()) == 2
    with torch.no_grad(), moe_outputs(model) as outputs:
        after = model.eval()(input_ids=IDS).last_hidden_state
    torch.testing.assert_close(after, before, atol=2e-6, rtol=1e-5)
    assert len(outputs.records) == 2 and "load_balance" in outputs.aux_losses


def test_it_fine_tunes_end_to_end_and_the_hooks_are_gone_afterwards():
    model = tiny_bert()
    upcycle_transformer(model, num_experts=4, k=2)
    model.train()
    head = torch.nn.Linear(32, 2)
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-3)
    target = torch.tensor([0, 1, 0])
    first = None
    banks = [m.experts.w_in for m in model.modules() if isinstance(m, MoELayer)]
    start = [b.detach().clone() for b in banks]
    for _ in range(20):
        with moe_outputs(model) as outputs:
            pooled = model(input_ids=IDS).last_hidden_state[:, 0]
        loss = torch.nn.functional.cross_entropy(head(pooled), target) + 0.01 * outputs.aux_losses["load_balance"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = float(loss.detach()) if first is None else first
    assert float(loss.detach()) < first
    assert all(not torch.equal(a, b) for a, b in zip(banks, start, strict=True))  # the experts trained
    layer = next(m for m in model.modules() if isinstance(m, MoELayer))
    assert not layer._forward_hooks  # moe_outputs removed its hooks
    assert any(isinstance(m, UpcycledFFN) for m in model.modules())


def test_ffns_that_cannot_be_upcycled_exactly_are_refused():
    with pytest.raises(UpcycleError, match="exact .erf. GELU"):
        upcycle_transformer(tiny_bert(hidden_act="gelu_new"))
    with pytest.raises(UpcycleError, match="SwiGLU with SiLU"):
        upcycle_transformer(tiny_llama(hidden_act="gelu"))
    with pytest.raises(UpcycleError, match="no known transformer family"):
        upcycle_transformer(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(UpcycleError, match="do not split into experts of 48"):
        upcycle_transformer(tiny_bert(), expert_hidden=48)


@pytest.mark.slow
def test_minilm_s_real_weights_upcycle_exactly():
    import os

    from modalmoe.encoders.text_pretrained import model_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    batch = tokenizer(["a red circle", "is there a blue triangle in the image?"], padding=True, return_tensors="pt")
    with torch.no_grad():
        before = model(**batch).last_hidden_state
    report = upcycle_transformer(model, num_experts=8, k=2)
    assert report.family == "bert" and len(report.replaced) == 6
    with torch.no_grad():
        after = model.eval()(**batch).last_hidden_state
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
