"""fit / evaluate on a real torchvision resnet18 and the built-in digits at 16x16."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch.utils.data import DataLoader, Subset, TensorDataset

from pipeline.data import EpochShuffle, load_data
from pipeline.errors import HalpError
from pipeline.models import load_checkpoint
from pipeline.train import evaluate, fit


class Interrupt(Exception):
    pass


class Tally:
    """A minimal ``state`` object: counts optimizer steps, saved into checkpoints."""

    def __init__(self) -> None:
        self.steps = 0

    def __call__(self) -> None:
        self.steps += 1

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", (1, 3, 16, 16), batch_size=32, seed=0)


def _shuffled(dataset, count: int, batch_size: int) -> DataLoader:
    """Shuffled batches of real digits, with the epoch sampler `load_data` uses."""
    return DataLoader(Subset(dataset, range(count)), batch_size=batch_size,
                      sampler=EpochShuffle(count, seed=0))


@pytest.fixture
def small(digits) -> DataLoader:
    """Four batches of 16."""
    return _shuffled(digits.val.dataset, 64, 16)


def resnet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=10)


def quiet(_: str) -> None:
    """A `log` that discards messages."""


def test_fit_reduces_loss_and_reports_each_epoch(digits, capsys):
    model = resnet().eval()
    held_out = DataLoader(Subset(digits.val.dataset, range(256, 359)), batch_size=64)
    history = fit(model, _shuffled(digits.val.dataset, 256, 32), epochs=2, val_loader=held_out,
                  log=quiet)
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[1]["loss"] < history[0]["loss"]
    assert all(0.0 <= h["metric"] <= 100.0 and h["seconds"] > 0 for h in history)
    assert not model.training  # mode restored
    # in a log (pytest's capture is not a terminal) progress is a few lines, not one per batch
    assert len(capsys.readouterr().err.splitlines()) <= 2 * 2


def test_hooks_run_between_backward_and_step_once_per_batch(small):
    model = resnet()
    weight = model.fc.weight
    events: list[str] = []

    def after_backward() -> None:
        assert weight.grad is not None
        events.append("backward")
        before.append(weight.detach().clone())

    def after_step() -> None:
        assert not torch.equal(weight, before[-1])  # the optimizer has moved the weights
        events.append("step")

    before: list[torch.Tensor] = []
    history = fit(model, small, epochs=2, after_backward=after_backward, after_step=after_step,
                  log=quiet)
    assert events == ["backward", "step"] * 8
    assert history[0]["metric"] is None


def test_resume_continues_at_next_epoch_and_restores_state(small, tmp_path):
    checkpoint = tmp_path / "ckpt.pt"
    straight = resnet()
    fit(straight, small, epochs=2, log=quiet)

    tally = Tally()

    def stop_in_second_epoch() -> None:
        tally()
        if tally.steps == len(small) + 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(resnet(), small, epochs=2, checkpoint=checkpoint, after_step=stop_in_second_epoch,
            state={"tally": tally}, log=quiet)
    restored, logs = Tally(), []
    resumed = resnet(seed=1)
    history = fit(resumed, small, epochs=2, checkpoint=checkpoint, resume=True,
                  after_step=restored, state={"tally": restored}, log=logs.append)
    assert [h["epoch"] for h in history] == [1, 2]
    assert restored.steps == 2 * len(small)  # epoch 1 from the checkpoint + epoch 2 run now
    assert any("resumed" in line and "epoch 1/2" in line for line in logs)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)  # same result as an uninterrupted run
    assert load_checkpoint(resnet(seed=2), checkpoint) is not None  # `--checkpoint` reads it


def test_resume_without_checkpoint_starts_fresh(small, tmp_path):
    checkpoint = tmp_path / "new" / "ckpt.pt"
    history = fit(resnet(), small, epochs=1, checkpoint=checkpoint, resume=True, log=quiet)
    assert len(history) == 1 and checkpoint.is_file()


@pytest.fixture
def one_epoch_checkpoint(small, tmp_path):
    checkpoint = tmp_path / "ckpt.pt"
    fit(resnet(), small, epochs=1, checkpoint=checkpoint, log=quiet)
    return checkpoint


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"epochs": 3}, "1-epoch run, not 3"),
    ({"epochs": 1, "state": {"pruner": Tally()}}, r"no saved state for \['pruner'\]"),
])
def test_resume_refuses_a_foreign_checkpoint(small, one_epoch_checkpoint, kwargs, message):
    with pytest.raises(HalpError, match=message):
        fit(resnet(), small, checkpoint=one_epoch_checkpoint, resume=True, log=quiet, **kwargs)


def test_resume_refuses_garbage(small, tmp_path):
    checkpoint = tmp_path / "ckpt.pt"
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(HalpError, match="unreadable"):
        fit(resnet(), small, epochs=1, checkpoint=checkpoint, resume=True, log=quiet)


def _with_nan(loader: DataLoader, bad_batches: set[int]) -> list:
    batches = [(x.clone(), y) for x, y in loader]
    for i in bad_batches:
        batches[i][0][0, 0, 0, 0] = float("nan")
    return batches


def test_non_finite_batches_are_skipped_and_counted(small):
    tally = Tally()
    history = fit(resnet(), _with_nan(small, {1}), epochs=1, after_step=tally, log=quiet)
    assert history[0]["skipped"] == 1 and tally.steps == len(small) - 1


def test_all_batches_non_finite_is_an_error(small):
    with pytest.raises(HalpError, match="lower --lr"):
        fit(resnet(), _with_nan(small, {0, 1, 2, 3}), epochs=1, log=quiet)


def test_evaluate_restores_mode_and_scores_in_percent(small):
    model = resnet().train()
    top1 = evaluate(model, small)
    assert isinstance(top1, float) and 0.0 <= top1 <= 100.0 and model.training
    model.eval()
    assert evaluate(model, small) == top1 and not model.training
    empty = DataLoader(TensorDataset(torch.zeros(0, 3, 16, 16), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(HalpError, match="no images"):
        evaluate(model, empty)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fit_with_amp_on_cuda(digits):
    model = resnet()
    history = fit(model, digits.train, epochs=2, device="cuda", val_loader=digits.val, log=quiet)
    assert history[1]["loss"] < history[0]["loss"] and history[1]["metric"] > 50
