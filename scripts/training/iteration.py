"""One training iteration: the registration network and the task-mask subnet, each with its own optimiser.

The network is called as ``network(image, train=True)``, which returns the training dict
(:class:`scripts.networks.contract.TrainOutput`), so a stock ``DistributedDataParallel`` around it (and
around the task-mask subnet, :class:`scripts.networks.task_mask.TaskMaskNet`) synchronises both.

Why two objectives. The paper weights the per-chunk losses with the subnet's mask M (N, T, 2):
L = M0 * L_reg + M1 * L_smooth. Minimised over M as well, this is linear in M on the simplex, so the
subnet's best answer is a one-hot on whichever term is smaller: the mask collapses (the "joint"
objective below, kept as the paper-literal option and as the negative control of the tests).

The bundle's scheme ("difficulty", the default):
* the registration network is trained on the composite loss with M DETACHED (it cannot move M);
* the subnet (input: detached decoder features) is trained by its own optimiser to PREDICT each
  chunk's relative difficulty: per sample, each term's per-chunk losses are standardised across the T
  chunks (z-scores: free of the terms' units and signs; MI is negative), and the target share of the
  registration term is q = floor + (1 - 2 floor) * sigmoid((z_reg - z_smooth) / temperature); the
  subnet minimises the cross-entropy to (q, 1 - q). Cross-entropy is minimised AT the target, which
  lies in [floor, 1 - floor], so there is nothing to gain by collapsing: a chunk whose registration
  is poor relative to the other chunks gets more registration weight, a chunk whose field is rough
  relative to the others gets more smoothing weight.
"""

from __future__ import annotations

import torch
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys

from scripts.training.losses import composite_loss

__all__ = ["difficulty_targets", "mask_objective", "RegistrationIteration"]

MASK_OBJECTIVES = ("difficulty", "joint")
AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def difficulty_targets(
    reg: torch.Tensor, smooth: torch.Tensor, floor: float = 0.1, temperature: float = 1.0, eps: float = 1e-12
) -> torch.Tensor:
    """Target mask (N, T, 2) from per-chunk losses reg, smooth (N, T) (detached); rows sum to 1.

    Each term is standardised across the T chunks of its sample; the registration share is
    floor + (1 - 2 floor) * sigmoid((z_reg - z_smooth) / temperature).
    """

    def standardise(x):
        x = x.detach().float()
        centred = x - x.mean(dim=1, keepdim=True)
        return centred / (centred.pow(2).mean(dim=1, keepdim=True).sqrt() + eps)

    q = floor + (1.0 - 2.0 * floor) * torch.sigmoid((standardise(reg) - standardise(smooth)) / temperature)
    return torch.stack([q, 1.0 - q], dim=-1)


def mask_objective(
    mask: torch.Tensor,
    reg: torch.Tensor,
    smooth: torch.Tensor,
    objective: str = "difficulty",
    floor: float = 0.1,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Scalar loss of the task-mask subnet; mask (N, T, 2) with graph, reg/smooth (N, T) used detached.

    "difficulty": cross-entropy to :func:`difficulty_targets` (does not collapse).
    "joint": the paper-literal mean(M0 * reg + M1 * smooth) (collapses to a one-hot; negative control).
    """
    reg, smooth = reg.detach().float(), smooth.detach().float()
    if objective == "difficulty":
        target = difficulty_targets(reg, smooth, floor, temperature)
        return -(target * torch.log(mask.clamp_min(1e-12))).sum(dim=-1).mean()
    if objective == "joint":
        return (mask[..., 0] * reg + mask[..., 1] * smooth).mean()
    raise ValueError(f"mask objective must be one of {MASK_OBJECTIVES}, got {objective!r}")


class RegistrationIteration:
    """``iteration_update`` for ``monai.engines.SupervisedTrainer`` (registration + task mask).

    Batch keys: "image" (N, 2, H, W, D) = [moving, fixed] in [0, 1], "moving_label", "fixed_label"
    (N, C, H, W, D), channel 0 = gland. The trainer's network (a
    :class:`scripts.networks.contract.RegistrationNetwork`, or a ``DistributedDataParallel`` of one) is run in
    training mode, ``network(image, train=True)`` -> ``{"ddf", "velocity", "features"}``; the trainer's ``optimizer`` steps
    it on :func:`composite_loss`. ``task_mask`` (N, C, H, W, D) features -> (N, T, 2) mask reads the detached
    ``features``; ``mask_optimizer`` (over ``task_mask``'s parameters) steps it on :func:`mask_objective`.
    Without ``task_mask`` (None: the no-task-mask ablation, the baselines): the plain composite loss.

    Args:
        loss_function: a :class:`scripts.training.losses.RegistrationLoss`.
        task_mask: the task-mask subnet (:class:`scripts.networks.task_mask.TaskMaskNet`, or a
            ``DistributedDataParallel`` of it), or None.
        mask_optimizer: optimiser of ``task_mask``'s parameters (required with ``task_mask``).
        mask_objective: "difficulty" (default) or "joint" (paper-literal, collapses).
        mask_floor, mask_temperature: of :func:`difficulty_targets`.
        amp: False, or "bfloat16" / "float16" (True = "bfloat16"): autocast of the network forward;
            losses, VecInt and the task mask run in fp32; "float16" adds a gradient scaler.
        grad_clip: None, or the largest L2 norm of the registration gradient (over the trainer
            optimiser's parameters, ``torch.nn.utils.clip_grad_norm_``) before each step.

    Returns (as ``engine.state.output``): "image", "label" (= fixed_label), "pred" (ddf, voxels),
    "loss" (detached scalar), "mask_loss", "dice", "mi", "grad", "warped_image", "warped_label",
    "moving_label", "fixed_label", and "task_mask" (N, T, 2) with the subnet.
    """

    def __init__(
        self,
        loss_function,
        task_mask: torch.nn.Module | None = None,
        mask_optimizer: torch.optim.Optimizer | None = None,
        mask_objective: str = "difficulty",
        mask_floor: float = 0.1,
        mask_temperature: float = 1.0,
        amp: bool | str = False,
        grad_clip: float | None = None,
    ):
        if mask_objective not in MASK_OBJECTIVES:
            raise ValueError(f"mask_objective must be one of {MASK_OBJECTIVES}, got {mask_objective!r}")
        amp = "bfloat16" if amp is True else amp
        if amp and amp not in AMP_DTYPES:
            raise ValueError(f"amp must be False, True, 'bfloat16' or 'float16', got {amp!r}")
        if task_mask is not None and mask_optimizer is None:
            raise ValueError("a task_mask needs its mask_optimizer (over the task mask's parameters)")
        self.loss_function = loss_function
        self.task_mask, self.mask_optimizer = task_mask, mask_optimizer
        self.objective, self.floor, self.temperature = mask_objective, mask_floor, mask_temperature
        self.amp_dtype = AMP_DTYPES[amp] if amp else None
        self.scaler = None  # created on first use for float16
        if grad_clip is not None and not float(grad_clip) > 0:
            raise ValueError(f"grad_clip must be None or a positive number, got {grad_clip!r}")
        self.grad_clip = None if grad_clip is None else float(grad_clip)

    def _clip(self, optimizer) -> None:
        if self.grad_clip is not None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)

    def __call__(self, engine, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("RegistrationIteration needs a batch, got None")
        device, non_blocking = engine.state.device, engine.non_blocking
        image = batchdata["image"].to(device, non_blocking=non_blocking)
        moving_label = batchdata["moving_label"].to(device, non_blocking=non_blocking)
        fixed_label = batchdata["fixed_label"].to(device, non_blocking=non_blocking)
        net = engine.network
        net.train()
        engine.optimizer.zero_grad(set_to_none=getattr(engine, "optim_set_to_none", False))

        autocast_dtype = self.amp_dtype or torch.bfloat16  # the dtype is unused when autocast is disabled
        with torch.autocast(torch.device(device).type, dtype=autocast_dtype, enabled=self.amp_dtype is not None):
            out = net(image, train=True)  # the TrainOutput dict (the network contract), through DDP's forward
        mask = None
        if self.task_mask is not None:  # its own graph: the features are detached; fp32 inside
            if out["features"] is None:
                raise ValueError("this network exposes no features for the task mask: set task_mask to null")
            self.task_mask.train()
            mask = self.task_mask(out["features"].detach())
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        true_ddf = batchdata.get("true_ddf")  # the phantom's field (scripts.data.transforms.TrueFieldToBoxd), if loaded
        terms = self.loss_function(
            out["ddf"],
            image[:, :1],
            image[:, 1:2],
            moving_label,
            fixed_label,
            true_ddf=None if true_ddf is None else true_ddf.to(device, non_blocking=non_blocking),
        )
        loss = composite_loss(terms, mask)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)

        if self.amp_dtype == torch.float16:
            if self.scaler is None:
                self.scaler = torch.amp.GradScaler(torch.device(device).type)
            self.scaler.scale(loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            if self.grad_clip is not None:
                self.scaler.unscale_(engine.optimizer)
            self._clip(engine.optimizer)
            self.scaler.step(engine.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            self._clip(engine.optimizer)
            engine.optimizer.step()

        output = {
            CommonKeys.IMAGE: image,
            CommonKeys.LABEL: fixed_label,
            CommonKeys.PRED: out["ddf"].detach(),
            CommonKeys.LOSS: loss.detach(),
            "moving_label": moving_label,
            "fixed_label": fixed_label,
            "warped_image": terms["warped_image"].detach(),
            "warped_label": terms["warped_label"].detach(),
            "dice": terms["dice"],
            "mi": terms["mi"],
            "grad": terms["grad"],
        }
        if mask is not None:  # the subnet's own step; its graph is separate (detached features)
            self.mask_optimizer.zero_grad()
            mask_loss = mask_objective(
                mask, terms["reg"], terms["smooth"], self.objective, self.floor, self.temperature
            )
            mask_loss.backward()
            self.mask_optimizer.step()
            output.update(task_mask=mask.detach(), mask_loss=mask_loss.detach())
        engine.state.output = output
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
