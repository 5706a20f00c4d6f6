"""Data-parallel training (unisd.train, unisd.distributed, unisd.sharding) against one process.

Two processes under `accelerate launch` (gloo, CPU, fp32, one thread each) at the same
global batch as one process (accumulation 4 = 2 processes × accumulation 2, batch 1)
give the same loss curve, terms, gradient norms, adapter and EMA teacher; both
processes hold the same weights; and their checkpoint resumes on one process. Each
twice: every process holding the whole student (DDP), and each holding half of every
decoder layer's parameters (FSDP2, `train.sharding: fsdp`), whose gathered weights and
checkpoints must be the same. The
recipe is unisd-full with every mechanism on (token agreement weights, quantile
clipping, EMA teacher, feature matching, contrastive term): each is computed per
micro-batch, and micro-batches are the same in both runs.

Not bit-exact: one process accumulates the four micro-batches' gradients in one sum,
two processes sum two each and then add the two sums (the all-reduce), so float
rounding differs, and AdamW's steps carry it on. Measured: loss and terms within 6e-7
relative (the divergence, ~6e-4, within 1.4e-8 absolute), gradient norms 1e-7
relative, adapter and teacher weights 1e-6 absolute; the tolerances are 1e-5 relative
(1e-7 absolute) and 1e-5 absolute. A wrong split or scaling is far outside them: every
process on the whole batch, a mean instead of a sum over processes, or a loss divided
by the local instead of the global accumulation changes the logged loss or the
gradient norm by a factor of 2; no reduction leaves the processes with different weights.
"""

import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_train import DEMO, QUESTIONS, Run, adapter, curves, make_cfg, run_round

from unisd import distributed
from unisd.config import ConfigError
from unisd.modeling import load_tokenizer
from unisd.train import TrainItem

pytestmark = pytest.mark.usefixtures("one_thread")
PROBE = distributed.__file__.replace("unisd/distributed.py", "tests/ddp_probe.py")
COMPONENTS = {
    "agreement": {"gamma": 1.0},
    "teacher": {"ema_every": 2, "ema_beta": 0.5},  # moves at steps 2 and 4
    "feature": {"weight": 0.1},
    "contrastive": {"weight": 0.1},
    "clip": {"mode": "quantile", "q": 0.8},
}
CURVE_KEYS = ("loss", "divergence", "feature", "contrastive", "clipped_frac", "token_weight_mean", "grad_norm", "lr")


@pytest.fixture(scope="module")
def items(tiny_model_dir):
    """Every item with a gold and a wrong demonstration and three contexts' scores."""
    tok = load_tokenizer(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    out = []
    for (q, a), (_, wrong) in zip(QUESTIONS, QUESTIONS[1:] + QUESTIONS[:1]):
        completion = tok(a)["input_ids"] + [tok.eos_token_id]
        out.append(
            TrainItem(
                tok(q + "\n")["input_ids"],
                completion,
                teacher_prompt=tok(q + "\n" + DEMO.format(a) + "\n")["input_ids"],
                negative_prompt=tok(q + "\n" + DEMO.format(wrong) + "\n")["input_ids"],
                scores=(-3 * torch.rand(3, len(completion), generator=g)).tolist(),
            )
        )
    return out


def config(root, model_dir, processes, sharding="none", lora=True):
    return make_cfg(
        root,
        model_dir,
        recipe="unisd-full",
        components=COMPONENTS,
        lora={"enabled": lora, "r": 4, "alpha": 8, "dropout": 0.0},
        max_steps=4,
        batch_size=1,
        grad_accum=4,
        checkpoint_every=2,
        warmup_ratio=0.0,
        processes=processes,
        sharding=sharding,
    )


@pytest.fixture(scope="module")
def one(tmp_path_factory, tiny_model_dir, items):
    """One process: the reference."""
    root = tmp_path_factory.mktemp("one")
    run_round(config(root, tiny_model_dir, 1), items, tiny_model_dir, root / "out", root / "work")
    return root / "out"


@pytest.fixture(scope="module", params=["none", "fsdp"])
def runs(request, tmp_path_factory, tiny_model_dir, items, one):
    """Two processes through the train stage's launcher, each holding the whole student
    (DDP) or half of every decoder layer (FSDP), beside the one-process run."""
    root = tmp_path_factory.mktemp(request.param)
    two, run = root / "two", Run()
    (two / "out").mkdir(parents=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distributed, "WORKER", [PROBE])
        info = distributed.train_in_processes(
            config(two, tiny_model_dir, 2, request.param),
            items,
            tiny_model_dir,
            "d" * 64,
            two / "out",
            two / "work",
            run,
        )
    return {
        "sharding": request.param,
        **{"root": root, "one": one, "two": two / "out", "work": two / "work", "info": info, "run": run},
    }


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
def test_two_processes_give_the_loss_curve_and_weights_of_one(runs):
    one, two = curves(runs["one"]), curves(runs["two"])
    assert [c["step"] for c in two] == [1, 2, 3, 4]
    assert [c["ema_update"] for c in two] == [c["ema_update"] for c in one] == [0, 1, 0, 1]
    for key in CURVE_KEYS:
        assert [c[key] for c in two] == pytest.approx([c[key] for c in one], rel=1e-5, abs=1e-7), key
    assert runs["info"]["final_loss"] == pytest.approx(one[-1]["loss"], rel=1e-5)
    assert one[-1]["loss"] < one[0]["loss"] * 0.99 and all(c["clipped_frac"] > 0 for c in one)  # it trained, clipped
    # the main process's metrics reached the stage's run (`unisd.distributed.MetricsFile`)
    assert [s for s, _ in runs["run"].metrics] == [1, 2, 3, 4] and [s for s, _ in runs["run"].checkpoints] == [2]
    assert runs["run"].metrics[-1][1]["train/loss"] == two[-1]["loss"]

    a1, a2 = adapter(runs["one"]), adapter(runs["two"])
    assert max(float(w.abs().max()) for k, w in a1.items() if "lora_B" in k) > 1e-3  # the adapter moved
    assert max_difference(a1, a2) < 1e-5


@pytest.mark.slow
def test_every_process_holds_the_same_student_and_ema_teacher(runs):
    rank0, rank1 = (torch.load(runs["work"] / f"rank{r}.pt") for r in (0, 1))
    (held0, whole), (held1, _) = rank0["layers"], rank1["layers"]
    if runs["sharding"] == "fsdp":  # each process held its piece of every layer parameter
        assert held0 + held1 == whole and 0 < held0 < whole
    else:
        assert held0 == held1 == whole
    for part in ("student", "teacher"):  # whole tensors (gathered from the shards under FSDP)
        assert rank0[part].keys() == rank1[part].keys()
        for k in rank0[part]:
            assert torch.equal(rank0[part][k], rank1[part][k]), (part, k)
    # ... and the teacher they hold is the one-process EMA teacher, which has moved off the student
    t1, t2 = torch.load(runs["one"] / "teacher.pt"), torch.load(runs["two"] / "teacher.pt")
    assert max_difference(t1, t2) < 1e-5 and max_difference(t2, rank0["teacher"]) == 0
    assert max_difference(rank0["teacher"], rank0["student"]) > 1e-3


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_on_one_process(runs, tiny_model_dir, items):
    work, out = runs["root"] / "resume" / "work", runs["root"] / "resume" / "out"
    work.mkdir(parents=True)
    shutil.copy(runs["work"] / "kept-step2.pt", work / "checkpoint.pt")
    assert len(torch.load(work / "checkpoint.pt", weights_only=False)["rng"]) == 2  # both processes' streams
    steps = []
    run_round(
        config(runs["root"] / "resume", tiny_model_dir, 1), items, tiny_model_dir, out, work, on_step=steps.append
    )
    assert steps == [3, 4]  # continued from step 2
    resumed, one = curves(out), curves(runs["one"])
    for key in CURVE_KEYS:
        assert [c[key] for c in resumed] == pytest.approx([c[key] for c in one], rel=1e-5, abs=1e-7), key
    assert max_difference(adapter(out), adapter(runs["one"])) < 1e-5
    assert max_difference(torch.load(out / "teacher.pt"), torch.load(runs["one"] / "teacher.pt")) < 1e-5


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_on_two_sharded_processes(runs, tiny_model_dir, items):
    """Whole tensors loaded back into each process's pieces: steps 3 and 4 as the
    uninterrupted two-process run took them. (Unsharded, the same load is one process's,
    which the test above covers.)"""
    if runs["sharding"] != "fsdp":
        pytest.skip("the unsharded load is the one-process resume above")
    root = runs["root"] / "resume2"
    (root / "work").mkdir(parents=True)
    (root / "out").mkdir()
    shutil.copy(runs["work"] / "kept-step2.pt", root / "work" / "checkpoint.pt")
    cfg = config(root, tiny_model_dir, 2, runs["sharding"])
    distributed.train_in_processes(cfg, items, tiny_model_dir, "d" * 64, root / "out", root / "work", Run())
    resumed, two = curves(root / "out"), curves(runs["two"])
    assert [c["step"] for c in resumed] == [1, 2, 3, 4]  # steps 1-2 from the checkpoint's curves
    for key in CURVE_KEYS:
        assert [c[key] for c in resumed] == pytest.approx([c[key] for c in two], rel=1e-5, abs=1e-7), key
    assert max_difference(adapter(root / "out"), adapter(runs["two"])) < 1e-5
    assert max_difference(torch.load(root / "out" / "teacher.pt"), torch.load(runs["two"] / "teacher.pt")) < 1e-5


@pytest.mark.slow
def test_sharded_full_fine_tuning_gives_the_one_process_run(tmp_path, tiny_model_dir, items):
    """Every weight trains: the decoder's sharded, the tied embedding whole in each
    process (its gradient all-reduced), the gradient norm taken over both."""
    one, two = tmp_path / "one", tmp_path / "two"
    run_round(config(one, tiny_model_dir, 1, lora=False), items, tiny_model_dir, one / "out", one / "work")
    (two / "out").mkdir(parents=True)
    distributed.train_in_processes(
        config(two, tiny_model_dir, 2, "fsdp", lora=False),
        items,
        tiny_model_dir,
        "d" * 64,
        two / "out",
        two / "work",
        Run(),
    )
    c1, c2 = curves(one / "out"), curves(two / "out")
    for key in CURVE_KEYS:
        assert [c[key] for c in c2] == pytest.approx([c[key] for c in c1], rel=1e-5, abs=1e-7), key
    w1, w2 = (load_file(d / "out" / "model" / "model.safetensors") for d in (one, two))
    base = load_file(tiny_model_dir / "model.safetensors")
    assert max_difference(w1, base) > 1e-3 and max_difference(w1, w2) < 1e-5  # it trained, the same way
    assert max_difference(torch.load(one / "out" / "teacher.pt"), torch.load(two / "out" / "teacher.pt")) < 1e-5


def test_the_launch_splits_the_global_batch_and_this_process_threads(tmp_path, tiny_model_dir):
    job = tmp_path / "job.pt"
    one = config(tmp_path, tiny_model_dir, 1)
    assert not distributed.launched(one)  # one process: train_round in the stage's process
    two = config(tmp_path, tiny_model_dir, 2)
    command = distributed.launch_command(two, job)
    assert distributed.launched(two) and command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    flags = dict(zip(command[4:-3:2], command[5:-3:2]))  # after --multi_gpu, before the worker
    assert command[3] == "--multi_gpu" and command[-3:] == ["-m", "unisd.distributed", str(job)]
    assert flags["--num_processes"] == "2" and flags["--num_cpu_threads_per_process"] == "1"  # 1 thread here
    assert flags["--main_process_port"] == "0"  # accelerate picks a free one
    filed = make_cfg(tmp_path, tiny_model_dir, accelerate_config="node0.yaml")
    assert distributed.launched(filed)
    assert distributed.launch_command(filed, job)[3:] == [
        "--config_file",
        str(tmp_path / "node0.yaml"),
        "-m",
        "unisd.distributed",
        str(job),
    ]
    with pytest.raises(ConfigError, match=r"grad_accum \(4\) must be a multiple of processes \(3\)"):
        config(tmp_path, tiny_model_dir, 3)
