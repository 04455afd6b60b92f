"""Scale-out: two CPU processes (gloo) train the same weights as one process with the same global batch
(whole groups per process, the loss normalised across processes). They are started with torchrun,
which `accelerate launch --multi_gpu` wraps on GPUs (accelerate's own --cpu mode needs MPI)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from kernels_util import assert_same_gradient

BIN = Path(sys.executable).parent
# guidance 3 in the rollouts, the setting the tolerances below were measured at: other samples change which
# near-zero gradient entries Adam amplifies (without guidance, the default, 4 entries of 512 moved by up to 4.9e-4,
# 5% of one step, between one process and two)
ARGS = ["--set", "rollout.prompts=4", "--set", "rollout.group_size=4", "--set", "rollout.steps=2",
        "--set", "rollout.cfg_scale=3", "--set", "train.rollouts=2", "--set", "train.inner_updates=2", "--set", 'train.optimizer="adamw"',
        "--set", "train.lr=0.01", "--set", "train.micro_batch=3", "--set", "reward.partial_credit=true",
        "--set", "eval.every=0", "--set", "eval.samples=10", "--set", "eval.steps=1"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _adapter(run: Path) -> dict:
    return load_file(str(run / "adapter" / "pytorch_lora_weights.safetensors"))


def _run(*command) -> subprocess.CompletedProcess:
    """A command with one torch thread per process (two processes share the cores)."""
    return subprocess.run([str(c) for c in command], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def _one(*args) -> subprocess.CompletedProcess:
    """`gpo-fast ARGS` in one process."""
    return _run(BIN / "gpo-fast", *args)


def _two(*command) -> subprocess.CompletedProcess:
    """Two gloo processes under torchrun: a script or `-m gpo_fast.cli`, then its arguments."""
    return _run(BIN / "torchrun", "--nproc_per_node", "2", "--master_port", _free_port(), *command)


def _cli_script(patch: str) -> str:
    """A script for torchrun: `patch` (Python source applied first), then gpo-fast's CLI on its arguments."""
    return patch + 'import sys\nfrom gpo_fast.cli import app\nsys.argv[0] = "gpo-fast"\napp()\n'


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="gloo process groups are tested on Linux")
@pytest.mark.parametrize("reference_decay, tolerance", [(0.0, 1e-4), (0.95, 1e-3)], ids=["frozen", "moving"])
def test_two_processes_train_the_weights_of_one(tmp_path, reference_decay, tolerance):
    args = [*ARGS, "--set", f"train.reference_decay={reference_decay}"]
    one = _one("train", *args, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = _two("-m", "gpo_fast.cli", "train", *args, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert a.keys() == b.keys()
    moved = max((v.abs().max().item() for k, v in a.items() if "lora_B" in k), default=0.0)
    assert moved > 1e-3  # the updates did change the adapter, so agreement is not trivial
    # float32 AdamW; the two runs differ only in the order of float sums, and Adam divides each entry's step by
    # its own gradient scale, so an entry whose gradient is near zero can move by a visible part of lr from that
    # noise alone (measured: 3e-5 on 1 entry of 512, at lr 1e-2; 2.4e-4 on 1 entry with the moving reference, whose
    # log-ratios start at 0). 1e-4 and 1e-3 are 1% and 10% of one step; a rank's groups lost or weighted wrongly
    # moves many entries by a large part of a step
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=tolerance, atol=tolerance)
    # the compute is counted over both processes: the same as one process's (micro-batch 3 cuts the groups of 4,
    # so every update runs the same passes whatever the rewards)
    summaries = [json.loads((tmp_path / r / "summary.json").read_text()) for r in ("one", "two")]
    flops = [s["flops"] for s in summaries]
    assert flops[0]["train"] > 0 and {k: flops[1][k] for k in ("rollout", "update", "eval")} == {
        k: flops[0][k] for k in ("rollout", "update", "eval")}


def _grads_in_rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from gpo_fast.distributed import Dist

    dist = Dist.from_env()
    model, x0, prompts, rewards, cfg = _setup()
    mine = slice(rank * 8, (rank + 1) * 8)  # two groups of 4 per rank
    from gpo_fast.update import gpo_update

    gpo_update(model, x0[mine], prompts[mine], rewards[mine], cfg, torch.Generator().manual_seed(3), dist)
    params = model.trainable_parameters()
    local = [p.grad.clone() for p in params]
    dist.sum_grads(params)  # every LoRA tensor in one all-reduce
    summed = [p.grad.clone() for p in params]
    for p, g in zip(params, local):
        p.grad = g
    dist.sum_grads(params, bucket_elements=300)  # buckets of a few tensors each (one alone when it is larger)
    if rank == 0:
        torch.save([summed, [p.grad for p in params]], out)
    dist.barrier()


def _setup():
    from gpo_fast.config import load_config
    from gpo_fast.toy.model import ToyModel
    from gpo_fast.toy.data import render_dots

    torch.manual_seed(0)
    model = ToyModel()
    model.add_lora(4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    x0 = render_dots([1, 2, 3, 2] * 4, torch.Generator().manual_seed(1))
    prompts = ["two dots"] * 8 + ["three dots"] * 8
    # rank 0 gets two informative groups, rank 1 one informative and one degenerate group: the
    # normalisation across processes decides the weight of each rank's loss
    rewards = torch.tensor([1, 0, 0, 1, 0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1], dtype=torch.float32)
    cfg = load_config(overrides=["rollout.group_size=4", "rollout.prompts=4", "train.beta=50", "train.micro_batch=3"])
    return model, x0, prompts, rewards, cfg


@pytest.mark.slow
def test_gradients_summed_over_two_processes_equal_the_one_process_gradient(tmp_path):
    import torch.multiprocessing as mp

    from gpo_fast.update import gpo_update

    port = _free_port()
    mp.spawn(_grads_in_rank, args=(2, port, str(tmp_path / "g.pt")), nprocs=2, join=True)
    whole, bucketed = torch.load(tmp_path / "g.pt", weights_only=True)
    model, x0, prompts, rewards, cfg = _setup()
    gpo_update(model, x0, prompts, rewards, cfg, torch.Generator().manual_seed(3))
    one = [p.grad for p in model.trainable_parameters()]
    assert any(g.abs().max() > 0 for g in one) and len(one) > 4
    for a, b, c in zip(one, whole, bucketed):
        assert_same_gradient(b, a)
        assert torch.equal(c, b)  # the buckets sum the same numbers


INJECT = _cli_script('''import os, torch
from gpo_fast.toy.model import ToyModel
real = ToyModel.predict
def predict(self, latents, sigmas, embeds):  # rank 1 alone runs out of memory above 2 samples in a training pass
    if os.environ.get("RANK") == "1" and torch.is_grad_enabled() and self.training and latents.shape[0] > 2:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected on rank 1)")
    return real(self, latents, sigmas, embeds)
ToyModel.predict = predict
''')


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="gloo process groups are tested on Linux")
def test_an_out_of_memory_error_on_one_rank_is_retried_by_both(tmp_path):
    """Only rank 1 runs out of memory; both ranks redo the update at half the micro-batch (none hangs in the
    gradient all-reduce) and the run ends with the weights of one process started at that size."""
    (tmp_path / "inject.py").write_text(INJECT)
    args = [a if a != "train.micro_batch=3" else "train.micro_batch=4" for a in ARGS]
    two = _two(str(tmp_path / "inject.py"), "train", *args, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "out of GPU memory at train.micro_batch = 4" in two.stdout + two.stderr
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["micro_batch"] for r in rows] == [2, 2]
    one = _one("train", *[a if a != "train.micro_batch=3" else "train.micro_batch=2" for a in ARGS],
               "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4)  # as two processes against one, above


def test_the_collective_timeout_is_explicit_and_set_by_its_variable(monkeypatch):
    """NCCL's own 10 minutes would end a run while rank 0 alone evaluates; the process group waits 120 minutes, or
    GPO_FAST_DIST_TIMEOUT_MIN's; a value that is not a positive number is one sentence."""
    import datetime

    from gpo_fast.distributed import TIMEOUT_ENV, timeout
    from gpo_fast.errors import InputError

    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert timeout() == datetime.timedelta(minutes=120)
    monkeypatch.setenv(TIMEOUT_ENV, "45")
    assert timeout() == datetime.timedelta(minutes=45)
    for bad in ("soon", "0", "-3"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(InputError, match=f"{TIMEOUT_ENV}='{bad}' is not a positive number"):
            timeout()


STOP_ON_RANK_1 = _cli_script('''import os, signal
import gpo_fast.train as train_module
real, calls = train_module.sample_and_score, []
def sample_and_score(run):  # rank 1 alone is asked to stop, while it samples its second rollout
    calls.append(1)
    if os.environ.get("RANK") == "1" and len(calls) == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return real(run)
train_module.sample_and_score = sample_and_score
''')


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="gloo process groups are tested on Linux")
def test_a_stop_request_to_one_rank_stops_both_at_the_same_rollout_and_torchrun_resumes_exactly(tmp_path):
    """SIGTERM to rank 1 alone: both ranks agree on the boundary (the state as of the second rollout's start, the
    first checkpointed), both exit with the stopped code; resumed under torchrun, the run ends as an uninterrupted
    two-process run, bit for bit."""
    from gpo_fast.stop import STOPPED_EXIT_CODE

    (tmp_path / "stop.py").write_text(STOP_ON_RANK_1)
    args = [*ARGS, "--set", "train.rollouts=3"]

    stopped = _two(str(tmp_path / "stop.py"), "train", *args, "--out", str(tmp_path / "stopped"))
    said = stopped.stdout + stopped.stderr
    assert stopped.returncode != 0 and f"exitcode  : {STOPPED_EXIT_CODE}" in said, said[-3000:]
    assert "stopped on request (SIGTERM) with rollout 1 of 3" in said  # rank 1's sentence
    assert "stopped on request (another process) with rollout 1 of 3" in said  # rank 0 agreed on the same boundary
    assert [p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir()] == ["rollout-000001"]
    resumed = _two("-m", "gpo_fast.cli", "train", "--resume", str(tmp_path / "stopped"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full = _two("-m", "gpo_fast.cli", "train", *args, "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]

    def rows(run):
        return [{k: v for k, v in json.loads(line).items() if k != "step_seconds"}
                for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    a, b = _adapter(tmp_path / "full"), _adapter(tmp_path / "stopped")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(rows("stopped")) == 3 and rows("stopped") == rows("full")


def _evaluators():
    from gpo_fast.evaluate import PromptEvaluator
    from gpo_fast.language import Prompt
    from gpo_fast.toy.data import MAX_DOTS, prompt_for
    from gpo_fast.toy.evaluate import ToyEvaluator
    from gpo_fast.toy.reward import DotCountReward

    prompts = [Prompt(text=prompt_for(n), task="toy", n=n) for n in range(1, MAX_DOTS + 1)]
    # 45 samples: shares of 22 and 23; batches of 4 cut across the shares; 30 kept images span both ranks
    return {"toy": ToyEvaluator(samples=45, steps=3, cfg_scale=2.0, keep_images=30, watch=DotCountReward()),
            "prompts": PromptEvaluator(DotCountReward(partial_credit=True), prompts, samples=45, steps=3,
                                       cfg_scale=2.0, batch_size=4, keep_images=30, watch=DotCountReward())}


def _evaluate_in_rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from gpo_fast.distributed import Dist
    from gpo_fast.toy.model import ToyModel

    dist, model = Dist.from_env(), ToyModel.from_pretrained()
    results = {name: evaluator(model, 5, dist) for name, evaluator in _evaluators().items()}
    torch.save(results, f"{out}.{rank}")
    dist.barrier()


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="gloo process groups are tested on Linux")
def test_an_evaluation_shared_by_two_processes_is_the_one_process_evaluation(tmp_path):
    """Each rank samples and scores its share of the fixed seeds (22 and 23 of 45); gathered, both ranks hold the
    metrics one process measures (the same counts, rewards, statistics) and rank 0 its kept images (30, from both
    shares)."""
    import torch.multiprocessing as mp

    from gpo_fast.toy.model import ToyModel

    torch.set_num_threads(1)
    mp.spawn(_evaluate_in_rank, args=(2, _free_port(), str(tmp_path / "r")), nprocs=2, join=True)
    shared = [torch.load(f"{tmp_path / 'r'}.{rank}", weights_only=False) for rank in (0, 1)]
    model = ToyModel.from_pretrained()
    for name, evaluator in _evaluators().items():
        metrics, tiles = evaluator(model, 5)
        assert 0 < metrics["accuracy"] < 1 and metrics["n_samples"] == 45 and len(tiles) == 30
        for rank in (0, 1):
            got = shared[rank][name][0]
            assert got.keys() == metrics.keys()
            for key, value in metrics.items():  # counts exact; means of per-image values to float rounding
                if key == "image_stats":
                    for stat, moments in value.items():
                        assert got[key][stat] == pytest.approx(moments, rel=1e-5, abs=1e-7), (name, stat)
                elif isinstance(value, float):
                    assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (name, key)
                else:  # sample counts, accuracy and counts per count asked
                    assert got[key] == value, (name, key)
        got_tiles, spare = shared[0][name][1], shared[1][name][1]  # the kept images go to rank 0 alone
        assert got_tiles.labels == tiles.labels and got_tiles.correct == tiles.correct
        torch.testing.assert_close(got_tiles.images, tiles.images, rtol=1e-4, atol=1e-5)
        assert len(spare) == 0 and spare.labels == []


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="gloo process groups are tested on Linux")
def test_a_run_in_two_processes_evaluates_and_validates_as_one_process(tmp_path):
    """Every evaluation of a run (before, each validation, after) shared by two processes, 10 and 11 of 21 samples
    each: the same accuracies as one process, the same best rollout, and the final evaluation of the kept weights,
    which rank 0 alone holds and sends to rank 1."""
    kept = [x for flag, value in zip(ARGS[::2], ARGS[1::2]) if not value.startswith("eval.") for x in (flag, value)]
    args = [*kept, "--set", "eval.every=1", "--set", "eval.samples=21", "--set", "eval.steps=6", "--set",
            "eval.cfg_scale=2"]
    one = _one("train", *args, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = _two("-m", "gpo_fast.cli", "train", *args, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    summaries = [json.loads((tmp_path / r / "summary.json").read_text()) for r in ("one", "two")]
    assert 0 < summaries[0]["accuracy_before"] < 1 and summaries[0]["accuracy_after"] > 0
    for key in ("accuracy_before", "accuracy_after", "best_rollout", "blank_before", "blank_after"):
        assert summaries[1][key] == summaries[0][key], key
    assert summaries[1]["flops"]["eval"] == summaries[0]["flops"]["eval"] > 0
    val = [[json.loads(line)["val_accuracy"] for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
           for r in ("one", "two")]
    assert len(val[0]) == 2 and val[1] == val[0]


def test_a_rollout_that_does_not_split_into_whole_groups_per_process_is_refused(tmp_path, monkeypatch):
    """Three processes and 4 prompts: refused in one sentence before anything is written (each process takes
    whole groups)."""
    import gpo_fast.train as train_module
    from gpo_fast.config import load_config
    from gpo_fast.distributed import Dist
    from gpo_fast.errors import InputError

    three = Dist()
    three.world, three.rank = 3, 0
    monkeypatch.setattr(train_module.Dist, "from_env", classmethod(lambda cls: three))
    config = load_config(overrides=["rollout.prompts=4", f'out="{tmp_path / "run"}"'])
    with pytest.raises(InputError, match=re.escape("rollout.prompts (4) must be a multiple of the number of "
                                                   "processes (3)")):
        train_module.setup(config, lambda *a: None, None)
    assert not (tmp_path / "run").exists()


def test_fewer_eval_samples_than_processes_is_refused(tmp_path, monkeypatch):
    import gpo_fast.train as train_module
    from gpo_fast.config import load_config
    from gpo_fast.distributed import Dist
    from gpo_fast.errors import InputError

    many = Dist()
    many.world, many.rank = 16, 0
    monkeypatch.setattr(train_module.Dist, "from_env", classmethod(lambda cls: many))
    config = load_config(overrides=["rollout.prompts=16", "eval.samples=10", f'out="{tmp_path / "run"}"'])
    with pytest.raises(InputError, match=re.escape("eval.samples (10) must be at least the number of processes (16)")):
        train_module.setup(config, lambda *a: None, None)
    assert not (tmp_path / "run").exists()
