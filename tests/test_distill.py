"""method=distill: a student learns from teacher checkpoints' softened outputs (Hinton et al. 2015)."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import invoke, train_in_process

TIMING = ["seconds", "samples_per_s"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("teacher")
    train_in_process(folder / "run", "trainer.epochs=4", f"output_dir={folder}")
    return folder / "run" / "checkpoints" / "best.safetensors"


def test_alpha_0_at_temperature_1_trains_exactly_as_plain_finetuning(teacher, tmp_path):
    plain = train_in_process(tmp_path / "plain", "method=finetune", f"output_dir={tmp_path}")
    distilled = train_in_process(tmp_path / "distill", "method=distill", f"method.teacher={teacher}",
                                 "method.alpha=0", "method.temperature=1", f"output_dir={tmp_path}")
    assert distilled["test"]["acc1"] == plain["test"]["acc1"] and distilled["best"] == plain["best"]
    a, b = (pd.read_csv(tmp_path / run / "metrics.csv").drop(columns=TIMING) for run in ("plain", "distill"))
    assert b["loss_soft"].dropna().gt(0).all()  # the soft loss is measured and logged even at weight 0
    assert a.equals(b.drop(columns=["loss_soft", "loss_hard"]))


def test_the_student_follows_an_ensemble_of_teachers_and_no_checkpoint_holds_them(teacher, tmp_path):
    code = invoke("train", "trainer=debug", "dataset=digits", "backbone=small_cnn", "method=distill",
                  f"method.teacher=[{teacher},{teacher}]", "method.alpha=1", f"hydra.run.dir={tmp_path}",
                  cwd=tmp_path).returncode
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["teachers"] == [str(teacher)] * 2 and summary["test"]["acc1"] > 60  # soft targets alone teach
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "checkpoints" / "best.safetensors"))
    assert not any("teacher" in k for k in state) and len(state) == len(load_file(str(teacher)))


def test_teacher_outputs_follow_the_students_class_names(teacher, tmp_path):
    """A teacher trained on digits listed 9..0 predicts the same digits under other output indices: its
    probabilities are re-ordered by class name before they teach."""
    from transfer_cli.methods.distill import Distill, Teacher
    from transfer_cli.models.checkpoint import load_model

    model, _ = load_model(str(teacher))
    reversed_model, _ = load_model(str(teacher))
    with torch.no_grad():  # the same network with its output rows in the reverse order
        head = reversed_model.head[-1]
        head.weight.copy_(head.weight.flip(0))
        head.bias.copy_(head.bias.flip(0))
    x = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    student, _ = load_model(str(teacher))
    settings = dict(teacher="t", temperature=2.0, alpha=0.5, unlabelled=False, freeze=0, bn="auto", label_smoothing=0.0,
                    layer_decay=1.0, backbone_lr_mult=1.0)
    same = Distill(student, [Teacher("a", model, None)], **settings).teacher_probs(x)
    mapped = Distill(student, [Teacher("b", reversed_model, list(range(9, -1, -1)))], **settings).teacher_probs(x)
    assert torch.allclose(same, mapped, atol=1e-6) and torch.allclose(same.sum(1), torch.ones(6))


def test_each_image_is_shown_to_the_teachers_once_and_its_outputs_kept(teacher):
    """Without augmentation every epoch shows the same images: the teachers run on the new ones only, and the
    kept outputs are exactly the ones a fresh teacher pass gives."""
    from transfer_cli.methods.distill import Distill, Teacher
    from transfer_cli.models.checkpoint import load_model

    model, _ = load_model(str(teacher))
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    settings = dict(teacher="t", temperature=4.0, alpha=0.9, unlabelled=False, freeze=0, bn="auto", label_smoothing=0.0,
                    layer_decay=1.0, backbone_lr_mult=1.0)
    distill = Distill(load_model(str(teacher))[0], [Teacher("a", model, None)], **settings)
    x = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    first = distill.teacher_probs(x[:5])
    again = distill.teacher_probs(x.flip(0))  # 5 seen (in another order and batch), 3 new
    assert calls == [5, 3]
    assert torch.allclose(again.flip(0)[:5], first, atol=1e-6)
    assert torch.allclose(again, Distill(load_model(str(teacher))[0], [Teacher("b", model, None)],
                                         **settings).teacher_probs(x.flip(0)), atol=1e-6)


def test_unlabelled_images_are_the_draws_remainder_and_teach_the_student(teacher, tmp_path):
    """method.unlabelled=true: the student also learns the teacher's outputs on the train images the few-shot
    draw left out (never their labels), paired batch by batch with the labelled ones."""
    from transfer_cli.config import DatasetConfig
    from transfer_cli.data.splits import targets_of
    from transfer_cli.pipeline import build_data

    splits = build_data(DatasetConfig(name="digits", shots=5))
    drawn = {tuple(splits.pool[i][0].flatten().tolist()) for i in splits.train.indices}
    rest = {tuple(splits.pool[i][0].flatten().tolist()) for i in splits.unlabelled.indices}
    assert len(splits.train) + len(splits.unlabelled) == len(splits.pool) and not drawn & rest
    assert len(targets_of(splits.train)) == 50

    few = ["dataset.shots=5", "trainer.epochs=6", f"output_dir={tmp_path}"]
    labels_only = train_in_process(tmp_path / "plain", *few, "method=finetune")
    distilled = train_in_process(tmp_path / "kd", *few, "method=distill", f"method.teacher={teacher}",
                                 "method.unlabelled=true")
    steps = pd.read_csv(tmp_path / "kd" / "metrics.csv").query("split == 'train'")
    assert steps["loss_soft"].notna().all() and distilled["epochs"] == 6
    # the teacher (trained on every label) passes on what 50 labels alone do not teach
    assert distilled["test"]["acc1"] > labels_only["test"]["acc1"] + 2  # 75.3 against 71.1 when written


@pytest.mark.parametrize("overrides, message", [
    ([], "method=distill needs method.teacher: its YAML (conf/method/distill.yaml) leaves it to you"),
    (["method.teacher=nope.safetensors"], "method.teacher='nope.safetensors' cannot teach this run: checkpoint='nope"),
    (["dataset.classes=[0,1,2]", "method.teacher=TEACHER"], "predicts 0, 1, 2, 3, 4, 5, 6, 7, 8, 9"),
    (["dataset.split_seed=3", "method.teacher=TEACHER"], "dataset.split_seed=3 differs from the 0"),
    (["method.teacher=TEACHER", "method.alpha=1.5"], "method.alpha=1.5 is not allowed for method 'distill'. Allowed: float >= 0 and <= 1"),
    (["method.teacher=TEACHER", "method.unlabelled=true"], "method.unlabelled=true distils on the train images that "
                                                            "dataset.shots or dataset.fraction leave unlabelled"),
])
def test_teachers_that_cannot_teach_are_refused_with_the_key(teacher, tmp_path, overrides, message):
    args = [o.replace("TEACHER", str(teacher)) for o in overrides]
    result = invoke("train", "trainer=debug", "method=distill", *args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2 and message in " ".join(result.stderr.split()), result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_stopped_distillation_resumes_bit_identically(teacher, tmp_path, monkeypatch):
    """The resumed start's memory of teacher outputs is empty; they are computed again before training, in the
    same fixed order, so the soft targets (and the unlabelled batches' order) are the ones the run never stopped
    saw."""
    from conftest import train_with_a_copy_at_epoch

    args = ["dataset.shots=12", "trainer.epochs=4", "method=distill", f"method.teacher={teacher}",
            "method.unlabelled=true", f"output_dir={tmp_path}"]
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    train_with_a_copy_at_epoch(reference, stopped, 2, monkeypatch, *args)
    train_in_process(tmp_path / "again", *args, f"trainer.resume={stopped}")
    a, b = (pd.read_csv(run / "metrics.csv").drop(columns=TIMING) for run in (reference, stopped))
    assert a.equals(b)
    from safetensors.torch import load_file

    first, second = (load_file(str(run / "checkpoints" / "last.safetensors")) for run in (reference, stopped))
    assert all(torch.equal(first[k], second[k]) for k in first)
