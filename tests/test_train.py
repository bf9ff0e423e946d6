"""pecm.train on a handful of the shipped ROCO pairs with a tiny model: loss, metrics JSON, loss curve,
resumable checkpoints (a resumed run ends in exactly the state of an uninterrupted one), end-to-end mode and
the evaluation helpers against metrics computed from `pecm.reference` scores."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from pecm import reference
from pecm.data import load_pairs
from pecm.data.layouts import SAMPLE_ROCO
from pecm.metrics import recall_at_k
from pecm.model import PECM, PECMConfig
from pecm.train import (
    TrainConfig,
    evaluate_features,
    evaluate_prototypes,
    extract_features,
    label_matrix,
    prototypes_from_features,
    train,
)


@pytest.fixture(scope="module")
def pairs():
    return load_pairs(SAMPLE_ROCO, limit=24)


@pytest.fixture(scope="module")
def fitted(pairs):
    m = PECM(PECMConfig.tiny(), load_pretrained=False)
    m.text.fit(pairs.texts)
    return m


@pytest.fixture(scope="module")
def feats(fitted, pairs):
    return extract_features(fitted, pairs, batch=12, progress=False)


def _fresh(fitted):
    """A fresh tiny model sharing the fitted Doc2Vec/tokenizer (what the features were extracted with)."""
    m = PECM(PECMConfig.tiny(), load_pretrained=False)
    m.text.doc2vec, m.text.tokenizer = fitted.text.doc2vec, fitted.text.tokenizer
    return m


def _cfg(**kw):
    base = dict(epochs=4, batch_size=8, lr=3e-3, progress=False, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def test_extract_features_shapes(feats, pairs, fitted):
    n, k = len(pairs), fitted.config.K
    assert feats["img"].shape == (n, k, fitted.image.dim) and feats["txt"].shape == (n, k, fitted.text.dim)
    assert feats["txt_mask"].dtype == torch.bool and bool(feats["txt_mask"][:, 0].all())


def test_tiny_training_run_writes_metrics_curve_checkpoint(fitted, pairs, feats, tmp_path):
    m = _fresh(fitted)
    hist = train(m, pairs, str(tmp_path), _cfg(), train_feats=feats)
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    losses = [h["train"]["loss"] for h in hist]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert set(hist[0]["train"]) >= {"loss", "sim", "conf", "div"}
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert [h["epoch"] for h in saved] == [1, 2, 3, 4] and saved[-1]["train"]["loss"] == pytest.approx(losses[-1])
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"config.json", "model.safetensors", "doc2vec.json", "doc2vec.safetensors", "train_state.pt"} <= set(
        os.listdir(tmp_path)
    )
    # the lr follows the cosine schedule down from lr
    assert hist[0]["lr"] < 3e-3 and hist[-1]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_training_without_matplotlib_skips_the_curve(fitted, pairs, feats, tmp_path, monkeypatch, caplog):
    """matplotlib is only the [plot] extra: training works without it and says that loss_curve.png is skipped."""
    import sys

    import pecm.train as T

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    monkeypatch.setattr(T, "_PLOT_WARNED", False)
    with caplog.at_level("WARNING", logger="pecm.train"):
        train(_fresh(fitted), pairs, str(tmp_path), _cfg(epochs=2), train_feats=feats)
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "model.safetensors").is_file()
    assert not (tmp_path / "loss_curve.png").exists()
    assert caplog.text.count("matplotlib is not installed") == 1  # once, not per epoch


def test_resume_continues_with_identical_state(fitted, pairs, feats, tmp_path, monkeypatch):
    full = _fresh(fitted)
    h_full = train(full, pairs, str(tmp_path / "full"), _cfg(), train_feats=feats)

    # a 4-epoch run killed right after its epoch-2 checkpoint ...
    import pecm.train as T

    class Killed(Exception):
        pass

    real = T.save_training

    def save_then_die(model, out_dir, opt, sched, epoch, history, cfg, best=None):
        real(model, out_dir, opt, sched, epoch, history, cfg, best)
        if epoch + 1 == 2:
            raise Killed

    monkeypatch.setattr(T, "save_training", save_then_die)
    with pytest.raises(Killed):
        train(_fresh(fitted), pairs, str(tmp_path / "run"), _cfg(), train_feats=feats)
    monkeypatch.setattr(T, "save_training", real)
    st = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)
    assert st["epoch"] == 1 and len(st["history"]) == 2

    # ... and resumed from its checkpoint ends in exactly the uninterrupted state
    resumed = PECM.load(str(tmp_path / "run"))
    h_res = train(resumed, pairs, str(tmp_path / "run"), _cfg(resume=True), train_feats=feats)
    assert [h["epoch"] for h in h_res] == [1, 2, 3, 4]
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert h_res[-1]["train"]["loss"] == pytest.approx(h_full[-1]["train"]["loss"], rel=1e-6)
    assert len(json.loads((tmp_path / "run" / "metrics.json").read_text())) == 4


def test_end_to_end_mode_updates_the_backbone(fitted, pairs, tmp_path):
    m = PECM(PECMConfig.tiny(freeze_image=False), load_pretrained=False)
    m.text.doc2vec, m.text.tokenizer = fitted.text.doc2vec, fitted.text.tokenizer
    before = {k: v.clone() for k, v in m.image.state_dict().items() if v.dtype.is_floating_point}
    hist = train(m, pairs.subset(range(8)), str(tmp_path), _cfg(epochs=1, batch_size=4))
    assert np.isfinite(hist[0]["train"]["loss"])
    after = m.image.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_extensions_train_attend_slots_kappa_and_theta_lr(fitted, pairs, feats, tmp_path):
    """image_slots="attend" + L_cnce + theta_lr: trains (the attention queries move), the loss dict has the new
    term, and theta (its own Adam group with lr * theta_lr) moves theta_lr times further than with the same lr."""
    moves = {}
    for lr_mult in (1.0, 50.0):
        m = PECM(PECMConfig.tiny(image_slots="attend"), load_pretrained=False)
        m.text.doc2vec, m.text.tokenizer = fitted.text.doc2vec, fitted.text.tokenizer
        q0 = m.image_attend.query.detach().clone()
        cfg = _cfg(epochs=1, lr=1e-4, kappa=0.5, nu=0.5, theta_lr=lr_mult)
        hist = train(m, pairs, str(tmp_path / str(lr_mult)), cfg, train_feats=feats)
        assert {"cnce", "rank"} <= set(hist[0]["train"]) and np.isfinite(hist[0]["train"]["cnce"])
        assert not torch.equal(q0, m.image_attend.query.detach())
        moves[lr_mult] = float(m.theta.detach().abs().max())
    assert moves[50.0] > 10 * moves[1.0]


def test_image_supcon_term_trains_on_cui_labels(fitted, pairs, feats, tmp_path):
    """rho > 0: the batches carry the pairs' CUI multi-hot labels, the history has the L_img term and it changes
    the trained heads; pairs without any CUI are refused with a ValueError naming rho."""
    assert sum(len(c) for c in pairs.cuis) > 0
    lab = label_matrix(pairs.cuis)
    assert lab.shape == (len(pairs), len({c for cs in pairs.cuis for c in cs}))
    assert [sorted(np.flatnonzero(r.numpy()).tolist()) for r in lab][:3] == [
        sorted(sorted({c for cs in pairs.cuis for c in cs}).index(c) for c in cs) for cs in pairs.cuis[:3]
    ]
    heads = {}
    for rho in (0.0, 1.0):
        m = _fresh(fitted)
        hist = train(m, pairs, str(tmp_path / str(rho)), _cfg(epochs=1, rho=rho), train_feats=feats)
        assert ("img" in hist[0]["train"]) == (rho > 0)
        heads[rho] = m.image_head.state_dict()
    assert np.isfinite(hist[0]["train"]["img"])
    assert any(not torch.equal(heads[0.0][k], heads[1.0][k]) for k in heads[0.0])
    nolab = dataclasses.replace(pairs, pairs=[dataclasses.replace(p, cuis=[]) for p in pairs.pairs])
    with pytest.raises(ValueError, match="rho"):
        train(_fresh(fitted), nolab, str(tmp_path / "x"), _cfg(epochs=1, rho=1.0), train_feats=feats)


@pytest.mark.parametrize("mode", ["cached", "end_to_end"])
def test_feature_dropout_augments_training_batches_only(fitted, pairs, feats, tmp_path, mode):
    """feature_dropout > 0 drops raw features of the training batches (cached features or, end to end, the
    extracted ones): the trained heads differ from a run without it, the same seed gives the same heads, and the
    evaluation features are untouched (evaluation is deterministic and uses no dropout)."""
    heads = {}
    for name, p in (("off", 0.0), ("on", 0.5), ("on_again", 0.5)):
        if mode == "cached":
            m, data, kw = _fresh(fitted), pairs, {"train_feats": feats}
        else:  # end to end: images decoded and the backbone run in every step
            m, data, kw = PECM(PECMConfig.tiny(freeze_image=False), load_pretrained=False), pairs.subset(range(8)), {}
            m.text.doc2vec, m.text.tokenizer = fitted.text.doc2vec, fitted.text.tokenizer
        train(m, data, str(tmp_path / name), _cfg(epochs=1, batch_size=4, feature_dropout=p), **kw)
        heads[name] = {k: v.clone() for k, v in m.image_head.state_dict().items()}
        if name == "on_again" and mode == "cached":
            a = prototypes_from_features(m, feats)[0]
            assert torch.equal(a, prototypes_from_features(m, feats)[0])
    assert any(not torch.equal(heads["off"][k], heads["on"][k]) for k in heads["off"])
    assert all(torch.equal(heads["on"][k], heads["on_again"][k]) for k in heads["on"])


def test_bad_train_config_names_the_field():
    for kw, field in [({"epochs": 0}, "epochs"), ({"lr": 0.0}, "lr"), ({"batch_size": 1}, "batch_size"),
                      ({"div": "x"}, "div"), ({"lam": -1.0}, "lam"), ({"nu": -0.5}, "nu"),
                      ({"gather": 1}, "gather"), ({"kappa": -1.0}, "kappa"),
                      ({"theta_lr": 0.0}, "theta_lr"), ({"rho": -1.0}, "rho"),
                      ({"feature_dropout": 1.0}, "feature_dropout"),
                      ({"feature_dropout": -0.1}, "feature_dropout")]:  # fmt: skip
        with pytest.raises(ValueError, match=field):
            TrainConfig(**kw)


def test_evaluation_matches_reference_scores(fitted, pairs, feats):
    res = evaluate_features(fitted, feats, pairs.cuis)
    img, im, txt, tm, w = prototypes_from_features(fitted, feats)
    sim, conf, score = reference.scores(img.numpy(), txt.numpy(), w.numpy(), im.numpy(), tm.numpy())
    for by, mat in (("sim", sim), ("conf", conf), ("score", score)):
        i2r, r2i = recall_at_k(mat), recall_at_k(np.asarray(mat).T)
        for k in (1, 5, 10):
            assert res[by]["image_to_report"][f"R@{k}"] == pytest.approx(i2r[k])
            assert res[by]["report_to_image"][f"R@{k}"] == pytest.approx(r2i[k])
        assert set(res[by]["cbir_cui"]) == {"@5", "@10", "@50"}
        assert all(0 <= v <= 100 for v in res[by]["cui"].values())
    assert set(res["baseline"]["cbir_cui"]) == {"@5", "@10", "@50"}
    with pytest.raises(ValueError, match="by_list"):
        evaluate_prototypes(img, im, txt, tm, w, by_list=("score", "bogus"))


def test_select_best_keeps_the_best_validation_epoch(fitted, pairs, feats, tmp_path):
    val = pairs.subset(range(12))
    vfeats = {k: v[:12] for k, v in feats.items()}
    m = _fresh(fitted)
    hist = train(m, pairs, str(tmp_path), _cfg(epochs=5, select_best=True), val_pairs=val, val_feats=vfeats)
    rsums = [h["val"]["rsum"] for h in hist]
    best = int(np.argmax(rsums))  # first maximum, like the strict ">" of the selection
    assert [h["selected"] for h in hist] == [i == best for i in range(5)]

    def rsum(model):
        ev = evaluate_features(model, vfeats, val.cuis, by_list=("score",))["score"]
        return sum(ev["image_to_report"].values()) + sum(ev["report_to_image"].values())

    assert rsum(m) == pytest.approx(rsums[best])
    assert rsum(PECM.load(str(tmp_path))) == pytest.approx(rsums[best])  # the saved checkpoint is the best epoch
    assert json.loads((tmp_path / "metrics.json").read_text())[best]["selected"] is True


def test_select_best_end_to_end_evaluates_with_the_current_backbone(fitted, pairs, tmp_path):
    """End to end (an unfrozen backbone), the validation features are extracted again after every epoch with the
    backbone being trained: each epoch's validation RSUM is that of features from that epoch's backbone, the
    selected epoch is the best, and the model (backbone included) and the saved checkpoint are that epoch's."""
    val, tr = pairs.subset(range(16, 24)), pairs.subset(range(16))
    m = PECM(PECMConfig.tiny(freeze_image=False), load_pretrained=False)
    m.text.doc2vec, m.text.tokenizer = fitted.text.doc2vec, fitted.text.tokenizer
    frozen_val = extract_features(m, val, batch=8, progress=False)  # the untrained backbone's features

    def rsum(model, vf=None):
        vf = extract_features(model, val, batch=8, progress=False) if vf is None else vf
        ev = evaluate_features(model, vf, val.cuis, by_list=("score",))["score"]
        return sum(ev["image_to_report"].values()) + sum(ev["report_to_image"].values())

    hist = train(m, tr, str(tmp_path), _cfg(epochs=3, batch_size=4, select_best=True), val_pairs=val)
    rsums = [h["val"]["rsum"] for h in hist]
    best = int(np.argmax(rsums))
    assert [h["selected"] for h in hist] == [i == best for i in range(3)]
    assert rsum(m) == pytest.approx(rsums[best])
    loaded = PECM.load(str(tmp_path))
    assert rsum(loaded) == pytest.approx(rsums[best])
    # the trained backbone, not the initial one, made the selected epoch's features
    assert not torch.allclose(extract_features(loaded, val, batch=8, progress=False)["img"], frozen_val["img"])


def test_backbone_lr_scales_the_backbone_updates_only(fitted, pairs, tmp_path):
    """backbone_lr: the unfrozen backbone gets its own Adam group at lr * backbone_lr (its first Adam step moves
    each weight by about lr * backbone_lr), the heads keep lr; a bad value names the field."""
    moves = {}
    for mult in (1.0, 0.01):
        torch.manual_seed(0)
        m = PECM(PECMConfig.tiny(freeze_image=False), load_pretrained=False)
        m.text.doc2vec, m.text.tokenizer = fitted.text.doc2vec, fitted.text.tokenizer
        b0 = {k: v.detach().clone() for k, v in m.image.named_parameters()}
        h0 = {k: v.detach().clone() for k, v in m.image_head.named_parameters()}
        train(m, pairs.subset(range(4)), str(tmp_path / str(mult)), _cfg(epochs=1, batch_size=4, backbone_lr=mult))
        bb = max(float((p.detach() - b0[k]).abs().max()) for k, p in m.image.named_parameters())
        hd = max(float((p.detach() - h0[k]).abs().max()) for k, p in m.image_head.named_parameters())
        moves[mult] = (bb, hd)
    lr = _cfg().lr
    assert moves[1.0][0] == pytest.approx(lr, rel=0.05) and moves[0.01][0] == pytest.approx(lr * 0.01, rel=0.05)
    assert moves[1.0][1] == pytest.approx(lr, rel=0.05) and moves[0.01][1] == pytest.approx(lr, rel=0.05)
    with pytest.raises(ValueError, match="backbone_lr"):
        TrainConfig(backbone_lr=0.0)


def _ddp_rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ps = load_pairs(SAMPLE_ROCO, limit=32)
        m = PECM(PECMConfig.tiny(), load_pretrained=False)
        m.text.fit(ps.texts)
        hist = train(m, ps, out, TrainConfig(epochs=2, batch_size=8, lr=1e-3, progress=False))
        flat = torch.cat([p.detach().flatten() for p in m.parameters() if p.requires_grad])
        torch.save({"params": flat, "loss": hist[-1]["train"]["loss"]}, f"{out}.rank{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_gloo_ranks_stay_in_sync(tmp_path):
    import socket

    import torch.multiprocessing as tmp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "ddp")
    tmp.spawn(_ddp_rank, args=(2, port, out), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{out}.rank{r}", weights_only=True) for r in (0, 1))
    torch.testing.assert_close(r0["params"], r1["params"])  # DDP averaged the gradients: identical replicas
    assert np.isfinite(r0["loss"]) and np.isfinite(r1["loss"])
    assert (tmp_path / "ddp" / "model.safetensors").is_file()  # rank 0 wrote the checkpoint
    hist = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2]


def _ddp_gather_rank(rank: int, world: int, port: int, ckpt: str, feats_path: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        m = PECM.load(ckpt)  # the same initial weights and Doc2Vec on every rank
        feats = torch.load(feats_path, weights_only=True)
        cfg = _cfg(epochs=2, batch_size=12, save_every=2)  # the default gather=True; one save, at the end
        hist = train(m, load_pairs(SAMPLE_ROCO, limit=24), out, cfg, train_feats=feats)
        flat = torch.cat([p.detach().flatten() for p in m.parameters() if p.requires_grad])
        torch.save({"params": flat, "train": [h["train"] for h in hist]}, f"{out}.rank{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_global_batch_infonce_two_gloo_ranks(fitted, pairs, feats, tmp_path):
    """train() on 2 gloo ranks: the replicas stay identical, and the first step's InfoNCE (mean of the ranks'
    terms; one step per epoch, so epoch 1's history is that step at the initial weights) is the InfoNCE of one
    process over the concatenated global batch, not the mean of the two rank-local batches."""
    import socket

    import torch.multiprocessing as tmp

    from pecm.losses import PECMLoss

    init = _fresh(fitted)
    ckpt = str(tmp_path / "init")
    init.save(ckpt)
    feats_path = str(tmp_path / "feats.pt")
    torch.save(feats, feats_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "ddp")
    tmp.spawn(_ddp_gather_rank, args=(2, port, ckpt, feats_path, out), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{out}.rank{r}", weights_only=True) for r in (0, 1))
    torch.testing.assert_close(r0["params"], r1["params"], rtol=0, atol=0)  # DDP: identical replicas
    assert (tmp_path / "ddp" / "model.safetensors").is_file()  # rank 0 wrote the checkpoint

    # one process: the rank-ordered global batch of step 0 (each rank's DistributedSampler shard)
    shards = []
    for r in (0, 1):
        smp = torch.utils.data.DistributedSampler(range(len(pairs)), 2, r, shuffle=True, seed=1, drop_last=True)
        smp.set_epoch(0)
        shards.append(torch.tensor(list(smp))[:12])
    m = PECM.load(ckpt)
    m.train()

    def terms(idx):
        with torch.no_grad():
            iq, im = m.encode_image_features(feats["img"][idx])
            tq, tm = m.encode_text_features(feats["txt"][idx], feats["txt_mask"][idx])
            return PECMLoss(gather=False)(iq, tq, m.weights(), im, tm, logit_scale=m.logit_scale)

    glob = terms(torch.cat(shards))
    local = [terms(s) for s in shards]
    got_sim = (r0["train"][0]["sim"] + r1["train"][0]["sim"]) / 2
    got_conf = (r0["train"][0]["conf"] + r1["train"][0]["conf"]) / 2
    assert got_sim == pytest.approx(float(glob["sim"]), rel=1e-5)
    assert got_conf == pytest.approx(float(glob["conf"]), rel=1e-5)
    local_sim = sum(float(t["sim"]) for t in local) / 2
    assert abs(local_sim - float(glob["sim"])) > 0.1  # 23 negatives per item, not 11: a different loss
