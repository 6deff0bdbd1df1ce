import pytest
import torch

from lightning_ft.heads import AttentionPoolHead, LinearHead, MLPHead, PrototypeHead, build_head


@pytest.mark.parametrize("name", ["linear", "mlp", "prototype"])
def test_pooled_heads_map_features_to_logits(name):
    head = build_head(name, 16, 5)
    assert head(torch.randn(4, 16)).shape == (4, 5)
    assert head.wants_tokens is False


def test_attention_head_pools_tokens_and_depends_on_every_position():
    head = AttentionPoolHead(16, 3, num_heads=4)
    tokens = torch.randn(2, 7, 16, requires_grad=True)
    out = head(tokens)
    assert out.shape == (2, 3)
    out.sum().backward()
    assert (tokens.grad.abs().sum(-1) > 0).all()  # every token influences the result


def test_prototype_head_is_a_scaled_cosine():
    head = PrototypeHead(4, 2, temperature=0.5)
    with torch.no_grad():
        head.prototypes.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0]]))
    logits = head(torch.tensor([[3.0, 0, 0, 0]]))
    assert torch.allclose(logits, torch.tensor([[2.0, 0.0]]))


def test_unknown_head_names_the_known_ones_and_suggests():
    with pytest.raises(ValueError, match=r"Unknown head 'mpl'.*linear, mlp.*Did you mean 'mlp'"):
        build_head("mpl", 8, 2)


def test_bad_head_arguments_are_explained():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        AttentionPoolHead(10, 2, num_heads=4)
    with pytest.raises(ValueError, match="num_layers"):
        MLPHead(8, 2, num_layers=0)
    assert isinstance(build_head("linear", 8, 2), LinearHead)
