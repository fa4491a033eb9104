"""Building over a state-dict checkpoint leaves out the random initialisation
the file overwrites (models._build_over_checkpoint): every tensor is the
file's, bit for bit, as after open_clip's own build, and no random number is
drawn. Measured on ViT-B-32 (fresh processes, 2 cores): build + load 1.2-1.6 s
the normal way, 0.26-0.29 s without the draws (benchmarks row 8)."""
import pytest
import torch
from safetensors.torch import save_file

from clipft.models import _build_over_checkpoint, _unfilled_buffers, load_model, register_tiny_configs

pytestmark = pytest.mark.usefixtures("one_thread")


def write_checkpoint(tmp_path, name, suffix):
    import open_clip
    register_tiny_configs()
    torch.manual_seed(3)
    state = {k: v.contiguous() for k, v in open_clip.create_model(name).state_dict().items()}
    path = tmp_path / f"{name}{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("name,suffix", [("tiny-vit", ".safetensors"), ("tiny-rn", ".safetensors"),
                                         ("tiny-vit", ".pt")])
def test_the_model_is_the_files_bit_for_bit_and_no_rng_is_drawn(tmp_path, name, suffix):
    import open_clip
    path = write_checkpoint(tmp_path, name, suffix)
    normal = open_clip.create_model_and_transforms(name, pretrained=str(path))[0]
    rng = torch.get_rng_state()
    ours = load_model(name, str(path)).model
    assert torch.equal(torch.get_rng_state(), rng)          # nothing was drawn
    a, b = dict(normal.named_buffers()), dict(ours.named_buffers())   # non-persistent ones too
    a.update(normal.named_parameters())
    b.update(ours.named_parameters())
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []
    assert normal.logit_scale.requires_grad == ours.logit_scale.requires_grad


def test_without_a_checkpoint_file_the_build_draws_as_usual(tmp_path):
    rng = torch.get_rng_state()
    load_model("tiny-vit", "none")
    assert not torch.equal(torch.get_rng_state(), rng)


class Noisy(torch.nn.Module):
    """A random non-persistent buffer, which no checkpoint file restores."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3))
        self.register_buffer("noise", torch.randn(4), persistent=False)
        self.register_buffer("mask", torch.ones(2), persistent=False)


def test_a_random_buffer_no_file_restores_means_a_normal_build():
    calls = []

    def create(name, pretrained, device):
        calls.append(name)
        return Noisy(), None, None

    model, _, _ = _build_over_checkpoint(create, "noisy", "file.pt", "cpu")
    assert calls == ["noisy", "noisy"]           # built again, the normal way
    assert torch.isfinite(model.noise).all()

    from clipft.models import _skip_random_init
    mode = _skip_random_init()
    with mode:
        built = Noisy()
    assert _unfilled_buffers(built, mode.skipped) == ["noise"]


def test_the_check_runs_before_the_model_moves_to_its_device():
    """open_clip moves the model to ``device`` before loading the file, and a
    move gives every buffer new memory: the build over a checkpoint is made on
    the CPU, checked there, and moved after (here to ``meta``, which any torch
    has, standing in for an accelerator)."""
    calls = []

    def create(name, pretrained, device):
        calls.append(device)
        return Noisy().to(device), None, None

    model, _, _ = _build_over_checkpoint(create, "noisy", "file.pt", "meta")
    assert calls == ["cpu", "meta"]              # the unfilled buffer was seen on the CPU
    assert model.w.device.type == "meta"

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(3))

    def create_plain(name, pretrained, device):
        calls.append(device)
        return Plain().to(device), None, None

    calls.clear()
    model, _, _ = _build_over_checkpoint(create_plain, "plain", "file.pt", "meta")
    assert calls == ["cpu"] and model.w.device.type == "meta"   # one build, then the move
