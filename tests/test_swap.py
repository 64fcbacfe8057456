import pytest
import torch
from torch import nn

import autoq
from autoq.modules import QuantizedLinear

from conftest import tiny_gpt2, tiny_llama


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 64)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.shared = nn.Linear(64, 64)
        self.again = self.shared  # one module under two names
        self.head = nn.Linear(64, 16)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(self.again(self.shared(x)))


def test_quantizable_layers_nested_modulelist_and_shared():
    names = list(autoq.quantizable_layers(Net()))
    assert names == ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2", "shared", "head"]


def test_apply_swaps_in_place_and_shared_module_stays_shared():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(4, 64)
    ref = net(x)
    out = autoq.apply(net, {"blocks.0.fc1": "int8_weight_only", "shared": "int8_dynamic", "head": "none"})
    assert out is net
    assert isinstance(net.blocks[0].fc1, QuantizedLinear)
    assert net.shared is net.again and isinstance(net.again, QuantizedLinear)
    assert isinstance(net.head, nn.Linear)
    with torch.no_grad():
        y = net(x)
        assert float((y - ref).norm() / ref.norm()) < 0.05


def test_shared_module_given_two_formats_is_an_error():
    with pytest.raises(ValueError, match="shared under several names"):
        autoq.apply(Net(), {"shared": "int8_dynamic", "again": "int4_g32"})


def test_exclude_patterns():
    net = Net()
    layers = autoq.quantizable_layers(net, exclude=[r"fc2$", r"^head"])
    assert list(layers) == ["blocks.0.fc1", "blocks.1.fc1", "shared"]
    autoq.apply(net, {n: "int8_dynamic" for n in autoq.quantizable_layers(net)}, exclude=[r"fc2$"])
    assert isinstance(net.blocks[0].fc2, nn.Linear) and isinstance(net.blocks[0].fc1, QuantizedLinear)


def test_unknown_layer_and_format_are_clear_errors():
    with pytest.raises(ValueError, match="not a quantizable layer.*valid names"):
        autoq.apply(Net(), {"blocks.7.fc1": "int8_dynamic"})
    with pytest.raises(ValueError, match="unknown format 'int2'.*valid formats"):
        autoq.apply(Net(), {"head": "int2"})
    with pytest.raises(ValueError, match="cannot take int4_g128"):
        autoq.apply(Net(), {"head": "int4_g128"})


def test_tied_head_left_unquantized_and_still_tied():
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    layers = autoq.quantizable_layers(model)
    assert "lm_head" not in layers
    with pytest.raises(ValueError, match="shares its weight with an input embedding"):
        autoq.apply(model, {"lm_head": "int8_dynamic"})
    autoq.apply(model, {n: "int4_g32" for n in layers})
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 256, (2, 9))
    assert torch.isfinite(model(ids).logits).all()


def test_untied_head_is_quantizable():
    model = tiny_llama(tie_word_embeddings=False)
    assert "lm_head" in autoq.quantizable_layers(model)


def test_two_layers_sharing_one_weight_share_quantized_tensors():
    a, b = nn.Linear(32, 32), nn.Linear(32, 32)
    b.weight = a.weight
    seq = nn.Sequential(a, b)
    autoq.apply(seq, {"0": "int8_weight_only", "1": "int8_weight_only"})
    assert seq[0].qweight.data_ptr() == seq[1].qweight.data_ptr()


def test_gpt2_conv1d_layers_are_quantized_correctly():
    model = tiny_gpt2()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
    layers = autoq.quantizable_layers(model)
    assert "transformer.h.0.attn.c_attn" in layers and "lm_head" not in layers  # GPT-2 ties its head
    conv = layers["transformer.h.0.attn.c_attn"]
    assert conv.weight.shape == (128, 384)  # Conv1D stores [in, out]
    autoq.apply(model, {n: "int8_weight_only" for n in layers})
    q = model.transformer.h[0].attn.c_attn
    assert (q.in_features, q.out_features) == (128, 384)
    with torch.no_grad():
        out = model(ids).logits
    assert float((out - ref).norm() / ref.norm()) < 0.02
