import re

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.optim import param_groups_layer_decay as timm_layer_decay
from torch import nn

from lightning_ft.backbones import create_backbone
from lightning_ft.groups import format_layer_groups, layer_groups
from lightning_ft.optim import param_groups_layer_decay
from lightning_ft.weights import load_weights_file


def _scales(groups, model):
    """param name -> (lr scale, weight decay) from a list of param-group dicts."""
    ids = {id(p): n for n, p in model.named_parameters()}
    return {ids[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}


@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "tf_efficientnet_lite0"])
def test_depth_map_agrees_with_timm_layer_decay(name):
    model = timm.create_model(name, num_classes=7)
    ours = _scales(param_groups_layer_decay(model, layer_groups(model), lr=1.0, weight_decay=0.05, layer_decay=0.7), model)
    # what timm's train.py --layer-decay builds (create_optimizer_v2 passes no_weight_decay())
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    theirs = _scales(timm_layer_decay(model, weight_decay=0.05, no_weight_decay_list=skip, layer_decay=0.7), model)
    assert ours.keys() == theirs.keys()
    for n in ours:
        assert ours[n][0] == pytest.approx(theirs[n][0], rel=1e-12), n
        assert ours[n][1] == theirs[n][1], n


class Wrapped(nn.Module):
    def __init__(self, name):
        super().__init__()
        self.backbone = timm.create_model(name, num_classes=0)
        self.head = nn.Linear(self.backbone.num_features, 7)


@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_depth_map_is_the_same_under_a_backbone_prefix(name):
    root = timm.create_model(name, num_classes=7)
    wrapped = Wrapped(name)
    classifier = root.pretrained_cfg["classifier"]
    rename = lambda n: n.replace(f"{classifier}.", "head.") if n.startswith(f"{classifier}.") else f"backbone.{n}"  # noqa: E731
    expected = [[rename(n) for n in g.param_names] for g in layer_groups(root)]
    got = layer_groups(wrapped)
    assert [list(g.param_names) for g in got] == expected
    assert got[0].name == "stem" and got[-1].name == "head"


def test_generic_fallback_orders_children_and_finds_the_head():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    groups = layer_groups(net)
    assert [g.param_names for g in groups] == [("0.weight", "0.bias"), ("2.weight", "2.bias"), ("4.weight", "4.bias")]
    assert groups[-1].name == "head"
    table = format_layer_groups(net)
    assert "head" in table and "4.weight" in table


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(ValueError, match=r"Unknown backbone 'resnet5'.*Close names:.*resnet50"):
        create_backbone("resnet5")


def test_missing_weights_file_is_named(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors.*not found.*Check the path"):
        create_backbone("test_resnet", str(missing))


def test_weights_that_do_not_fit_name_the_first_mismatched_keys(tmp_path):
    path = tmp_path / "resnet.safetensors"
    save_file(timm.create_model("test_resnet").state_dict(), str(path))
    with pytest.raises(ValueError, match=r"do not fit backbone 'test_vit'.*missing in file: cls_token, pos_embed"):
        create_backbone("test_vit", str(path))
    other = timm.create_model("test_resnet", num_classes=5).state_dict()
    other["layer1.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    save_file(other, str(path))
    with pytest.raises(ValueError, match=r"shape mismatch: layer1\.0\.conv1\.weight"):
        create_backbone("test_resnet", str(path))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_round_trip_through_timm(tmp_path, suffix):
    torch.manual_seed(0)
    source = timm.create_model("test_resnet", num_classes=5)
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":  # a wrapped DDP-style checkpoint is unwrapped
        torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    else:
        save_file(source.state_dict(), str(path))
    headless = create_backbone("test_resnet", str(path))
    assert headless.num_classes == 0
    for k, v in headless.state_dict().items():
        assert torch.equal(v, source.state_dict()[k]), k
    full = create_backbone("test_resnet", str(path), num_classes=5)
    assert torch.equal(full.fc.weight, source.fc.weight)


def test_torch_file_with_arbitrary_objects_is_refused(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": nn.Linear(1, 1)}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_weights_file(path)


def _corrupt_files(tmp_path):
    torch.manual_seed(0)
    state = timm.create_model("test_resnet").state_dict()
    random_bytes = tmp_path / "garbage.safetensors"
    random_bytes.write_bytes(torch.randint(0, 256, (5000,), dtype=torch.uint8).numpy().tobytes())
    good_pth, good_st = tmp_path / "good.pth", tmp_path / "good.safetensors"
    torch.save(state, good_pth)
    save_file(state, str(good_st))
    truncated_pth, truncated_st = tmp_path / "truncated.pth", tmp_path / "truncated.safetensors"
    truncated_pth.write_bytes(good_pth.read_bytes()[: good_pth.stat().st_size // 2])
    truncated_st.write_bytes(good_st.read_bytes()[: good_st.stat().st_size // 2])
    renamed = tmp_path / "random.pth"
    renamed.write_bytes(random_bytes.read_bytes())
    pickle_like = tmp_path / "pickle_like.safetensors"  # random bytes that start like a pickle (1 file in 256)
    pickle_like.write_bytes(b"\x80" + random_bytes.read_bytes()[:999])
    return [random_bytes, renamed, truncated_pth, truncated_st, pickle_like]


def test_corrupt_or_truncated_weights_file_is_named_at_construction(tmp_path):
    for path in _corrupt_files(tmp_path):
        size = f"{path.stat().st_size:,} bytes"
        with pytest.raises(ValueError, match=rf"'{re.escape(str(path))}' \({size}\) is not a readable safetensors "
                                             r"or torch weights file: .*truncated or corrupt") as err:
            create_backbone("test_resnet", str(path))
        assert "weights_only=False" not in str(err.value)  # never advise unpickling a corrupt file


def test_weights_format_is_read_from_the_content_not_the_suffix(tmp_path):
    torch.manual_seed(0)
    state = timm.create_model("test_resnet").state_dict()
    torch.save(state, tmp_path / "really_torch.safetensors")
    save_file(state, str(tmp_path / "really_safetensors.pth"))
    for name in ("really_torch.safetensors", "really_safetensors.pth"):
        loaded = load_weights_file(tmp_path / name)
        assert all(torch.equal(loaded[k], v) for k, v in state.items()), name


def test_in_chans_adapts_the_pretrained_stem_with_timm(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("test_resnet")
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    stem = source.state_dict()["conv1.0.weight"]
    gray = create_backbone("test_resnet", str(path), in_chans=1)
    assert torch.allclose(gray.conv1[0].weight, stem.sum(dim=1, keepdim=True))  # timm's adapt_input_conv
    bands = create_backbone("test_resnet", str(path), in_chans=13)
    assert bands.conv1[0].weight.shape[1] == 13
    assert bands.eval()(torch.randn(1, 13, 32, 32)).shape == (1, bands.num_features)


def test_img_size_resamples_vit_position_embeddings(tmp_path):
    source = timm.create_model("test_vit")
    path = tmp_path / "vit.safetensors"
    save_file(source.state_dict(), str(path))
    model = create_backbone("test_vit", str(path), img_size=64)
    grid = 64 // source.patch_embed.patch_size[0]
    assert model.pos_embed.shape[1] == grid * grid + source.num_prefix_tokens
    assert model.pretrained_cfg["input_size"][-1] == 64
    assert model.forward_features(torch.randn(1, 3, 64, 64)).shape[1] == grid * grid + source.num_prefix_tokens


def test_pretrained_true_without_an_offline_asset_says_what_exists():
    with pytest.raises(ValueError, match=r"no offline weights ship for backbone 'test_resnet'.*efficientnet_lite0"):
        create_backbone("test_resnet", True)


def test_asset_for_another_architecture_is_refused():
    with pytest.raises(ValueError, match="holds weights for 'tf_efficientnet_lite0'"):
        create_backbone("test_resnet", "efficientnet_lite0")
