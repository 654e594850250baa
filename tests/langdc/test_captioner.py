"""The captioner: KV-cached greedy captions against a plain re-computing loop, rows of a batch against rows
alone, teacher forcing against generation, and the analytic FLOPs against torch's FLOP counter."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from tokenreduce.plugins.langdc import Captioner, CaptionerConfig

LM = dict(vocab_size=12, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
          num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)


def _captioner(eos=2, **overrides):
    config = CaptionerConfig(vlm_hidden=24, eos_token_id=eos, hidden_layer=2, max_caption_tokens=7, prompt_ids=(1, 5),
                             **overrides)
    return Captioner.build(config, LM, seed=4).eval()


def _naive(captioner, visual, limit):
    """Greedy decoding that re-reads the whole sequence at every step (no cache)."""
    cfg = captioner.config
    embeds = captioner.prefix(visual[None])
    ids, hidden = [], []
    with torch.no_grad():
        for _ in range(limit + 1):
            out = captioner.lm(inputs_embeds=embeds, output_hidden_states=True)
            if ids:
                hidden.append(out.hidden_states[cfg.hidden_layer][0, -1])
            token = int(out.logits[0, -1].argmax())
            if token == cfg.eos_token_id or len(ids) == limit:
                break
            ids.append(token)
            embeds = torch.cat([embeds, captioner.lm.get_input_embeddings()(torch.tensor([[token]]))], 1)
    return ids, hidden


def test_cached_greedy_equals_recomputing_loop_and_rows_alone():
    visual = torch.randn(6, 10, 24, generator=torch.Generator().manual_seed(0)) * 3
    # the EOS id with the most varied stopping steps over these inputs, so rows stop at different times
    lengths = {}
    for eos in range(3, 12):
        lengths[eos] = [len(ids) for ids in _captioner(eos).generate(visual).ids]
    eos = max(lengths, key=lambda e: len(set(lengths[e])))
    assert len(set(lengths[eos])) > 1, lengths
    captioner = _captioner(eos)
    batch = captioner.generate(visual)
    assert batch.prefix_tokens == 12
    for r in range(visual.shape[0]):
        ids, hidden = _naive(captioner, visual[r], 7)
        assert batch.ids[r] == ids
        assert eos not in ids and len(ids) <= 7
        if ids:
            torch.testing.assert_close(batch.hidden[r], torch.stack(hidden), atol=1e-5, rtol=1e-4)
        alone = captioner.generate(visual[r : r + 1])
        assert alone.ids[0] == batch.ids[r]
        torch.testing.assert_close(alone.hidden[0], batch.hidden[r], atol=1e-5, rtol=1e-4)
    # teacher forcing the generated captions reads the same hidden states
    _, targets, forced = captioner.teacher_force(visual, batch.ids)
    for r in range(visual.shape[0]):
        torch.testing.assert_close(forced[r], batch.hidden[r], atol=1e-5, rtol=1e-4)
        assert targets[r][targets[r] != -100].tolist() == [*batch.ids[r], eos]
    assert [len(i) for i in captioner.generate(visual, max_tokens=2).ids] == [min(2, n) for n in lengths[eos]]


def test_analytic_flops_match_the_counted_matrix_products():
    captioner = _captioner(eos=99)  # never emitted: the caption runs to the limit
    captioner.config.max_caption_tokens = 4
    visual = torch.randn(1, 10, 24)
    counter = FlopCounterMode(display=False)
    with counter:
        out = captioner.generate(visual)
        captioner.soft_tokens(out.hidden[0])
    assert len(out.ids[0]) == 4
    counts = counter.get_flop_counts()["Global"]
    linear = sum(v for k, v in counts.items() if str(k).split(".")[1] in ("mm", "addmm", "bmm", "linear"))
    parts = captioner.flops_breakdown(10, 4)
    # every counted matrix product is a projection, an LM linear layer or the LM head (the counter does not
    # see CPU SDPA: attention is counted analytically, causal, as Geometry counts the VLM's prefill)
    assert linear == parts["projectors"] + parts["lm_linear"] + parts["lm_head"]
    assert parts["lm_attention"] == 3 * 2 * 2 * (12 * 13 / 2 + 13 + 14 + 15 + 16) * 32
    assert captioner.flops(10, 4) == sum(parts.values())
    assert captioner.flops(10, 5) > captioner.flops(10, 4) > captioner.flops(10, 0)
