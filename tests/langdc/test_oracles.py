"""Foundation oracles with variable per-sample token counts: forward and generate equal the unwrapped
model on the reduced sequence built independently from the recorded reductions, and every row of a batch
equals that row alone, on every family with video."""

import pytest
import torch

import tokenreduce as tr
from tokenreduce.plugins.langdc import LangDCConfig
from tokenreduce.testing.tiny import default_rows, tiny_batch

from ..reference import recorded_reductions, reduced_rows, reference_generate, reference_logits
from .helpers import SEGMENT_FRAMES, VIDEO_FAMILIES, target_caption


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_forward_generate_and_rows_alone(tiny_setup, family):
    model, path, _ = tiny_setup(family)
    rows = default_rows(family, video=True)
    batch = tiny_batch(model, rows)
    tr.wrap(model, LangDCConfig(captioner=path, base_keep=0.25, segment_frames=SEGMENT_FRAMES[family]))
    try:
        with torch.no_grad():
            logits = model(**batch).logits
        recorded = recorded_reductions(model)
        stats = tr.stats(model).last
        with torch.no_grad():
            tokens = model.generate(**batch, max_new_tokens=6, do_sample=False)
        alone, alone_info = [], []
        for r in range(len(rows)):
            one = tiny_batch(model, rows[r : r + 1])
            with torch.no_grad():
                alone.append(model(**one).logits[0])
            alone_info.append([it.info for it in tr.stats(model).last[0].items if it.modality == "video"])
    finally:
        tr.unwrap(model)

    # captions (and so token counts) differ per segment and per sample, as the captioner was fitted
    videos = [[it for it in s.items if it.modality == "video"] for s in stats]
    for r, items in enumerate(videos):
        assert items[0].info["caption_tokens"] == [len(target_caption(r, s)) for s in range(2)]
        assert alone_info[r][0]["captions"] == items[0].info["captions"]
    counts = [items[0].tokens_out for items in videos]
    assert len(set(counts)) == len(counts), counts
    assert counts[2] - counts[0] == 4  # 5 vs 1 caption tokens, same base branch

    refs = reduced_rows(model, None, batch, recorded=recorded)
    for r, (emb, pos, _) in enumerate(refs):
        ref = reference_logits(model, emb, pos)
        torch.testing.assert_close(logits[r, -ref.shape[0]:], ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(alone[r], ref, atol=1e-4, rtol=1e-4)
        assert tokens[r, -6:].tolist() == reference_generate(model, emb, pos, 6).tolist()
    assert torch.equal(tokens[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    assert logits.shape[1] == max(ref[0].shape[0] for ref in refs)
