"""Make megatron-core 0.19.2 run on a machine without a GPU.

Every workaround megatron-core needs on CPU lives here, each with the failure it fixes.
`install()` does nothing when CUDA is available. It is idempotent and is called by
`runtime.distributed.initialize` before any megatron module is used.

With the CUDA build of torch and no GPU, megatron's CUDA calls fail with
"RuntimeError: Found no NVIDIA driver on your system".
"""

from __future__ import annotations

import contextlib
import types

import torch

_INSTALLED = False


def cuda_available() -> bool:
    """True when a CUDA device can be used (then no workaround is installed)."""
    return torch.cuda.is_available()


class _NullEvent:
    """Stand-in for `torch.cuda.Event` (work on CPU is complete when it returns)."""

    def synchronize(self) -> None:
        return None

    def wait(self, _stream: object = None) -> None:
        return None


class _NullStream:
    """Stand-in for `torch.cuda.Stream` (DDP grad sync calls `current_stream().wait_stream`;
    the MoE alltoall dispatcher records an event on its own stream and synchronises it)."""

    def wait_stream(self, _stream: object) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def record_event(self, _event: object = None) -> _NullEvent:
        return _NullEvent()


_NULL_STREAM = _NullStream()


def _redirect_cuda_device(device: object) -> object:
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _TorchWithCpuFactories(types.ModuleType):
    """A view of `torch` whose tensor factories map device="cuda" to the CPU.

    Installed only as the `torch` global of megatron modules that hard-code device="cuda"
    (`pipeline_parallel/schedules.py`: `torch.zeros([], device="cuda")` for the token count in
    both the no-pipelining and the 1F1B schedule; optimizer grad-norm / clip helpers).
    """

    _FACTORIES = ("zeros", "ones", "empty", "tensor", "full", "zeros_like", "ones_like")

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> object:
        attr = getattr(torch, name)
        if name in self._FACTORIES:

            def factory(*args: object, **kwargs: object) -> torch.Tensor:
                if "device" in kwargs:
                    kwargs["device"] = _redirect_cuda_device(kwargs["device"])
                return attr(*args, **kwargs)

            return factory
        return attr


def install() -> None:
    """Redirect megatron-core's CUDA-only calls to the CPU. No-op when CUDA is available."""
    global _INSTALLED
    if _INSTALLED or cuda_available():
        return
    _INSTALLED = True

    # Rotary embeddings (every forward), TP gathers (tensor_parallel/mappings.py), pipeline
    # receive buffers (p2p_communication.py), dist-ckpt save and DDP all allocate on
    # `torch.cuda.current_device()`: "Found no NVIDIA driver on your system".
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    # p2p_communication.py and the schedules call torch.cuda.synchronize() after sends.
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    # distributed/param_and_grad_buffer.py: `torch.cuda.current_stream()` around grad sync.
    torch.cuda.current_stream = lambda device=None: _NULL_STREAM  # type: ignore[assignment]
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()  # type: ignore[assignment]
    # language_module.py `setup_embeddings_and_output_layer` (tied embeddings at PP > 1) does
    # `weight.data = weight.data.cuda()` before all-reducing the copy on the last stage.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[assignment]

    # schedules.py allocates `torch.zeros([], dtype=torch.int, device="cuda")`; the optimizer's
    # clip_grads.py / optimizer.py build `torch.tensor(..., device="cuda")` for grad norms, and
    # utils.py's local_multi_tensor_l2_norm (no apex/TE) `torch.tensor(..., device="cuda")`.
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.pipeline_parallel import schedules

    cpu_torch = _TorchWithCpuFactories()
    for module in (schedules, clip_grads, optimizer, mcore_utils):
        module.torch = cpu_torch  # type: ignore[attr-defined]

    # clip_grads.clip_grad_by_total_norm_fp32 asserts `param.grad.type() ==
    # 'torch.cuda.FloatTensor'`; the optimizer calls it through its own imported name.
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32

    # Attention / dropout fork "model-parallel-rng" of the CUDA RNG tracker, whose seeding
    # (`model_parallel_cuda_manual_seed`) calls torch.cuda.get_rng_state. A tracker that keeps
    # CPU generator states works with dropout and activation recompute.
    from megatron.core.tensor_parallel import random as tp_random

    tp_random.CudaRNGStatesTracker = _CpuRNGStatesTracker  # type: ignore[misc]
    # Activation recompute (megatron's CheckpointFunction) saves and restores the CUDA RNG
    # state around the recomputed forward; there is none on CPU (its CPU state is handled
    # beside it, and the tracker above holds the model-parallel states).
    tp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    tp_random._set_cuda_rng_state = lambda *args, **kwargs: None

    # MoE alltoall token dispatcher (transformer/moe/token_dispatcher.py): its constructor
    # creates `torch.cuda.Stream()` for device-to-host copies of the split sizes unless the
    # class already holds one; give it the null stream (current_stream() returns the same
    # object, so no side-stream handling is attempted).
    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _NULL_STREAM
    # Its split sizes are moved to host only from CUDA tensors, so on CPU they stay tensors,
    # which gloo's all_to_all_single refuses ("incompatible function arguments"): pass lists.
    token_dispatcher.all_to_all = _all_to_all_with_list_splits


def _all_to_all_with_list_splits(group, input_, output_split_sizes_=None, input_split_sizes=None,
                                 use_nccl_stream=False):  # fmt: skip
    """megatron's `tensor_parallel.all_to_all` with split sizes given as Python lists."""
    from megatron.core.tensor_parallel import mappings

    def as_list(sizes):
        return None if sizes is None else [int(x) for x in sizes]

    return mappings.all_to_all(
        group, input_, as_list(output_split_sizes_), as_list(input_split_sizes), use_nccl_stream
    )


def _clip_grad_by_total_norm_fp32(
    parameters, max_norm: float, total_norm: float, use_decoupled_grad: bool = False
) -> None:
    """megatron's clip_grad_by_total_norm_fp32 (same scaling) without its CUDA-type assert."""
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if isinstance(clip_coeff, torch.Tensor):
        torch._foreach_mul_(grads, clip_coeff.clamp_max(1.0))
    elif clip_coeff < 1.0:
        torch._foreach_mul_(grads, clip_coeff)


class _CpuRNGStatesTracker:
    """Megatron's CudaRNGStatesTracker, keeping CPU generator states instead of CUDA ones."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)
