"""The divergence rule end to end: a checkpoint is good only if its weights and optimiser state
are finite AND the loss computed with them is finite. Divergence is injected three ways (a huge
learning rate for one optimiser step whose weights stay finite but give a non-finite loss; one
so huge the update itself overflows; a backward pass with infinite gradients); every time the
run stops with exit code 3, names the newest good checkpoint, leaves nothing of the bad steps on
disk, and `--resume latest` continues to bit-identical weights of a run that never diverged."""

import os
import types

import pytest
import torch

from networks.tlora_format import read_safetensors
from tlora_trainer import cli, errors, loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "presets", "demo-random.toml")
RUN = ["--max_train_steps", "8", "--save_every_n_steps", "2", "--network_dropout", "0.1"]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, PartialState

    yield
    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def _reset_accelerate():
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def argv(out, *extra):
    return ["--config_file", DEMO, "--output_dir", str(out), "--sample_every_n_steps", "1000", *RUN, *extra]


def wrap_optimizer_step(step_call: int, around, monkeypatch):
    """The optimiser's `step_call`-th step runs as around(optimizer, real_step)."""
    real_build = loop.build_optimizer

    def build(args, groups, options):
        optimizer = real_build(args, groups, options)
        real_step, calls = optimizer.step, {"n": 0}

        def step(self, *a, **k):
            calls["n"] += 1
            return around(optimizer, lambda: real_step(*a, **k)) if calls["n"] == step_call else real_step(*a, **k)

        optimizer.step = types.MethodType(step, optimizer)  # bound, as torch's LR schedulers expect
        return optimizer

    monkeypatch.setattr(loop, "build_optimizer", build)


def huge_learning_rate_at(step_call: int, factor: float, monkeypatch):
    """One optimiser step runs with its learning rate times `factor`."""
    def around(optimizer, real_step):
        saved = [g["lr"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["lr"] *= factor
        try:
            return real_step()
        finally:
            for g, lr in zip(optimizer.param_groups, saved):
                g["lr"] = lr

    wrap_optimizer_step(step_call, around, monkeypatch)


def infinite_weight_after(step_call: int, monkeypatch):
    """One optimiser step leaves an infinite weight behind (an overflowing update)."""
    def around(optimizer, real_step):
        result = real_step()
        with torch.no_grad():
            optimizer.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return result

    wrap_optimizer_step(step_call, around, monkeypatch)


class _InfiniteGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def infinite_gradients_at(step_call: int, monkeypatch):
    real, calls = loop.compute_loss, {"n": 0}

    def loss(prediction, target):
        calls["n"] += 1
        if calls["n"] == step_call:
            prediction = _InfiniteGradient.apply(prediction)
        return real(prediction, target)

    monkeypatch.setattr(loop, "compute_loss", loss)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The same run without any fault."""
    out = tmp_path_factory.mktemp("straight")
    result = cli.run(argv(out))
    _reset_accelerate()
    weights, _ = read_safetensors(result.output)
    return weights


CASES = {
    # step 4's update makes the weights ~1e27: finite, so the update is applied, but the loss of
    # step 5 (computed with them) is not; the step-4 checkpoint must never appear
    "finite huge weights, next loss not finite": (lambda mp: huge_learning_rate_at(4, 1e30, mp),
                                                  ["loss is not finite", "at step 5", "weights after step 4 gave this loss"]),
    # step 4's update leaves an infinite weight: stopped right after it, nothing of it saved
    "update overflows": (lambda mp: infinite_weight_after(4, mp), ["update of step 4 made weights NaN or infinite"]),
    # the loss of step 4 is finite but its gradients are not: the update is never applied
    "infinite gradients": (lambda mp: infinite_gradients_at(4, mp), ["gradients at step 4 are not finite although the loss is"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_divergence_keeps_only_good_checkpoints_and_resumes_to_the_undisturbed_result(case, tmp_path, monkeypatch, capsys, straight_run):
    inject, needles = CASES[case]
    inject(monkeypatch)
    out = tmp_path / "out"
    code = cli.main(argv(out))
    err = capsys.readouterr().err
    assert code == errors.EXIT_NOT_FINITE, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("train_tlora.py: stopped: ")
    for needle in needles:
        assert needle in last, last
    good = out / "demo-tlora-step00000002-state"
    assert f"The last good checkpoint is {good}." in last
    # on disk: the step-2 checkpoint only; nothing of step 4 or later, no final file, no temporaries
    names = sorted(p.name for p in out.iterdir())
    assert names == ["demo-tlora-step00000002-state", "demo-tlora-step00000002.safetensors"], names
    state, _ = read_safetensors(str(good / "network.safetensors"))
    assert all(torch.isfinite(v).all() for v in state.values())
    weights, _ = read_safetensors(str(out / "demo-tlora-step00000002.safetensors"))
    assert all(torch.equal(weights[k], state[k]) for k in state)

    # the cause removed, `--resume latest` picks the good checkpoint and finishes: the weights equal
    # those of a run that never diverged (the learning rate and every RNG state came back exactly)
    monkeypatch.undo()
    _reset_accelerate()
    result = cli.run(argv(out, "--resume", "latest"))
    assert "resumed from" in capsys.readouterr().out and result.step == 8
    final, _ = read_safetensors(result.output)
    assert set(final) == set(straight_run) and all(torch.equal(final[k], straight_run[k]) for k in final)


def test_a_non_finite_loss_right_after_a_checkpoint_reports_the_one_before(tmp_path, monkeypatch, capsys):
    """NaN at step 5, the step right after the step-4 checkpoint became due: step 4's weights
    produced it, so the step-2 checkpoint is the last good one and the step-4 one is never written."""
    real, calls = loop.compute_loss, {"n": 0}

    def nan_at_five(prediction, target):
        calls["n"] += 1
        value = real(prediction, target)
        return value * float("nan") if calls["n"] == 5 else value

    monkeypatch.setattr(loop, "compute_loss", nan_at_five)
    out = tmp_path / "out"
    code = cli.main(argv(out))
    err = capsys.readouterr().err
    assert code == errors.EXIT_NOT_FINITE
    assert f"The last good checkpoint is {out / 'demo-tlora-step00000002-state'}." in err
    assert not (out / "demo-tlora-step00000004-state").exists() and not (out / "demo-tlora-step00000004.safetensors").exists()


def test_final_weights_that_give_a_non_finite_loss_are_not_written(tmp_path, monkeypatch, capsys):
    """The last update (step 8) makes the weights huge: no step follows whose loss would notice, so
    the final check computes one; no final file, and the step-6 checkpoint is the last good one."""
    huge_learning_rate_at(8, 1e30, monkeypatch)
    out = tmp_path / "out"
    code = cli.main(argv(out))
    err = capsys.readouterr().err
    assert code == errors.EXIT_NOT_FINITE
    assert "final weights give a non-finite loss" in err and str(out / "demo-tlora-step00000006-state") in err
    assert not (out / "demo-tlora.safetensors").exists() and not (out / "demo-tlora.toml").exists()
