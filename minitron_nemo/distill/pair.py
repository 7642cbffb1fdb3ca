"""Teacher and student as one pipeline-parallel module.

Each pipeline stage holds its slice of both models. Between stages the activations travel as one
tensor [s, b, h_student + h_teacher] (the schedule's shapes are widened accordingly), so
megatron's 1F1B schedule runs the pair unchanged. The teacher runs without gradients; only the
student (and the intermediate-loss projection) are trained. The student is `self.module`, so
megatron helpers that unwrap `.module` (tied-embedding grad sync) find it.
On the last stage both models stop at their final norm (megatron's `output_processor` hook): the
loss applies the output layers chunk by chunk (distill/vocab_loss.py), so neither model's
full-vocabulary logits are materialised, nor transposed to [b, s, v] as GPTModel would.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule

from minitron_nemo.distill.losses import intermediate_loss
from minitron_nemo.runtime.forward import position_ids


class AttachAuxLoss(torch.autograd.Function):
    """Return `output` unchanged; in backward also send d(scale * aux_loss) = scale to aux_loss.

    This lets a loss computed on any pipeline stage join the backward pass that the schedule
    starts from the last stage (megatron's MoE aux-loss scaler works the same way).
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor, scale) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale  # a float or a device scalar (dynamic alpha, no host sync)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.ones_like(aux_loss) * ctx.scale, None


def final_hidden_states(hidden_states: torch.Tensor, **_kwargs) -> torch.Tensor:
    """megatron output_processor: return the last stage's hidden states after the final norm."""
    return hidden_states


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    """This rank's slice [v/tp, h] of a last-stage model's output layer weight."""
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMS normalisation: hidden states compared 'after the norm'."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class KDPair(MegatronModule):
    """student (trainable) + optional frozen teacher, run in lockstep."""

    def __init__(
        self,
        student: torch.nn.Module,
        teacher: torch.nn.Module | None,
        projection: torch.nn.Module | None = None,
        pairs: list[tuple[int, int]] | None = None,
        intermediate_kind: str = "cosine",
    ) -> None:
        super().__init__(config=student.config)
        self.module = student
        self.teacher = teacher
        self.projection = projection
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        self.h_student = student.config.hidden_size
        self.h_teacher = teacher.config.hidden_size if teacher is not None else 0
        if projection is not None and not parallel_state.is_pipeline_first_stage():
            # The projection is replicated on every stage (its grads are summed over PP by the
            # trainer); megatron counts `shared` params once in the grad norm, like tied
            # embeddings on the last stage.
            for p in projection.parameters():
                p.shared = True
        self.teacher_output: torch.Tensor | None = None
        self.pairs = list(pairs or [])
        self.intermediate_kind = intermediate_kind
        self.aux_scale: float | torch.Tensor = 1.0  # set each step: weight / micro-batches
        self.intermediate_values: list[torch.Tensor] = []
        self._captured: dict[tuple[str, int], torch.Tensor] = {}
        if self.pairs:
            self._hook("student", student, {s for s, _ in self.pairs})
            self._hook("teacher", teacher, {t for _, t in self.pairs})
        self.pre_process = student.pre_process
        self.post_process = student.post_process
        self.share_embeddings_and_output_weights = student.share_embeddings_and_output_weights

    def _hook(self, which: str, model: torch.nn.Module, layers: set[int]) -> None:
        for layer in model.decoder.layers:
            g = layer.layer_number - 1
            if g in layers:

                def capture(_module, _args, output, key=(which, g)):
                    self._captured[key] = output[0]

                layer.register_forward_hook(capture)

    def _intermediate(self) -> torch.Tensor | None:
        """Sum of this stage's intermediate losses (pairs whose layers both ran here)."""
        total = None
        for s, t in self.pairs:
            if ("student", s) in self._captured and ("teacher", t) in self._captured:
                s_h = _normalize(self._captured[("student", s)])
                t_h = _normalize(self._captured[("teacher", t)])
                loss = intermediate_loss(
                    s_h.to(self.projection.weight.dtype),
                    t_h,
                    self.projection,
                    self.intermediate_kind,
                )
                total = loss if total is None else total + loss
        self._captured.clear()
        return total

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        return self.module.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor
        if tensor is None or self.teacher is None:
            self.module.set_input_tensor(tensor)
            return
        self.module.set_input_tensor(tensor[..., : self.h_student])
        self.teacher.set_input_tensor(tensor[..., self.h_student :].detach())

    def adjust_tensor_shapes(self, recv_shapes, send_shapes):
        """Widen the schedule's p2p shapes to carry both models' activations."""
        width = self.h_student + self.h_teacher

        def widen(shapes):
            return [(s, b, width) for (s, b, _h) in shapes]

        return widen(recv_shapes), widen(send_shapes)

    def forward(self, tokens_bs: torch.Tensor) -> torch.Tensor:
        """Last stage: the student's final hidden states [s, b, h] (the teacher's are kept in
        `teacher_output`); other stages: both models' activations, concatenated."""
        pos = position_ids(tokens_bs)
        kwargs = dict(attention_mask=None, output_processor=final_hidden_states)
        student_out = self.module(tokens_bs, pos, **kwargs)
        if self.teacher is None:
            return student_out
        with torch.no_grad():
            teacher_out = self.teacher(tokens_bs, pos, **kwargs)
        aux = self._intermediate() if self.pairs else None
        if aux is not None:
            self.intermediate_values.append(aux.detach())
            student_out = AttachAuxLoss.apply(student_out, aux, self.aux_scale)
        if parallel_state.is_pipeline_last_stage():
            self.teacher_output = teacher_out
            return student_out
        return torch.cat([student_out, teacher_out.detach()], dim=-1)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """The student's checkpoint keys (a distilled checkpoint loads as a plain model), plus
        the projection under `kd_projection.` when there is one."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        state = self.module.sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.projection is not None:
            # Replicated on every rank: exactly one (all ranks 0) is the main replica.
            replica = (
                parallel_state.get_pipeline_model_parallel_rank(),
                parallel_state.get_tensor_model_parallel_rank(),
                parallel_state.get_data_parallel_rank(),
            )
            for name, tensor in self.projection.state_dict(prefix="", keep_vars=True).items():
                key = f"{prefix}kd_projection.{name}"
                state[key] = ShardedTensor.from_rank_offsets(key, tensor, replica_id=replica)
        return state
