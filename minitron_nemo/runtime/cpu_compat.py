"""Make megatron-core 0.19.2 run on a machine without a GPU.

Every workaround megatron-core needs on CPU lives here, each with the failure it fixes.
`install()` does nothing when CUDA is available. It is idempotent and is called by
`runtime.distributed.initialize` before any megatron module is used.

With the CUDA build of torch and no GPU, megatron's CUDA calls fail with
"RuntimeError: Found no NVIDIA driver on your system".

`rank_start_method` picks how local ranks start (forkserver on CPU, spawn with CUDA). Three
CPU-speed helpers live here too, called by the trainer only and no-ops with CUDA:
`keep_freed_memory` (glibc keeps freed blocks), `allocate_optimizer_state` (Adam's moments
before the first step, not inside it) and `compile_layers` (`distill.cpu_compile`: torch.compile
of the transformer layers; it swaps megatron's tensor-parallel group lookup for one that does
not warn, process-wide, same result).
"""

from __future__ import annotations

import contextlib
import types

import torch

_INSTALLED = False


def cuda_available() -> bool:
    """True when a CUDA device can be used (then no workaround is installed)."""
    return torch.cuda.is_available()


def rank_start_method() -> str:
    """How `runtime.launch` starts local ranks: "forkserver" without CUDA (ranks forked from a
    process that imported torch and megatron-core once: a launch after the first 7.5 s -> 0.06 s
    on 2 cores),
    "spawn" with CUDA (a fresh interpreter: nothing CUDA-related is inherited through fork)."""
    return "spawn" if cuda_available() else "forkserver"


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


def installed() -> bool:
    """Whether the CPU redirections are active (this process runs megatron on CPU)."""
    return _INSTALLED


class _CpuWgradAccumulation:
    """CPU stand-in for apex's `fused_weight_gradient_mlp_cuda`: main_grad += grad_out^T x in."""

    @staticmethod
    def wgrad_gemm_accum_fp32(
        total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor
    ) -> None:
        if total_input.dtype == main_grad.dtype:
            main_grad.addmm_(grad_output.t(), total_input)
        else:  # bf16 activations, fp32 main_grad: the GEMM in bf16, as without the fusion
            main_grad.add_(grad_output.t().matmul(total_input))

    wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp32


def _rotary_without_copies(megatron_rotary):
    """megatron's `_apply_rotary_pos_emb_bshd` for the common case (no interleaving, every
    channel rotated): t * cos + rotate_half(t) * sin with rotate_half(t) = [-t2, t1], computed
    per half, [t1 * cos1 - t2 * sin1, t2 * cos2 + t1 * sin2], and concatenated once: the same
    products and sums (bitwise equal, gradients too) without building rotate_half(t) by
    concatenation and concatenating the empty unrotated rest (measured on [128, 4, 9, 64]:
    forward + backward 0.92 -> 0.79 ms). Other cases go to megatron's function."""

    def rotary(t, freqs, rotary_interleaved=False, mla_rotary_interleaved=False, mscale=1.0,
               multi_latent_attention=None):  # fmt: skip
        if (
            rotary_interleaved
            or mla_rotary_interleaved
            or multi_latent_attention
            or freqs.shape[-1] != t.shape[-1]
            or t.shape[-1] % 2
        ):
            return megatron_rotary(t, freqs, rotary_interleaved, mla_rotary_interleaved, mscale,
                                   multi_latent_attention)  # fmt: skip
        cos = (torch.cos(freqs) * mscale).to(t.dtype)
        sin = (torch.sin(freqs) * mscale).to(t.dtype)
        half = t.shape[-1] // 2
        t1, t2 = t[..., :half], t[..., half:]
        first = t1 * cos[..., :half] - t2 * sin[..., :half]
        second = t2 * cos[..., half:] + t1 * sin[..., half:]
        return torch.cat((first, second), dim=-1)

    return rotary


class _FusedAdamW(torch.optim.AdamW):
    """torch's AdamW with its fused (single-pass) CPU kernel unless asked otherwise."""

    def __init__(self, params, **kwargs) -> None:
        if not kwargs.get("foreach"):
            kwargs.setdefault("fused", True)
        super().__init__(params, **kwargs)


class _FusedAdam(torch.optim.Adam):
    """torch's Adam with its fused (single-pass) CPU kernel unless asked otherwise."""

    def __init__(self, params, **kwargs) -> None:
        if not kwargs.get("foreach"):
            kwargs.setdefault("fused", True)
        super().__init__(params, **kwargs)


class _TorchWithFusedAdam(types.ModuleType):
    """A view of `torch` whose `optim.Adam` / `optim.AdamW` use the fused kernel; installed
    only as the `torch` global of megatron's optimizer factory (optimizer/__init__.py)."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.optim = types.SimpleNamespace(
            **{**vars(torch.optim), "Adam": _FusedAdam, "AdamW": _FusedAdamW}
        )

    def __getattr__(self, name: str) -> object:
        return getattr(torch, name)


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

    # Without apex / TE megatron builds torch.optim.AdamW (optimizer/__init__.py reads
    # `torch.optim.AdamW` at call time), which on CPU defaults to the per-tensor loop: 8 passes
    # over each parameter's memory. torch's fused CPU kernel does one (71M parameters: ~210 ms
    # -> ~45 ms a step); same update rule and optimizer state layout.
    import megatron.core.optimizer as mcore_optimizer

    mcore_optimizer.torch = _TorchWithFusedAdam()  # type: ignore[attr-defined]

    # gradient_accumulation_fusion (models/build.py turns it on for trained models on CPU):
    # megatron's linear layers then add each weight gradient into the DDP buffer's main_grad
    # inside the GEMM (apex's fused_weight_gradient_mlp_cuda on GPU) instead of materialising
    # it and adding it in DDP's hook: one [out, in] temporary and one pass over it less per
    # linear layer and micro-batch.
    from megatron.core.tensor_parallel import layers as tp_layers

    tp_layers.fused_weight_gradient_mlp_cuda = _CpuWgradAccumulation  # type: ignore[attr-defined]
    tp_layers._grad_accum_fusion_available = True

    # Rotary embeddings (rope_utils._apply_rotary_pos_emb_bshd, every layer's q and k): the
    # unfused path concatenates the rotated halves and then the (empty) unrotated rest, two
    # copies of q and k per layer and direction; the same products without them.
    from megatron.core.models.common.embeddings import rope_utils

    rope_utils._apply_rotary_pos_emb_bshd = _rotary_without_copies(
        rope_utils._apply_rotary_pos_emb_bshd
    )

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

    # Every dist-checkpoint save (dist_checkpointing/strategies/filesystem_async.py, which the
    # default torch_dist strategy uses for synchronous saves too) hands its write results
    # through a queue of `multiprocessing.get_context("spawn").Manager()`: a server process, a
    # fresh interpreter that imports torch and megatron, made on the first save of each process
    # (~6 s on 2 cores, so in every rank of every launch that saves). On CPU every save is
    # synchronous (distill.async_save needs a GPU): the writer and the reader are this process,
    # and an in-process queue carries the same results.
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def keep_freed_memory() -> None:
    """Serve every allocation from the heap and never return freed heap memory to the OS.

    Not a megatron workaround but a CPU-speed one: glibc maps allocations above 32 MiB (a
    [tokens, vocab] fp32 block of the KD loss is 100 MB at 512 tokens) with a fresh mmap each
    time and unmaps them on free, so every step pays the page faults of touching them again
    (measured: 3.1M minor faults in 8 KD steps of bench/kd_throughput.py, 180 tokens/s; with
    this 1.0M and 200 tokens/s; peak RSS +7%). The CUDA caching allocator does the same
    for GPU memory. Called by the trainer only, not by `install`: a one-shot job (export,
    conversion, pruning) would keep its peak as resident memory, a training loop reuses it every
    step. No-op with CUDA or off glibc."""
    if cuda_available():
        return
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, 2**31 - 1)  # a C int: 2 GiB, the largest


def allocate_optimizer_state(optimizer) -> None:
    """Create Adam's state now for every parameter that has none: the step count 0 and zero
    moments, what torch.optim.Adam / AdamW create lazily inside their first step (the same
    tensors: dtype, device and layout chosen as torch chooses them; tests/test_trainer.py
    compares the two). `optimizer`: a megatron optimizer (chained or not) or a torch one.

    A CPU-speed helper like `keep_freed_memory`, called by the trainer after any resume.
    Created lazily, the moments (2 x the trained parameters) are allocated at the end of the
    first step, in the heap memory that step's activations have just freed, so the second
    step's activations grow the heap into fresh pages (measured, bench/kd_throughput.py, 71M
    student: 150-160k minor faults and 5.5-6.3 s for the second step instead of 4.2 s). Created
    before the first step, they sit below the activations from the start. No-op with CUDA (the
    caching allocator reuses device memory without page faults) and for other optimizers."""
    if cuda_available():
        return
    from torch.optim.optimizer import _get_scalar_dtype  # the dtype torch gives `step`

    for wrapper in getattr(optimizer, "chained_optimizers", [optimizer]):
        adam = getattr(wrapper, "optimizer", wrapper)
        if not isinstance(adam, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in adam.param_groups:
            # torch.optim.adam.Adam._init_group, "Lazy state initialization"
            on_device = group["capturable"] or group["fused"]
            for p in group["params"]:
                state = adam.state[p]
                if state:
                    continue
                if on_device:
                    dtype = _get_scalar_dtype(is_fused=group["fused"])
                    state["step"] = torch.zeros((), dtype=dtype, device=p.device)
                else:
                    state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )


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


def _tp_group_or_default(tp_group, is_expert=False, check_initialized=True):
    """megatron's `get_tensor_model_parallel_group_if_none` without its deprecation warning:
    RowParallelLinear passes `tp_group=None` on every forward, and a `warnings.warn` call (with
    keyword arguments) inside a compiled layer splits its graph at every linear layer."""
    from megatron.core import parallel_state

    if not torch.distributed.is_initialized() or not parallel_state.is_initialized():
        return tp_group
    if tp_group is not None:
        return tp_group
    if is_expert:
        return parallel_state.get_expert_tensor_parallel_group(check_initialized=check_initialized)
    return parallel_state.get_tensor_model_parallel_group(check_initialized=check_initialized)


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's inductor will call on CPU, found by inductor's own
    search (its `cpp.cxx` setting: $CXX, else g++; each candidate run with --version), or None
    when there is none (compiling would fail at the first step)."""
    from torch._inductor import cpp_builder, exc

    try:
        return cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        return None


def compile_layers(model: torch.nn.Module) -> None:
    """Compile each transformer layer's forward with torch.compile (inductor, C++ on CPU).
    No-op with CUDA, where TE's fused kernels do this job.

    Eager, a layer's small ops (norms, rotary, SwiGLU, residual adds, their backward) each pass
    over memory; compiled they are fused between the GEMMs. One compiled graph serves every
    layer of the same shapes (the parameters are graph inputs). The model must be built without
    `wgrad_into_main_grad`: its in-GEMM accumulation into main_grad is a side effect dynamo does
    not trace, and splits the graph at every linear layer (DDP adds the gradients instead).
    Measured (bench/kd_throughput.py, SmolLM2-135M -> the default student, 2 cores): 0 graph
    breaks; the KD step ~1.2x the eager one, after a first step of ~27 s that compiles (~5 s
    when inductor's on-disk cache has the graphs)."""
    if cuda_available():
        return
    from megatron.core.tensor_parallel import layers as tp_layers

    tp_layers.get_tensor_model_parallel_group_if_none = _tp_group_or_default
    for layer in model.decoder.layers:
        layer.compile()
