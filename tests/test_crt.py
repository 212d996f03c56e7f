"""Certified Robustness Transfer: the loss, the frozen teacher, shared noise, generations, foreign teachers."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from certkit import checkpoint
from certkit.cli import main
from certkit.errors import CertkitError
from certkit.models import create_model
from certkit.objectives.crt import CRT, transfer_distance
from certkit.objectives.gaussian import Gaussian
from certkit.train import TrainConfig, Trainer, train
from helpers import make_idx_dataset, tiny_data, train_argv


def _linear(seed: int, classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, classes))


def test_loss_equals_formula() -> None:
    student, teacher = _linear(0), _linear(1)
    x, y = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))
    for alpha, match in ((1.0, "logits"), (0.3, "logits"), (0.7, "softmax")):
        obj = CRT(sigma=0.5, teacher=teacher, alpha=alpha, match=match)
        torch.manual_seed(42)
        loss, parts = obj(student, x, y)
        torch.manual_seed(42)
        noisy = x + torch.randn_like(x) * 0.5
        s, t = student(noisy), teacher(noisy)
        if match == "softmax":
            s_c, t_c = s.softmax(1), t.softmax(1)
        else:
            s_c, t_c = s, t
        transfer = torch.sqrt(((s_c - t_c) ** 2).sum(1)).mean()  # per-sample L2, not squared
        expected = alpha * transfer + (1 - alpha) * nn.functional.cross_entropy(s, y)
        assert torch.allclose(loss, expected, atol=1e-6), (alpha, match)
        assert torch.allclose(parts["transfer"], transfer, atol=1e-6)


def test_no_gradient_reaches_the_teacher_and_teacher_stays_in_eval() -> None:
    student = create_model("smallcnn", 10, (1, 28, 28))
    teacher = create_model("lenet", 10, (1, 28, 28))
    teacher.train()
    obj = CRT(sigma=0.25, teacher=teacher)
    loss, _ = obj(student, torch.rand(4, 1, 28, 28), torch.zeros(4, dtype=torch.long))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_teacher_and_student_see_the_same_noise() -> None:
    seen: dict[str, torch.Tensor] = {}
    student, teacher = _linear(0), _linear(1)
    student.register_forward_pre_hook(lambda m, a: seen.__setitem__("student", a[0].detach().clone()))
    teacher.register_forward_pre_hook(lambda m, a: seen.__setitem__("teacher", a[0].detach().clone()))
    x = torch.rand(5, 1, 28, 28)
    CRT(sigma=0.25, teacher=teacher)(student, x, torch.zeros(5, dtype=torch.long))
    assert torch.equal(seen["student"], seen["teacher"])
    assert not torch.equal(seen["student"], x)  # and it is noisy


def test_zero_difference_has_zero_gradient_not_nan() -> None:
    s = torch.tensor([[1.0, 2.0], [0.0, 1.0]], requires_grad=True)
    t = torch.tensor([[1.0, 2.0], [1.0, 1.0]])
    transfer_distance(s, t).sum().backward()
    assert torch.equal(s.grad, torch.tensor([[0.0, 0.0], [-1.0, 0.0]]))
    student = _linear(0)
    teacher = _linear(0)
    loss, _ = CRT(sigma=0.25, teacher=teacher)(student, torch.rand(3, 1, 28, 28), torch.zeros(3, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() == 0 for p in student.parameters())


def test_alpha_zero_is_gaussian_training() -> None:
    def run(objective) -> nn.Module:
        torch.manual_seed(5)
        model = create_model("smallcnn", 10, (1, 28, 28))
        cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, seed=3)
        Trainer(model, objective, tiny_data(), None, cfg, device="cpu", progress=False, log=lambda m: None).fit()
        return model

    gauss = run(Gaussian(0.25))
    crt = run(CRT(0.25, teacher=create_model("lenet", 10, (1, 28, 28)), alpha=0.0))
    for a, b in zip(gauss.state_dict().values(), crt.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.slow  # trains a teacher and a student
def test_student_learns_the_teacher_and_ledger_counts_teacher() -> None:
    torch.manual_seed(0)
    teacher = create_model("lenet", 10, (1, 28, 28))
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05)
    Trainer(teacher, Gaussian(0.25), tiny_data(), None, cfg, device="cpu", progress=False, log=lambda m: None).fit()
    student = create_model("smallcnn", 10, (1, 28, 28))  # a different architecture
    obj = CRT(0.25, teacher=teacher)
    t = Trainer(
        student,
        obj,
        tiny_data(),
        None,
        TrainConfig(epochs=15, batch_size=16, optimizer="adam", lr=1e-3, weight_decay=0),
        device="cpu",
        progress=False,
        log=lambda m: None,
    )
    t.fit()
    first, last = t.history[0], t.history[-1]
    assert last["transfer"] < 0.25 * first["transfer"] and last["agree"] > 0.9
    e = t.ledger.epochs[-1]
    assert e["forward"] == e["backward"] == e["teacher_forward"] == 64 and e["teacher_backward"] == 0


def test_sigma_mismatch_warns() -> None:
    with pytest.warns(UserWarning, match="sigma=0.5"):
        CRT(0.25, teacher=_linear(0), teacher_meta={"sigma": 0.5})


def test_a_gloro_teacher_is_refused() -> None:
    """CRT matches the student's logits to the teacher's on noisy inputs: a GloRo net never saw noise."""
    from certkit.gloro.model import GloroNet
    from certkit.methods import build_objective

    net = GloroNet(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), (1, 28, 28), epsilon=0.3)
    with pytest.raises(CertkitError, match="a GloRo net"):
        build_objective("crt", 0.25, teacher=net)
    with pytest.raises(CertkitError, match="a GloRo net"):  # a run's model.json says so (a teacher run folder)
        CRT(0.25, teacher=_linear(0), teacher_meta={"method": "gloro", "sigma": None})


def test_class_count_mismatch_refused() -> None:
    obj = CRT(0.25, teacher=_linear(0, classes=5))
    with pytest.raises(CertkitError, match="5 classes"):
        obj(_linear(1), torch.rand(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))


def _run(out: Path, root: Path, method: str = "gaussian", teacher: Path | None = None, arch: str = "smallcnn"):
    return train(
        "mnist",
        arch,
        method,
        sigma=0.25,
        out=out,
        data_dir=str(root),
        teacher=teacher,
        epochs=1,
        batch_size=8,
        lr=0.01,
        device="cpu",
        progress=False,
    )


def test_two_generation_chain_records_both_ancestors(tmp_path: Path) -> None:
    root = make_idx_dataset(tmp_path / "data", n_train=16, n_test=8)
    _run(tmp_path / "g0", root)
    _run(tmp_path / "g1", root, "crt", tmp_path / "g0", arch="lenet")
    _run(tmp_path / "g2", root, "crt", tmp_path / "g1")
    meta = json.loads((tmp_path / "g2" / "model.json").read_text())
    assert [a["path"] for a in meta["lineage"]] == [str(tmp_path / "g0"), str(tmp_path / "g1")]
    assert [a["method"] for a in meta["lineage"]] == ["gaussian", "crt"]
    assert meta["teacher"]["arch"] == "lenet" and meta["teacher"]["sha256"] == checkpoint.model_hash(tmp_path / "g1")
    # the cost ledger carries each ancestor's own training seconds for the cumulative comparison
    assert [a["method"] for a in meta["cost"]["ancestors"]] == ["gaussian", "crt"]
    assert all(a["seconds"] > 0 for a in meta["cost"]["ancestors"])


def test_teacher_from_reference_pth_tar(tmp_path: Path) -> None:
    root = make_idx_dataset(tmp_path / "data", n_train=16, n_test=8)
    ref = create_model("lenet", 10, (1, 28, 28))
    path = tmp_path / "teacher.pth.tar"
    torch.save(
        {"arch": "lenet", "state_dict": {k: v for k, v in ref.state_dict().items() if k.startswith("1.")}, "epoch": 90},
        path,
    )
    _run(tmp_path / "s", root, "crt", path)
    meta = json.loads((tmp_path / "s" / "model.json").read_text())
    assert meta["teacher"]["path"] == str(path) and meta["teacher"]["arch"] == "lenet"


def test_cli_teacher_file_without_its_architecture_takes_teacher_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """CRT's and MACER's own files record no architecture: --teacher-arch names it (--arch is the student's),
    and --teacher-normalization sets its input layer; an error names the teacher's flag."""
    root = make_idx_dataset(tmp_path / "data", n_train=16, n_test=8)
    ref = create_model("lenet", 10, (1, 28, 28))
    path = tmp_path / "teacher.pth.tar"
    torch.save({"state_dict": {k: v for k, v in ref.state_dict().items() if k.startswith("1.")}, "epoch": 90}, path)
    base = train_argv(root, dataset="mnist", arch="smallcnn", method="crt", teacher=path, batch_size=8)
    assert main([*base, "--out", str(tmp_path / "no")]) == 2
    assert "pass --teacher-arch NAME" in capsys.readouterr().err
    assert (
        main([*base, "--teacher-arch", "lenet", "--teacher-normalization", "none", "--out", str(tmp_path / "s")]) == 0
    )
    meta = json.loads((tmp_path / "s" / "model.json").read_text())
    assert meta["arch"] == "smallcnn" and meta["teacher"]["arch"] == "lenet"
    teacher = CRT(0.25, path, teacher_arch="lenet", teacher_normalization="none", dataset="mnist").teacher
    torch.testing.assert_close(teacher[0].mean.flatten(), torch.zeros(1))  # 'none': no centring, unit scale
    assert (
        main(
            [*train_argv(root, dataset="mnist", method="gaussian", teacher_arch="lenet"), "--out", str(tmp_path / "g")]
        )
        == 2
    )
    assert "only used by --method crt" in capsys.readouterr().err


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/certkit-pwned-teacher",))


def test_pickled_object_teacher_refused(tmp_path: Path) -> None:
    root = make_idx_dataset(tmp_path / "data", n_train=16, n_test=8)
    marker = Path("/tmp/certkit-pwned-teacher")
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.pth.tar"
    with open(path, "wb") as f:
        pickle.dump({"arch": "lenet", "state_dict": _Payload()}, f)
    with pytest.raises(CertkitError, match="refused"):
        _run(tmp_path / "s", root, "crt", path)
    assert not marker.exists()


def test_crt_needs_a_teacher(tmp_path: Path) -> None:
    root = make_idx_dataset(tmp_path / "data", n_train=16, n_test=8)
    with pytest.raises(CertkitError, match="needs --teacher"):
        _run(tmp_path / "s", root, "crt")
