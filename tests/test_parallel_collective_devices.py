"""Collectives of `ParallelVPiT` take tensors on the model's device.

NCCL process groups (every GPU run) reduce CUDA tensors only: a CPU tensor fails with "No backend type associated
with device type cpu". `ParallelVPiT` summed its target counts and loss parts in CPU buffers, which gloo accepts,
so every CPU test passed while DP > 1 or PP > 1 could not take one step on GPUs. This CPU test makes such buffers
visible: in the child processes, tensors that `engine.parallel.parallel_model` creates without an explicit device
land on "meta" (a stand-in for "not the model's device"), and `dist.all_reduce` refuses any tensor that is not on
the model's device, as NCCL does for CPU tensors. DP2 x PP2 runs a training step and an evaluation.
"""

from __future__ import annotations

import json
import textwrap

from distributed_launch import torchrun

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    sys.path.insert(0, os.path.join(os.environ["PYTHONPATH"], "tests"))
    from parallel_harness import harness_model_config, synthetic_micro_batch
    import engine.parallel.parallel_model as parallel_model
    from engine.parallel import ParallelConfig, build_device_mesh
    from engine.parallel.parallel_model import ParallelVPiT

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    parallel = ParallelConfig(pipeline_model_parallel_size=2)
    mesh = build_device_mesh(parallel, "cpu")
    model = ParallelVPiT(harness_model_config(), parallel, mesh, device="cpu", seed=0)
    dp_rank = mesh.get_local_rank("dp")
    batches = [synthetic_micro_batch(0, i, 1, 160, 251, 1152) for i in range(4)][2 * dp_rank:2 * dp_rank + 2]

    class NoImplicitDevice:
        # torch, except that buffers made without a device land on "meta" instead of the CPU
        def __getattr__(self, name):
            return getattr(torch, name)

        def zeros(self, *args, **kwargs):
            kwargs.setdefault("device", "meta")
            return torch.zeros(*args, **kwargs)

        def tensor(self, *args, **kwargs):
            kwargs.setdefault("device", "meta")
            return torch.tensor(*args, **kwargs)

    parallel_model.torch = NoImplicitDevice()
    all_reduce = dist.all_reduce

    def nccl_like_all_reduce(tensor, *args, **kwargs):
        if tensor.device != model.device:
            raise RuntimeError(f"all_reduce of a tensor on {tensor.device}; the model (and NCCL) is on {model.device}")
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = nccl_like_all_reduce
    step = model.forward_backward(batches)
    sums = model.evaluate(batches)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"step": step, "eval": sums}, f)
    dist.destroy_process_group()
""")


def test_reductions_use_the_model_device(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out.json"
    result = torchrun(script, 4, [str(out)], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["step"]["lm_tokens"] > 0 and got["step"]["visual_targets"] == 256  # a response image in each of 4 micro-batches
    assert got["eval"]["lm_tokens"] == got["step"]["lm_tokens"]
    assert abs(got["eval"]["lm_loss_sum"] / got["eval"]["lm_tokens"] - got["step"]["lm_loss"]) < 1e-6
