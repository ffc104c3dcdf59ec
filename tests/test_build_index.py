"""gill-hf build-index: sources, skip-and-count, resume after a kill (bit for bit), FAISS exact / IVF-PQ beside."""

import io
import json
import math
import os
import tarfile
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gill_hf import cli
from gill_hf.index_building import (BUILD_FOLDER, ImageFolderSource, TSVSource, WebDatasetSource, build_index,
                                    open_source)
from gill_hf.retrieval import FAISS_FILE, RetrievalIndex, embed_images

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (90, 90, 90),
           (200, 120, 40), (10, 200, 150)]


@pytest.fixture(scope="module")
def model(make_model):
    return make_model("opt").eval()


def _png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 16), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def folder(tmp_path):
    """9 images (one in a sub-folder) and one broken .png, which is skipped."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for i, colour in enumerate(COLOURS):
        (root / ("sub" if i == 4 else "") / f"img{i}.png").write_bytes(_png(colour))
    (root / "broken.png").write_bytes(b"not an image")
    (root / "notes.txt").write_text("not listed")
    return root


def _add(tar, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path):
    """Two img2dataset-style shards of the 9 images; one extra sample has a caption but no image."""
    paths = [tmp_path / "00000.tar", tmp_path / "00001.tar"]
    for s, path in enumerate(paths):
        with tarfile.open(path, "w") as tar:
            for i in range(s * 5, min(9, s * 5 + 5)):
                key = f"{i:09d}"
                _add(tar, f"{key}.jpg", _png(COLOURS[i]))
                _add(tar, f"{key}.txt", b"a caption")
                _add(tar, f"{key}.json", json.dumps({"url": f"http://x/{i}.jpg", "key": key}).encode())
            if s == 0:
                _add(tar, "000000099.txt", b"no image here")
    return [str(p) for p in paths]


class _KilledAfter:
    """An embedder that raises after ``n`` batches (a killed process), counting its calls."""

    def __init__(self, embed, n: int | None = None):
        self.embed, self.n, self.calls = embed, n, 0

    def __call__(self, images):
        if self.n is not None and self.calls == self.n:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        return self.embed(images)


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_killed_build_resumes_and_equals_an_uninterrupted_one(model, folder, shards, tmp_path, kind):
    source = ImageFolderSource(folder) if kind == "folder" else WebDatasetSource(shards)
    embed = partial(embed_images, model)
    settings = dict(logit_scale=1.5, batch_size=2, part_size=4, progress=False)
    whole = build_index(embed, source, tmp_path / "whole", **settings)
    assert whole.num_records == 10 and whole.num_skipped == 1 and len(whole.index) == 9

    killed = _KilledAfter(embed, n=3)  # part 0 (2 batches) saved, part 1 half done
    with pytest.raises(KeyboardInterrupt):
        build_index(killed, source, tmp_path / "resumed", **settings)
    assert sorted(os.listdir(tmp_path / "resumed" / BUILD_FOLDER)) == ["build.json", "part-000000.safetensors"]
    resumed_embed = _KilledAfter(embed)
    resumed = build_index(resumed_embed, source, tmp_path / "resumed", **settings)
    assert (resumed.num_records, resumed.num_skipped) == (10, 1)  # counts of the saved part included
    assert resumed_embed.calls == 5 - 2  # 5 batches in all; the saved part's 2 are not redone
    assert not os.path.exists(tmp_path / "resumed" / BUILD_FOLDER)

    loaded = RetrievalIndex.load(tmp_path / "resumed")
    assert torch.equal(loaded.embeddings, whole.index.embeddings)
    assert loaded.paths == whole.index.paths and len(set(loaded.paths)) == 9
    assert loaded.logit_scale == 1.5
    if kind == "folder":
        expected = sorted(os.path.relpath(os.path.join(root, n), folder) for root, _, names in os.walk(folder)
                          for n in names if n.endswith(".png") and n != "broken.png")
        assert loaded.paths == [os.path.join(str(folder), p) for p in expected]
    else:
        assert loaded.paths == [f"http://x/{i}.jpg" for i in range(9)]  # json url; imageless sample skipped
    # rows are the model's own embeddings of the same images, in that order (one batch of 9: not bit-equal)
    images = [Image.open(io.BytesIO(_png(COLOURS[i]))) for i in range(9)] if kind == "shards" else loaded.paths
    torch.testing.assert_close(loaded.embeddings.float(), embed_images(model, images), atol=1e-3, rtol=0)


def test_resume_with_other_settings_or_into_a_finished_index_is_refused(model, folder, tmp_path):
    embed = partial(embed_images, model)
    with pytest.raises(KeyboardInterrupt):
        build_index(_KilledAfter(embed, n=2), ImageFolderSource(folder), tmp_path / "out", batch_size=2,
                    part_size=2, progress=False)
    with pytest.raises(ValueError, match=r"unfinished build of another source or settings \(\['batch_size'"):
        build_index(embed, ImageFolderSource(folder), tmp_path / "out", batch_size=1, part_size=2, progress=False)
    build_index(embed, ImageFolderSource(folder), tmp_path / "done", batch_size=3, part_size=3, progress=False)
    with pytest.raises(ValueError, match="already holds a finished retrieval index"):
        build_index(embed, ImageFolderSource(folder), tmp_path / "done", batch_size=3, part_size=3, progress=False)
    with pytest.raises(ValueError, match="part_size a multiple"):
        build_index(embed, ImageFolderSource(folder), tmp_path / "x", batch_size=2, part_size=3)
    with pytest.raises(ValueError, match=r"unknown faiss_options \['nprobes'\]"):
        build_index(embed, ImageFolderSource(folder), tmp_path / "x", faiss="ivfpq", faiss_options={"nprobes": 2})
    assert not os.path.exists(tmp_path / "x")  # refused before anything is written


def test_tsv_source_resolves_names_and_skips_missing_files(model, folder, tmp_path):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("caption\tfile\nred\timg0.png\ngreen\timg1\nmissing\tnope.png\n")  # img1: suffix tried
    built = build_index(partial(embed_images, model), TSVSource(tsv, "file", str(folder)), tmp_path / "out",
                        batch_size=2, part_size=2, progress=False)
    assert built.index.paths == [str(folder / "img0.png"), str(folder / "img1.png")] and built.num_skipped == 1


def test_bad_sources_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"empty holds no images \(looked for .jpg"):
        ImageFolderSource(tmp_path / "empty")
    tsv = tmp_path / "c.tsv"
    tsv.write_text("caption\turl\na\tb.png\n")
    with pytest.raises(ValueError, match=r"c.tsv: header \['caption', 'url'\] lacks the image column 'image'"):
        TSVSource(tsv)
    tsv.write_text("caption\timage\na\t../up.png\n")
    with pytest.raises(ValueError, match=r"c.tsv, line 2: image path '../up.png' leaves the image folder"):
        TSVSource(tsv)
    (tmp_path / "fake.tar").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="fake.tar is not a tar file"):
        WebDatasetSource([str(tmp_path / "fake.tar")])
    with pytest.raises(ValueError, match="exactly one of images, tsv, shards"):
        open_source(images=str(tmp_path), tsv=str(tsv))


def test_all_images_unusable_is_an_error(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"no usable image among the 1 records \(1 skipped"):
        build_index(lambda images: None, ImageFolderSource(tmp_path / "bad"), tmp_path / "out", batch_size=1,
                    part_size=1, progress=False)


# ---------------------------------------------------------------- FAISS
def _clustered(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit rows around 50 centres (real embeddings cluster) and 40 queries near random rows."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(50, dim, generator=g)
    rows = centres[torch.randint(50, (n,), generator=g)] + 0.5 * torch.randn(n, dim, generator=g)
    queries = rows[torch.randint(n, (40,), generator=g)] + 0.3 * torch.randn(40, dim, generator=g)
    return F.normalize(rows, dim=-1), queries


def test_faiss_flat_equals_the_exact_scan_and_round_trips(tmp_path):
    pytest.importorskip("faiss")
    rows, queries = _clustered(3000, 32, seed=0)
    index = RetrievalIndex(rows, [f"{i}.jpg" for i in range(3000)], logit_scale=2.0, dtype=torch.float32)
    exact_scores, exact_idx = index.search(queries, k=5)
    index.use_faiss("flat")
    scores, idx = index.search(queries, k=5)
    assert torch.equal(idx, exact_idx)
    torch.testing.assert_close(scores, exact_scores, rtol=1e-5, atol=1e-5)
    index.save(tmp_path)
    loaded = RetrievalIndex.load(tmp_path)
    assert loaded._faiss is not None and loaded._faiss.ntotal == 3000
    assert torch.equal(loaded.search(queries, k=5)[1], exact_idx)
    assert RetrievalIndex.load(tmp_path, faiss_index=False)._faiss is None
    RetrievalIndex.load(tmp_path, faiss_index=False).save(tmp_path)  # saved without FAISS: the stale file goes
    assert not os.path.exists(tmp_path / FAISS_FILE)
    with pytest.raises(FileNotFoundError, match="no faiss.index in"):
        RetrievalIndex.load(tmp_path, faiss_index=True)


def test_ivfpq_recall_at_5_against_exact(tmp_path):
    pytest.importorskip("faiss")
    rows, queries = _clustered(4000, 64, seed=1)
    index = RetrievalIndex(rows, [str(i) for i in range(4000)], dtype=torch.float16)
    _, exact_idx = index.search(queries, k=5)
    index.use_faiss("ivfpq", nlist=32, nprobe=8)
    assert type(index._faiss).__name__ == "IndexIVFPQ" and index._faiss.pq.M == 16  # 64 / 4 sub-quantisers
    scores, idx = index.search(queries, k=5)
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(idx, exact_idx)) / exact_idx.numel()
    assert recall >= 0.95, recall  # PQ alone: ~0.6 here; the exact re-rank of 50 candidates lifts it
    index.save(tmp_path)
    loaded = RetrievalIndex.load(tmp_path)
    assert loaded._faiss.nprobe == 8
    assert torch.equal(loaded.search(queries, k=5)[1], idx)  # the trained index itself round-trips


def test_faiss_file_faults_are_named(tmp_path):
    faiss = pytest.importorskip("faiss")
    rows, _ = _clustered(100, 16, seed=2)
    RetrievalIndex(rows, [str(i) for i in range(100)]).save(tmp_path)
    (tmp_path / FAISS_FILE).write_bytes(b"garbage" * 20)
    with pytest.raises(ValueError, match="faiss.index is not a readable FAISS index"):
        RetrievalIndex.load(tmp_path)
    short = faiss.IndexFlatIP(16)
    short.add(rows[:50].numpy())
    faiss.write_index(short, str(tmp_path / FAISS_FILE))
    with pytest.raises(ValueError, match="faiss.index: the FAISS index holds 50 rows but the embeddings 100"):
        RetrievalIndex.load(tmp_path)
    with pytest.raises(ValueError, match="unknown FAISS index kind 'hnsw'"):
        RetrievalIndex(rows, [str(i) for i in range(100)]).use_faiss("hnsw")


def test_ivfpq_short_results_fall_back_to_the_exact_scan():
    pytest.importorskip("faiss")
    rows, queries = _clustered(1000, 16, seed=3)
    index = RetrievalIndex(rows, [str(i) for i in range(1000)], dtype=torch.float32)
    exact = index.search(queries, k=50)
    index.use_faiss("ivfpq", nlist=100, nprobe=1, pq_m=4)  # one of 100 cells: often fewer than 50 candidates
    assert (torch.from_numpy(index._faiss.search(F.normalize(queries).numpy(), 50)[1]) < 0).any()
    scores, idx = index.search(queries, k=50)
    assert (idx >= 0).all()
    short = (torch.from_numpy(index._faiss.search(F.normalize(queries).numpy(), 50)[1]) < 0).any(dim=1)
    assert torch.equal(idx[short], exact[1][short])


# ---------------------------------------------------------------- command line
def test_cli_builds_with_faiss_and_checks_before_loading(model, folder, tmp_path, capsys):
    pytest.importorskip("faiss")
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    out = tmp_path / "index"
    assert cli.main(["build-index", str(model_dir), str(out), "--images", str(folder), "--batch-size", "2",
                     "--part-size", "4", "--faiss", "flat", "--no-progress", "--device", "cpu"]) == 0
    assert "retrieval index of 9 images" in capsys.readouterr().out
    loaded = RetrievalIndex.load(out)
    assert loaded._faiss.ntotal == 9 and math.isclose(loaded.logit_scale, model.adapter.logit_scale.item())
    torch.testing.assert_close(loaded.embeddings.float(), embed_images(model, loaded.paths), atol=1e-3, rtol=0)

    not_a_model = tmp_path / "not_a_model"  # an empty folder: the checks below fail before anything loads
    not_a_model.mkdir()
    (tmp_path / "none").mkdir()
    other = str(tmp_path / "o")
    cases = [(other, ["--images", str(tmp_path / "none")], "holds no images"),
             (other, ["--images", str(folder), "--nlist", "4"], "--nlist apply to --faiss ivfpq only"),
             (other, ["--images", str(folder), "--batch-size", "3"], "--part-size must be a multiple of --batch-size"),
             (other, ["--images", str(folder), "--image-dir", str(folder)], "--image-dir applies to --tsv only"),
             (other, ["--images", str(folder), "--image-column", "x"], "--image-column applies to --tsv only"),
             (other, ["--shards", str(tmp_path / "missing.tar")], "no such file or folder"),
             (str(out), ["--images", str(folder)], "already holds a finished retrieval index")]
    for target, extra, message in cases:
        assert cli.main(["build-index", str(not_a_model), target, *extra]) == 2
        assert message in capsys.readouterr().err


def test_fp16_exact_scan_scores_are_fp32_over_the_stored_rows():
    rows, queries = _clustered(3000, 64, seed=4)
    index = RetrievalIndex(rows, [str(i) for i in range(3000)], logit_scale=0.0, dtype=torch.float16)
    scores, idx = index.search(queries, k=5, chunk_size=1000)
    reference = F.normalize(queries, dim=-1) @ index.embeddings.float().t()  # fp32 over the fp16-stored rows
    torch.testing.assert_close(scores, reference.gather(1, idx), atol=1e-6, rtol=0)  # no fp16 output rounding
    assert torch.equal(idx, reference.topk(5, dim=1).indices)


def test_faiss_fp16_is_exact_over_the_fp16_rows(tmp_path):
    faiss = pytest.importorskip("faiss")
    rows, queries = _clustered(3000, 32, seed=5)
    index = RetrievalIndex(rows, [str(i) for i in range(3000)], dtype=torch.float16)
    exact_scores, exact_idx = index.search(queries, k=5)
    index.use_faiss("fp16").save(tmp_path)
    loaded = RetrievalIndex.load(tmp_path)
    assert isinstance(loaded._faiss, faiss.IndexScalarQuantizer) and loaded._rerank == 1  # exact: no re-rank
    scores, idx = loaded.search(queries, k=5)
    assert torch.equal(idx, exact_idx)
    torch.testing.assert_close(scores, exact_scores, atol=1e-6, rtol=0)  # both fp32 over the same fp16 rows
    with pytest.raises(TypeError, match="the exact FAISS indexes take no options"):
        index.use_faiss("fp16", nlist=4)
