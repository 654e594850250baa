"""VQ-attention: the hash it reads, identity at initialisation, persistence, and training through the LLM."""

import copy

import pytest
import torch

import tokenreduce as tr
from tokenreduce.adapters import get_adapter
from tokenreduce.core.api import get_handle
from tokenreduce.core.layout import Segment, TokenLayout
from tokenreduce.plugins.vqtoken import VQAttention, VQAttentionConfig
from tokenreduce.plugins.vqtoken.attention import occupancy_moments
from tokenreduce.plugins.vqtoken.hashing import (
    anchors,
    changes,
    frame_differences,
    grid_coordinates,
    index_map,
    occupancy,
    trajectories,
)
from tokenreduce.plugins.vqtoken.training import answer_lengths, batch_loss, prepare_batches, train_attention
from tokenreduce.testing.tiny import EOS, RowSpec, tiny_batch, tiny_model

from .helpers import scene_grid


def _video_layout(frames: int, side: int, newline: bool = False) -> TokenLayout:
    segments = tuple(Segment("frame", side, side, time=t) for t in range(frames))
    if newline:
        segments += (Segment("newline", 1, 0, newline=True, time=frames - 1),)
    return TokenLayout("video", segments)


def test_occupancy_is_the_pooled_one_hot_map_and_follows_motion():
    grid = scene_grid(1, frames=8, side=8)  # one object moving right, changing look at frame 4
    layout = _video_layout(8, 8, newline=True)
    content = layout.content_mask.nonzero().flatten()
    codes = grid.flatten()
    assert torch.equal(index_map(layout, content, codes), grid)
    occ = occupancy(grid_coordinates(layout, content), codes, int(codes.max()) + 1, (4, 2, 2)).view(
        -1, 4, 2, 2
    )
    torch.testing.assert_close(occ.sum(0), torch.ones(4, 2, 2))  # every bin's shares sum to 1
    # look 3 (before the change) lives in time bins 0-1 only, look 4 in bins 2-3 only
    assert occ[3, :2].sum() > 0 and occ[3, 2:].sum() == 0
    assert occ[4, 2:].sum() > 0 and occ[4, :2].sum() == 0
    # static objects occupy every time bin equally
    torch.testing.assert_close(occ[2, 0], occ[2, 3])


def test_occupancy_fills_time_bins_of_short_clips():
    layout = _video_layout(2, 2)
    content = layout.content_mask.nonzero().flatten()
    codes = torch.tensor([0, 1, 1, 1, 0, 0, 1, 1])
    occ = occupancy(grid_coordinates(layout, content), codes, 2, (4, 1, 1)).view(2, 4)
    torch.testing.assert_close(occ[0], torch.tensor([0.25, 0.25, 0.5, 0.5]))


def test_moments_give_each_code_its_mass_and_centroid_per_time_bin(tmp_path):
    bins = (3, 2, 4)
    occ = torch.zeros(3, *bins)
    for t in range(3):  # code 0 walks right one column per time bin, code 1 fills the rest, code 2 is absent
        occ[0, t, :, t] = 1.0
        occ[1, t] = 1.0 - occ[0, t]
    moments = occupancy_moments(occ.flatten(1), bins).view(3, 3, 3)  # [code, (mass, row, col), time]
    torch.testing.assert_close(moments[0, 0], torch.full((3,), 0.25))
    torch.testing.assert_close(moments[0, 1], torch.zeros(3))
    torch.testing.assert_close(moments[0, 2], torch.tensor([-1.0, -1 / 3, 1 / 3]))
    assert torch.all(moments[1, 2, 1:] < moments[1, 2, :-1])  # the rest's centroid drifts the other way
    assert torch.all(moments[2] == 0)
    config = VQAttentionConfig(dim=16, heads=2, bins=bins, hidden=8, moments=True, own_hash=True)
    module = VQAttention(config)
    assert config.hash_features == 24 + 9 and module.hash_mlp[0].in_features == 33
    with torch.no_grad():
        module.own.weight.normal_()
    book = torch.randn(3, 16)
    loaded = VQAttention.from_pretrained(module.save_pretrained(tmp_path))
    assert loaded.config.moments
    torch.testing.assert_close(loaded(book, occ.flatten(1)), module(book, occ.flatten(1)))


def test_trajectories_say_what_joins_and_leaves_a_code_over_time(tmp_path):
    """A code that loses a member half-way: its first time bin's mean holds that member, its second does not;
    an absent code reads zeros. The module reads them when ``trajectory`` > 0 and needs them then only."""
    coords = torch.tensor([[0.1, 0, 0], [0.1, 0, 0.5], [0.6, 0, 0.5], [0.1, 0.5, 0], [0.6, 0.5, 0]])
    codes = torch.tensor([0, 0, 0, 1, 1])
    members = torch.tensor([[1.0, 0.0], [3.0, 2.0], [3.0, 2.0], [5.0, 5.0], [7.0, 5.0]])
    traj = trajectories(coords, codes, members, 3, 2)
    torch.testing.assert_close(traj[0], torch.tensor([[2.0, 1.0], [3.0, 2.0]]))  # member [1, 0] left
    torch.testing.assert_close(traj[1], torch.tensor([[5.0, 5.0], [7.0, 5.0]]))
    assert torch.all(traj[2] == 0)

    config = VQAttentionConfig(dim=16, heads=2, bins=(2, 2, 2), hidden=8, trajectory=2, trajectory_dim=4)
    assert config.hash_features == 8 + 2 * 4
    module = VQAttention(config)
    with torch.no_grad():
        module.out.weight.normal_()
    book, occ = torch.randn(3, 16), torch.rand(3, 8)
    steady = book[:, None].expand(3, 2, 16).clone()
    moving = steady.clone()
    moving[0, 0] += 2.0  # code 0 held something else in its first time bin
    with torch.no_grad():
        assert not torch.allclose(module(book, occ, steady), module(book, occ, moving))
    loaded = VQAttention.from_pretrained(module.save_pretrained(tmp_path))
    torch.testing.assert_close(loaded(book, occ, moving), module(book, occ, moving))
    with pytest.raises(ValueError, match="trajectory"):
        module(book, occ)
    with pytest.raises(ValueError, match="trajectory"):
        VQAttention(VQAttentionConfig(dim=16, heads=2, bins=(2, 2, 2)))(book, occ, steady)
    with pytest.raises(ValueError, match="`trajectory`"):
        VQAttentionConfig(dim=16, trajectory=-1)

    model = tiny_model("llava_onevision")  # the method computes them for a module that reads them
    batches = _answer_batches(model, n_batches=1)
    trained, log = _train(model, batches, 20, module_options={"trajectory": 2})
    assert log[-1]["ce"] < log[0]["ce"]
    batch = {k: v for k, v in batches[0].items() if k != "labels"}
    assert not torch.allclose(_vqtoken_logits(model, batch, trained), _vqtoken_logits(model, batch), atol=1e-4)


def test_changes_show_what_arrived_in_a_code_and_when(tmp_path):
    """A cell turns from look A to look B in frame 2 of 4: the code it joins (B) shows B - A in the time bin
    of frame 2, at full scale although B's other members are static, and nothing elsewhere."""
    layout = _video_layout(4, 2, newline=True)
    content = layout.content_mask.nonzero().flatten()
    look_a, look_b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])
    tokens = look_b.repeat(16, 1)
    tokens[[0, 4]] = look_a  # cell 0 shows A in frames 0 and 1, B from frame 2 on
    codes = (tokens[:, 1] > 0).long()  # code 0: look A, code 1: look B
    diffs = frame_differences(layout, content, tokens)
    assert torch.all(diffs[:4] == 0) and torch.equal(diffs[8], look_b - look_a)
    assert diffs.abs().sum() == (look_b - look_a).abs().sum()  # one cell, one frame
    moved = changes(grid_coordinates(layout, content), codes, diffs, 2, 4)
    torch.testing.assert_close(moved[1, 2], look_b - look_a)
    assert torch.all(moved[0] == 0) and torch.all(moved[1, [0, 1, 3]] == 0)
    uneven = TokenLayout("video", (Segment("frame", 2, 2, time=0), Segment("frame", 1, 4, time=1)))
    assert torch.all(frame_differences(uneven, uneven.content_mask.nonzero().flatten(), tokens[:8]) == 0)

    config = VQAttentionConfig(
        dim=16, heads=2, bins=(2, 2, 2), hidden=8, trajectory=2, trajectory_dim=4, changes=True, blocks=1
    )
    assert config.hash_features == 8 + 2 * 4 * 2
    module = VQAttention(config)
    book, occ = torch.randn(3, 16), torch.rand(3, 8)
    traj, still = book[:, None].expand(3, 2, 16).clone(), torch.zeros(3, 2, 16)
    torch.testing.assert_close(module(book, occ, traj, still), book)  # new blocks start as the identity
    with torch.no_grad():
        module.out.weight.normal_()
        module.blocks[0].out.weight.normal_()
    arrived = still.clone()
    arrived[1, 1] = 3.0
    with torch.no_grad():
        assert not torch.allclose(module(book, occ, traj, still), module(book, occ, traj, arrived))
    loaded = VQAttention.from_pretrained(module.save_pretrained(tmp_path))
    torch.testing.assert_close(loaded(book, occ, traj, arrived), module(book, occ, traj, arrived))
    with pytest.raises(ValueError, match="changes"):
        module(book, occ, traj)
    with pytest.raises(ValueError, match="`changes`=True needs `trajectory`"):
        VQAttentionConfig(dim=16, changes=True)
    with pytest.raises(ValueError, match="`blocks`"):
        VQAttentionConfig(dim=16, blocks=-1)

    model = tiny_model("llava_onevision")  # the method computes them for a module that reads them
    batches = _answer_batches(model, n_batches=1)
    trained, log = _train(model, batches, 20, module_options={"trajectory": 2, "changes": True, "blocks": 1})
    assert log[-1]["ce"] < log[0]["ce"]
    blind = copy.deepcopy(trained)  # reads no change: the method fed nonzero ones
    with torch.no_grad():
        blind.change.weight.zero_()
    batch = {k: v for k, v in batches[0].items() if k != "labels"}
    assert not torch.allclose(_vqtoken_logits(model, batch, trained), _vqtoken_logits(model, batch, blind))


def test_anchors_first_and_representative():
    codes = torch.tensor([2, 0, 2, 0, 3])
    sim = torch.tensor([0.5, 0.9, 0.8, 0.95, 1.0])
    assert anchors(codes, sim, 4, "first").tolist() == [1, -1, 0, 4]
    assert anchors(codes, sim, 4, "representative").tolist() == [3, -1, 2, 4]
    with pytest.raises(ValueError, match="`anchor`"):
        anchors(codes, sim, 4, "last")


@pytest.mark.parametrize("own_hash", [False, True], ids=["paper", "own_hash_rms"])
def test_untrained_module_is_the_codebook_and_save_load_round_trips(tmp_path, own_hash):
    config = VQAttentionConfig(
        dim=16, heads=2, bins=(2, 2, 2), hidden=8, own_hash=own_hash, rms_residual=own_hash
    )
    module = VQAttention(config)
    book, occ = torch.randn(5, 16), torch.rand(5, 8)
    torch.testing.assert_close(module(book, occ), book)  # zero-initialised output projections
    with torch.no_grad():
        module.out.weight.normal_()
        module.ffn[-1].weight.normal_()
        if own_hash:
            module.own.weight.normal_()
    out = module(book, occ)
    assert not torch.allclose(out, book)
    module.save_pretrained(tmp_path, note="test")
    loaded = VQAttention.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded(book, occ), out)
    assert VQAttention.metadata(tmp_path) == {"note": "test"}
    with pytest.raises(ValueError, match="occupancy"):
        module(book, torch.rand(5, 7))
    with pytest.raises(ValueError, match="divisible"):
        VQAttentionConfig(dim=10, heads=4)


def _answer_batches(model, n_batches: int = 2, rows: int = 4):
    out = []
    for b in range(n_batches):
        batch = tiny_batch(
            model, [RowSpec(videos=[4], prefix=3, suffix=2, seed=10 * b + i) for i in range(rows)]
        )
        answer = torch.randint(3, 990, (rows, 1), generator=torch.Generator().manual_seed(b))
        batch["input_ids"] = torch.cat([batch["input_ids"], answer, torch.full((rows, 1), EOS)], 1)
        batch["attention_mask"] = torch.cat(
            [batch["attention_mask"], torch.ones(rows, 2, dtype=torch.long)], 1
        )
        labels = torch.full_like(batch["input_ids"], -100)
        labels[:, -2:] = batch["input_ids"][:, -2:]
        batch["labels"] = labels
        out.append(batch)
    return out


def _vqtoken_logits(model, batch, module=None, **options):
    """Last-position logits of ``vqtoken`` at keep 3, with ``module`` set on the wrapped model."""
    tr.wrap(model, "vqtoken", keep=3, **options)
    try:
        if module is not None:
            get_handle(model).method.set_attention(module)
        with torch.no_grad():
            return model(**batch).logits[:, -1]
    finally:
        tr.unwrap(model)


def _train(model, batches, steps: int, **options):
    """``train_attention`` at keep 3 with a small module (``module_options`` merged into it)."""
    module_options = {"hidden": 32, "bins": (4, 2, 2), **options.pop("module_options", {})}
    options = {"keep": 3, "lr": 1e-2, "warmup": 2, "log_every": steps - 1, **options}
    # read once, batch by batch, as the script streams them
    return train_attention(model, iter(batches), steps=steps, module_options=module_options, **options)


def test_training_lowers_the_answer_loss_and_the_module_loads_into_wrap(tmp_path):
    model = tiny_model("llava_onevision")
    batches = _answer_batches(model, n_batches=1)
    module, log = _train(model, batches, 30, distill=0.5)
    assert get_handle(model) is None and not any(p.requires_grad for p in model.parameters())
    first, last = log[0], log[-1]
    assert last["ce"] < first["ce"] - 0.03 and "kl" in last
    module.save_pretrained(tmp_path)
    batch = {k: v for k, v in batches[0].items() if k != "labels"}
    trained = _vqtoken_logits(model, batch, attention=str(tmp_path))
    codebook_only = _vqtoken_logits(model, batch)
    assert not torch.allclose(trained, codebook_only, atol=1e-4)


def test_answer_lengths_needs_answers_at_the_end():
    labels = torch.tensor([[-100, -100, 5, 2], [-100, 7, -100, 2]])
    with pytest.raises(ValueError, match="row 1"):
        answer_lengths(labels)
    assert answer_lengths(labels[:1]).tolist() == [2]


def test_llm_adapters_train_travel_with_the_module_and_unwrap_removes_them(tmp_path):
    model = tiny_model("llava_onevision")
    batches = _answer_batches(model, n_batches=1)
    batch = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        before = model(**batch).logits
    module, _ = _train(
        model,
        batches,
        20,
        distill=0.0,
        module_options={"llm_rank": 2, "llm_targets": ("q_proj", "down_proj")},
    )
    layers = model.config.text_config.num_hidden_layers
    assert [n.rsplit(".", 1)[-1] for n, _, _ in module.config.llm_modules] == ["q_proj", "down_proj"] * layers
    assert all(float(d.b.abs().max()) > 0 for d in module.llm.values())  # every adapter was trained
    module.save_pretrained(tmp_path)
    assert VQAttention.from_pretrained(tmp_path).config.llm_modules == module.config.llm_modules

    loaded = _vqtoken_logits(model, batch, attention=str(tmp_path))
    torch.testing.assert_close(loaded, _vqtoken_logits(model, batch, module))
    without = copy.deepcopy(module)
    with torch.no_grad():
        for delta in without.llm.values():
            delta.b.zero_()
    # the same code tokens read by the LLM with and without its adapters
    assert not torch.allclose(loaded, _vqtoken_logits(model, batch, without), atol=1e-4)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)  # unwrap left no adapter behind


def test_llm_adapters_check_the_language_model():
    language_model = get_adapter(tiny_model("llava_onevision")).language_model
    config = VQAttentionConfig(dim=64, llm_rank=2, llm_modules=(("layers.0.self_attn.q_proj", 64, 99),))
    with pytest.raises(ValueError, match="q_proj"):
        VQAttention(config).adapt_llm(language_model)
    config = VQAttentionConfig(dim=64, llm_rank=2, llm_modules=(("layers.0.nowhere", 64, 64),))
    with pytest.raises(ValueError, match="nowhere"):
        VQAttention(config).adapt_llm(language_model)
    with pytest.raises(ValueError, match="llm_modules"):
        VQAttentionConfig(dim=64, llm_rank=2)


def test_own_hash_gives_each_code_its_own_map():
    """With the attention output off, a code token changes with its own occupancy only."""
    module = VQAttention(
        VQAttentionConfig(dim=16, heads=2, bins=(2, 2, 2), hidden=8, own_hash=True, ffn=False)
    )
    with torch.no_grad():
        module.own.weight.normal_()
    book, occ = torch.randn(4, 16), torch.rand(4, 8)
    moved = occ.clone()
    moved[2] = occ[2].flip(0)
    changed = (module(book, moved) - module(book, occ)).abs().amax(1)
    assert changed[2] > 1e-4 and torch.all(changed[[0, 1, 3]] == 0)


@pytest.mark.parametrize("rms_residual", [False, True])
def test_rms_residual_updates_at_the_scale_of_the_codes(rms_residual):
    """Queries and keys read normalised codes, so the attention's update is the same for a codebook and ten
    times it; with ``rms_residual`` it is added in units of each code's RMS, so it grows with the codes."""
    module = VQAttention(
        VQAttentionConfig(dim=16, heads=2, bins=(2, 2, 2), hidden=8, ffn=False, rms_residual=rms_residual)
    )
    with torch.no_grad():
        module.out.weight.normal_()
    book, occ = torch.randn(4, 16), torch.rand(4, 8)
    with torch.no_grad():
        small, large = module(book, occ) - book, module(10 * book, occ) - 10 * book
    torch.testing.assert_close(large, 10 * small if rms_residual else small, atol=1e-4, rtol=1e-4)


def test_hidden_distillation_matches_the_teachers_states():
    """The hidden-state term is 0 for the teacher itself and falls as the module learns."""
    model = tiny_model("llava_onevision")
    batches = _answer_batches(model, n_batches=1)
    cached = prepare_batches(model, iter(batches), distill=False, hidden=True)
    layers = model.config.text_config.num_hidden_layers
    assert cached[0].teacher is None and cached[0].teacher_hidden.shape[:2] == (4, layers)
    # one code per token at original positions is the identity: the student is the teacher
    tr.wrap(model, "vqtoken", keep=1.0, renumber_positions=False, keep_newline=True)
    try:
        with torch.no_grad():
            _, stats = batch_loss(model, cached[0], distill=0.0, hidden_distill=1.0)
    finally:
        tr.unwrap(model)
    assert stats["hidden"] < 1e-8
    _, log = _train(model, batches, 30, distill=0.0, hidden_distill=20.0, lr=3e-3)
    assert log[-1]["hidden"] < 0.7 * log[0]["hidden"]
