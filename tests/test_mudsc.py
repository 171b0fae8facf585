"""MuDSC (arXiv 2403.01753): unit matching for models that share no base. Tiny models, CPU, fast."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mergekit_wudi.mudsc import UnsupportedModuleError, build_spec, mudsc_merge, reset_batchnorm
from mergekit_wudi.mudsc import merge as merge_mod
from mergekit_wudi.mudsc.matching import match_align, match_zip
from mergekit_wudi.mudsc.states import apply_along as _apply_along
from mergekit_wudi.mudsc.similarity import CrossCorrelation


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is far faster on a busy shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- tiny architectures
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.BatchNorm1d(12), nn.ReLU())
        self.head_a = nn.Linear(12, 3)
        self.head_b = nn.Linear(12, 2)

    def forward(self, x):
        z = self.trunk(x)
        return torch.cat([self.head_a(z), self.head_b(z)], dim=1)


class Block(nn.Module):
    def __init__(self, c, norm):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(c, c, 3, padding=1, bias=False), norm(c)
        self.c2, self.n2 = nn.Conv2d(c, c, 3, padding=1, bias=False), norm(c)

    def forward(self, x):
        return F.relu(x + self.n2(self.c2(F.relu(self.n1(self.c1(x))))))


class ResNet(nn.Module):
    def __init__(self, norm="bn"):
        super().__init__()
        mk = nn.BatchNorm2d if norm == "bn" else (lambda c: nn.GroupNorm(4, c))
        self.stem, self.n = nn.Conv2d(1, 8, 3, padding=1), mk(8)
        self.b1 = Block(8, mk)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        x = self.b1(F.relu(self.n(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(5, 16)
        self.pos = nn.Parameter(torch.randn(6, 16) * 0.1)
        layer = nn.TransformerEncoderLayer(16, 4, 24, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.enc(self.emb(x) + self.pos).mean(1))


ARCH = {
    "mlp": (MLP, (8, 6)),
    "resnet_bn": (lambda: ResNet("bn"), (4, 1, 6, 6)),
    "resnet_gn": (lambda: ResNet("gn"), (4, 1, 6, 6)),
    "transformer": (Encoder, (4, 6, 5)),
}


def make(arch, seed):
    torch.manual_seed(seed)
    model = ARCH[arch][0]()
    # non-trivial norm parameters / statistics, so that a wrong permutation would show
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def data(arch, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = ARCH[arch][1]
    return [(torch.randn(*shape, generator=g), torch.zeros(shape[0])) for _ in range(n)]


def permuted_copy(model, example, seed=1):
    """The same function with every permutable unit group shuffled (blocks kept whole)."""
    spec = build_spec(model, example)
    g = torch.Generator().manual_seed(seed)
    mats = {}
    for grp in spec.groups:
        nb = grp.size // grp.block
        order = torch.randperm(nb, generator=g)
        perm = torch.cat([
            b * grp.block + (torch.randperm(grp.block, generator=g) if grp.within else torch.arange(grp.block))
            for b in order.tolist()
        ])
        mats[grp.gid] = torch.eye(grp.size)[perm]  # new unit r = old unit perm[r]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, axes in spec.param_axes.items():
        for axis, gid, _role, tile in axes:
            state[name] = _apply_along(state[name].float(), axis, mats[gid], tile)
    out = copy.deepcopy(model)
    out.load_state_dict(state)
    return out.eval()


# ---------------------------------------------------------------- invariance
@pytest.mark.parametrize("arch", list(ARCH))
@pytest.mark.parametrize("mode,alpha", [("align", 0.5), ("zip", 0.5), ("align", 1.0), ("zip", 0.0)])
def test_merge_with_permuted_copy_gives_the_model_back(arch, mode, alpha):
    model = make(arch, 0)
    batches = data(arch)
    x = batches[0][0]
    twin = permuted_copy(model, (x,))
    assert not torch.allclose(twin.state_dict()[next(iter(build_spec(model, (x,)).param_axes))],
                              model.state_dict()[next(iter(build_spec(model, (x,)).param_axes))])
    torch.testing.assert_close(twin(x), model(x), atol=1e-5, rtol=1e-5)  # the spec is function-preserving
    merged = mudsc_merge([model, twin], batches, mode=mode, alpha=alpha, reset_bn=False).eval()
    torch.testing.assert_close(merged(x), model(x), atol=1e-4, rtol=1e-4)
    if mode == "align":  # aligned onto models[0]: its very tensors come back
        for k, v in model.state_dict().items():
            torch.testing.assert_close(merged.state_dict()[k].to(v.dtype), v, atol=1e-5, rtol=1e-5, msg=k)
    # the other order: the model comes back up to the permutation (same function)
    merged2 = mudsc_merge([twin, model], batches, mode=mode, alpha=alpha, reset_bn=False).eval()
    torch.testing.assert_close(merged2(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["align", "zip"])
def test_three_models(mode):
    model = make("mlp", 0)
    batches = data("mlp")
    x = batches[0][0]
    models = [model, permuted_copy(model, (x,), 1), permuted_copy(model, (x,), 2)]
    merged = mudsc_merge(models, batches, mode=mode, reset_bn=False).eval()
    torch.testing.assert_close(merged(x), model(x), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- the two spaces
def test_alpha_one_uses_weights_only(monkeypatch):
    a, b = make("resnet_bn", 0), make("resnet_bn", 1)

    def boom(*args, **kwargs):
        raise AssertionError("activations were used with alpha=1")

    monkeypatch.setattr(CrossCorrelation, "update", boom)
    m1 = mudsc_merge([a, b], data("resnet_bn", seed=0), alpha=1.0, reset_bn=False)
    m2 = mudsc_merge([a, b], data("resnet_bn", seed=5), a=1.0, reset_bn=False)  # other data, same merge
    for k, v in m1.state_dict().items():
        torch.testing.assert_close(m2.state_dict()[k], v, rtol=0, atol=0)


def test_alpha_zero_uses_activations_only(monkeypatch):
    a, b = make("mlp", 0), make("mlp", 1)

    def boom(*args, **kwargs):
        raise AssertionError("weights were used with alpha=0")

    monkeypatch.setattr(merge_mod, "weight_correlation", boom)
    for mode in ("align", "zip"):
        mudsc_merge([a, b], data("mlp"), mode=mode, alpha=0.0)
    with pytest.raises(AssertionError, match="weights were used"):
        mudsc_merge([a, b], data("mlp"), alpha=0.5)


@pytest.mark.parametrize("arch", list(ARCH))
def test_shapes_class_and_bn_reset(arch):
    a, b = make(arch, 0), make(arch, 1)
    batches = data(arch)
    merged, info = mudsc_merge([a, b], batches, mode="zip", return_info=True, sweeps=2)
    assert type(merged) is type(a) and merged is not a
    sd, sa = merged.state_dict(), a.state_dict()
    assert list(sd) == list(sa)
    assert all(sd[k].shape == sa[k].shape and sd[k].dtype == sa[k].dtype for k in sa)
    assert torch.isfinite(merged.eval()(batches[0][0])).all()
    assert info["groups"] and all(-1 <= g["similarity"] <= 1 for g in info["groups"])
    bns = {k: v.clone() for k, v in sd.items() if "running" in k}
    if bns:  # running statistics were recomputed on the data: recomputing again changes nothing
        reset_batchnorm(merged, batches)
        for k, v in bns.items():
            torch.testing.assert_close(merged.state_dict()[k], v, atol=1e-5, rtol=1e-4)
    # a and b are untouched
    torch.testing.assert_close(a.state_dict()[next(iter(sa))], make(arch, 0).state_dict()[next(iter(sa))])


def test_module_weights_keep_each_task_head():
    a = make("mlp", 0)
    batches = data("mlp")
    x = batches[0][0]
    b = permuted_copy(make("mlp", 0), (x,))
    with torch.no_grad():
        b.head_b.weight.mul_(3.0)  # b is the expert for head_b
    merged = mudsc_merge([a, b], batches, module_weights={"head_a": [1, 0], "head_b": [0, 1]},
                         reset_bn=False).eval()
    torch.testing.assert_close(merged(x)[:, :3], a(x)[:, :3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged(x)[:, 3:], b(x)[:, 3:], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- matching and errors
def test_block_matching_keeps_blocks_whole():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(8, 8, generator=g)
    perm, _ = match_align(s, block=2, within=False)
    assert all(int(perm[2 * i + 1]) == int(perm[2 * i]) + 1 and int(perm[2 * i]) % 2 == 0 for i in range(4))
    cluster, _ = match_zip(torch.rand(8, 8, generator=g), 4, block=2, within=True)
    assert sorted(torch.bincount(cluster).tolist()) == [2, 2, 2, 2]


class WithLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.rnn = nn.LSTM(8, 8)

    def forward(self, x):
        return self.rnn(self.fc(x))[0]


class WithDepthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 4, 3)
        self.dw = nn.Conv2d(4, 4, 3, groups=4)

    def forward(self, x):
        return self.dw(self.c(x))


class WithCat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(16, 2)

    def forward(self, x):
        return self.out(torch.cat([self.a(x), self.b(x)], 1))


@pytest.mark.parametrize("model,shape,name", [
    (WithLSTM, (3, 2, 4), "rnn (LSTM)"), (WithDepthwise, (2, 1, 8, 8), "dw (Conv2d, groups=4)"), (WithCat, (2, 4), "cat"),
])
def test_unsupported_modules_are_named(model, shape, name):
    m = model()
    with pytest.raises(UnsupportedModuleError, match=name.replace("(", r"\(").replace(")", r"\)")):
        mudsc_merge([m, model()], [(torch.randn(*shape),)])


def test_bad_arguments():
    a, b = make("mlp", 0), make("mlp", 1)
    with pytest.raises(ValueError, match="mode"):
        mudsc_merge([a, b], data("mlp"), mode="nope")
    with pytest.raises(ValueError, match="alpha"):
        mudsc_merge([a, b], data("mlp"), alpha=2.0)
    with pytest.raises(ValueError, match="either alpha or a"):
        mudsc_merge([a, b], data("mlp"), alpha=0.2, a=0.3)
    with pytest.raises(TypeError):
        mudsc_merge([a, b], data("mlp"), sweepz=3)
    with pytest.raises(ValueError, match="model 1 is a ResNet"):
        mudsc_merge([a, make("resnet_bn", 0)], data("mlp"))


def test_aligned_states_are_the_models_in_merged_order():
    a, b = make("resnet_bn", 0), make("resnet_bn", 1)
    batches = data("resnet_bn")
    x = batches[0][0]
    _, info = mudsc_merge([a, b], batches, return_info=True, sweeps=2)
    for model, state in zip((a, b), info["aligned_states"]):
        twin = copy.deepcopy(model)
        twin.load_state_dict(state)
        torch.testing.assert_close(twin.eval()(x), model(x), atol=1e-4, rtol=1e-4)
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in info["aligned_states"][0].items())
