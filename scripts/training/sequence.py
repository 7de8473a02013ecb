"""Training the sequence mode (:class:`scripts.networks.sequence.SequenceRegistrationNet`) on windows of frames.

The data is a frame view of a sequence folder (``python -m scripts frames``: frame ``t`` of ``caseN`` is the pair
``caseN_fTTT``), pre-staged per frame by the static training transforms (``train#preprocessing``, cached).
:class:`SequenceWindows` groups a case's frames into windows of ``window`` consecutive frames, each with the
frames before it as burn-in; :class:`SequenceIteration` runs the burn-in without gradients (truncated
back-propagation: the state enters the window detached), then the window with gradients, and steps the
optimiser on the mean over the window's frames of the static loss (:class:`scripts.training.losses.RegistrationLoss`).
A frozen static network's velocity of each frame is computed once and reused (the network is unchanged and
the pre-staged frames are the same every epoch).
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys
from torch.utils.data import Dataset

from scripts.data.nifti import InputError
from scripts.training.losses import composite_loss

__all__ = ["SequenceWindows", "SequenceIteration", "frame_of"]

FRAME_NAME = re.compile(r"^(?P<case>.+)_f(?P<frame>\d{3})$")
KEYS = ("image", "moving_label", "fixed_label", "true_ddf")


def frame_of(name: str) -> tuple[str, int]:
    """``"case000003_f007"`` -> ``("case000003", 7)`` (the frame view's names); other names are an InputError."""
    match = FRAME_NAME.match(name)
    if match is None:
        raise InputError(f"{name}: not a frame of a sequence (expected <case>_fNNN; python -m scripts frames)")
    return match["case"], int(match["frame"])


class SequenceWindows(Dataset):
    """Windows of ``window`` consecutive frames of one case from a per-frame dataset (one item per frame).

    Item ``i``: ``KEYS`` present in the frames stacked on a new axis 0 (``image`` (W, 2, H, W, D), labels
    (W, C, H, W, D), ``true_ddf`` (W, 3, H, W, D)), and ``burn_in_image`` (B, 2, H, W, D), the B >= 0 frames
    before the window. Every start ``0 .. T - window`` of every case is a window.
    """

    def __init__(self, frames: Dataset, window: int = 4):
        self.frames, self.window = frames, int(window)
        if self.window < 1:
            raise ValueError(f"window={window}: expected at least 1 frame")
        cases = defaultdict(dict)
        for index, item in enumerate(frames.data):
            case, t = frame_of(item["case"])
            cases[case][t] = index
        self.windows = []
        for case, by_frame in sorted(cases.items()):
            order = [by_frame[t] for t in sorted(by_frame)]
            if sorted(by_frame) != list(range(len(order))):
                raise InputError(f"{case}: frames {sorted(by_frame)} are not 0 .. {len(order) - 1}")
            if len(order) < self.window:
                raise InputError(f"{case}: {len(order)} frames, fewer than the window ({self.window})")
            self.windows += [
                (order[:start], order[start : start + self.window]) for start in range(len(order) - self.window + 1)
            ]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict:
        burn, frames = self.windows[i]
        items = [self.frames[j] for j in frames]
        out = {k: torch.stack([torch.as_tensor(x[k]) for x in items]) for k in KEYS if k in items[0]}
        image = out["image"]
        burn_in = [torch.as_tensor(self.frames[j]["image"]) for j in burn]
        out["burn_in_image"] = torch.stack(burn_in) if burn_in else image.new_zeros((0, *image.shape[1:]))
        out["frame_index"], out["burn_in_index"] = torch.tensor(frames), torch.tensor(burn, dtype=torch.long)
        return out


class SequenceIteration:
    """``iteration_update`` of ``monai.engines.SupervisedTrainer`` for the sequence mode.

    Batch (batch size 1 from :class:`SequenceWindows`): ``image`` (1, W, 2, H, W, D), ``moving_label`` and
    ``fixed_label`` (1, W, C, H, W, D), optional ``true_ddf`` (1, W, 3, H, W, D), ``burn_in_image``
    (1, B, 2, H, W, D). Loss: the mean over the W frames of :func:`composite_loss` of ``loss_function``.
    ``grad_clip``: None or the largest gradient norm (``clip_grad_norm_``) before each step.
    """

    def __init__(self, loss_function, grad_clip: float | None = None):
        self.loss_function = loss_function
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        self.static_cache: dict[int, torch.Tensor] = {}  # frame index -> the frozen static network's velocity

    def _static(self, net, images: torch.Tensor, indices: torch.Tensor):
        """Each frame's static velocity, computed once per frame of the dataset (None: not frozen, not reusable)."""
        if not net.freeze_static:
            return None
        for t, i in enumerate(indices.tolist()):
            if i not in self.static_cache:
                self.static_cache[i] = net.static_velocity(images[:, t])
        return [self.static_cache[i] for i in indices.tolist()]

    def __call__(self, engine, batchdata: dict) -> dict:
        device = engine.state.device
        batch = {k: v.to(device) for k, v in batchdata.items() if isinstance(v, torch.Tensor)}
        net = engine.network
        net.train()
        engine.optimizer.zero_grad(set_to_none=True)
        burn = batch["burn_in_image"]
        state = net.burn_in(burn, None, self._static(net, burn, batch["burn_in_index"][0])) if burn.shape[1] else None
        image = batch["image"]
        out, _ = net.forward_sequence(image, state, self._static(net, image, batch["frame_index"][0]))
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        losses, dice = [], []
        for w in range(image.shape[1]):
            true_ddf = batch.get("true_ddf")
            terms = self.loss_function(
                out["ddf"][:, w],
                image[:, w, :1],
                image[:, w, 1:2],
                batch["moving_label"][:, w],
                batch["fixed_label"][:, w],
                true_ddf=None if true_ddf is None else true_ddf[:, w],
            )
            losses.append(composite_loss(terms))
            dice.append(terms["dice"])
        loss = torch.stack(losses).mean()
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if self.grad_clip is not None:
            params = [p for group in engine.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        engine.optimizer.step()
        engine.state.output = {
            CommonKeys.IMAGE: image,
            CommonKeys.PRED: out["ddf"].detach(),
            CommonKeys.LOSS: loss.detach(),
            "dice": torch.stack([torch.as_tensor(d, dtype=torch.float32) for d in dice]).mean(),
        }
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
