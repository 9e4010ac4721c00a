"""`RaptorDistill`: distil a frozen ViT teacher into k block-recurrent blocks, then probe both linearly.

One fit runs the whole method:
1. setup: build the teacher, read its per-layer summaries on `phase_images` training images, compute
   the layer similarity matrix and split the depth into k contiguous phases (DP by default), unless
   `phase_boundaries` is given; the matrix with the boundaries is saved to figures/phases.png.
2. stage 1 (the first `stage1_fraction` of the steps): each block learns its own phase from teacher
   inputs, with a teacher-forcing weight lambda falling linearly from 1 to 0 over the first
   `tf_fraction` of the stage, then pure autoregressive rollouts.
3. stage 2 (the remaining steps, fresh AdamW): the whole stack rolled out from a_0, loss averaged
   over all L layers with `stage2_token_weights`.
4. test: per-layer fidelity R^2, and linear probes with one protocol for teacher and Raptor.

The teacher is rebuilt from its arguments and left out of the checkpoints.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from lightning_modules.raptor import phases as phase_lib
from lightning_modules.raptor.blocks import RaptorBlock, TeacherArchBlock, count_parameters
from lightning_modules.raptor.evaluation import FidelityR2, LinearProbe, count_flops, fit_linear_probe
from lightning_modules.raptor.teacher import DEFAULT_TEACHER_RUN, build_teacher
from lightning_modules.trajectory import Trajectory
from lightning_modules.vit import backbone
from lightning_modules.vit.module import warmup_cosine

log = logging.getLogger(__name__)


def tf_weight(step: int, total: int, tf_fraction: float) -> float:
    """Return lambda, the teacher-forcing weight: 1 at step 0, linearly down to 0 at tf_fraction x total."""
    ramp = tf_fraction * total
    if ramp <= 0:
        return 0.0
    return max(0.0, 1.0 - step / ramp)


def weighted_mse(
    pred: Tensor, target: Tensor, weights: list[float] | None, groups: dict[str, Tensor]
) -> Tensor:
    """Return the MSE over all tokens, or w_cls MSE(cls) + w_reg MSE(reg) + w_patch MSE(patch).

    Each group's MSE is averaged within the group; a group with no tokens (no registers) is skipped.
    """
    if weights is None:
        return F.mse_loss(pred, target)
    total = pred.new_zeros(())
    for weight, name in zip(weights, ("cls", "reg", "patch"), strict=False):
        index = groups[name]
        if weight == 0 or index.numel() == 0:
            continue
        total = total + weight * F.mse_loss(pred[:, index], target[:, index])
    return total


class RaptorDistill(LightningModule):
    """Block-recurrent distillation of a ViT teacher.

    Args:
        num_classes, image_size, in_channels: set by the DataModule through the CLI links. in_channels must
            equal the teacher's input channels. It is an argument so that the linked value, which Lightning
            stores in the checkpoint's hyperparameters, is accepted when `--ckpt_path` reloads them.
        teacher: a vit task run folder (default: its fixed location, trained first when empty), a .ckpt
            of the vit task, or a timm model name.
        teacher_pretrained: for a timm name, download the hub weights.
        teacher_weights: for a timm name, a local state-dict file (.pth / .safetensors).
        teacher_kwargs: extra arguments for `timm.create_model` (e.g. {"depth": 4} for a small test).
        train_teacher: train the vit task into the teacher run folder when it contains no checkpoint.
        teacher_train_args: extra CLI arguments for that teacher run (e.g. a preset).
        k: number of phases and blocks; None picks it from `k_gain_threshold`.
        phase_boundaries: fixed phase end boundaries (1-based, last = depth), skipping discovery.
        phase_method: "dp" (exact contiguous segmentation) or "maxcut" (recursive max-cut with `maxcut_f`).
        min_phase_length: minimum number of layers per phase for the DP.
        phase_images: training images whose summaries (cls, mean patch) give the similarity matrix.
        block: "raptor" (trained from scratch) or "teacher" (teacher-architecture blocks).
        block_init: for block="teacher", "copy" (from the first teacher layer of each phase) or "random".
        mlp, mlp_ratio, ln_eps, init_values, depth_scaling: Raptor block options (SwiGLU or GELU MLP,
            LayerNorm eps, LayerScale init, depth conditioning init "small", "zero" or "none").
        stage1_fraction: share of the steps spent in stage 1 (0 = stage 2 only, 1 = stage 1 only).
        tf_fraction: share of stage 1 over which lambda falls from 1 to 0.
        stage1_token_weights: (cls, reg, patch) loss weights for every phase but the last; None = plain MSE.
        stage1_last_token_weights: the same for the last phase.
        stage2_token_weights: the same for stage 2.
        lr, weight_decay, warmup_fraction, min_lr, grad_clip: AdamW, warm-up share of each stage,
            cosine floor, global gradient-norm clip.
        probe_l2: L2 strengths tried for the linear probes (picked on the validation split).
        probe_max_batches: at most this many training batches for the probe features (None = all).
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 16,
        in_channels: int = 3,
        teacher: str = DEFAULT_TEACHER_RUN,
        teacher_pretrained: bool = False,
        teacher_weights: str | None = None,
        teacher_kwargs: dict[str, Any] | None = None,
        train_teacher: bool = True,
        teacher_train_args: list[str] | None = None,
        k: int | None = 2,
        phase_boundaries: list[int] | None = None,
        phase_method: Literal["dp", "maxcut"] = "dp",
        maxcut_f: float = 0.2,
        min_phase_length: int = 1,
        k_gain_threshold: float = 0.05,
        phase_images: int = 512,
        block: Literal["raptor", "teacher"] = "raptor",
        block_init: Literal["copy", "random"] = "random",
        mlp: Literal["swiglu", "gelu"] = "swiglu",
        mlp_ratio: float = 4.0,
        ln_eps: float = 1e-5,
        init_values: float = 1e-5,
        depth_scaling: Literal["small", "zero", "none"] = "small",
        stage1_fraction: float = 0.5,
        tf_fraction: float = 0.25,
        stage1_token_weights: list[float] | None = None,
        stage1_last_token_weights: list[float] | None = (0.34, 0.33, 0.33),
        stage2_token_weights: list[float] | None = (0.45, 0.10, 0.45),
        lr: float = 3e-4,
        weight_decay: float = 1e-4,
        warmup_fraction: float = 0.032,
        min_lr: float = 1e-6,
        grad_clip: float = 1.0,
        probe_l2: list[float] = (1e-4, 1e-3, 1e-2),
        probe_max_batches: int | None = None,
    ):
        super().__init__()
        for name in ("stage1_token_weights", "stage1_last_token_weights", "stage2_token_weights", "probe_l2"):
            value = locals()[name]
            if value is not None and name != "probe_l2" and len(value) != 3:
                raise ValueError(
                    f"{name}={list(value)} is invalid: give three weights (cls, registers, patches)."
                )
        self.save_hyperparameters()
        self.hparams.update({k: list(v) for k, v in self.hparams.items() if isinstance(v, tuple)})
        self.automatic_optimization = False
        if not 0.0 <= stage1_fraction <= 1.0:
            raise ValueError(f"stage1_fraction={stage1_fraction} is invalid: use a value in [0, 1].")
        if k is not None and not (isinstance(k, int) and k >= 1):
            raise ValueError(
                f"k={k} is invalid: use a positive number of phases, or null to choose it automatically."
            )
        if phase_boundaries is not None and k is not None and len(phase_boundaries) != k:
            raise ValueError(
                f"phase_boundaries={list(phase_boundaries)} give {len(phase_boundaries)} phases but k={k}: "
                "set k to "
                f"{len(phase_boundaries)} or null."
            )
        # The teacher and the blocks are built in `build()` (called from setup, checkpoint loading and the
        # analysis methods), so constructing the module stays cheap: no download and no teacher training.
        self.teacher: nn.Module | None = None
        self.teacher_source = ""
        self.register_buffer("phase_bounds", torch.zeros(0, dtype=torch.long))
        self.blocks = nn.ModuleList()
        self.routing: list[int] = []
        self.similarity: Tensor | None = None
        self.probes: dict[str, LinearProbe] = {}
        self.report: dict[str, float | str] = {}

    def build(self) -> RaptorDistill:
        """Build the frozen teacher (trained first when its run folder is empty) and the blocks, once."""
        if self.teacher is not None:
            return self
        hp = self.hparams
        teacher_model, self.teacher_source = build_teacher(
            hp.teacher,
            pretrained=hp.teacher_pretrained,
            weights=hp.teacher_weights,
            kwargs=hp.teacher_kwargs,
            image_size=hp.image_size,
            train_if_missing=hp.train_teacher,
            train_args=hp.teacher_train_args,
        )
        self.teacher = teacher_model.to(self.phase_bounds.device)
        teacher_channels = self.teacher.patch_embed.proj.in_channels
        if hp.in_channels != teacher_channels:
            raise ValueError(
                f"in_channels={hp.in_channels} (from the data) does not match the {teacher_channels} input "
                f"channels of teacher {self.teacher_source}: use data with {teacher_channels} channels, or a "
                "teacher trained on this data."
            )
        self.n_layers = backbone.depth(self.teacher)
        self.dim = self.teacher.embed_dim
        self.num_heads = self.teacher.blocks[0].attn.num_heads
        if hp.k is not None and hp.k > self.n_layers:
            raise ValueError(
                f"k={hp.k} is invalid for a teacher of depth {self.n_layers}: use 1 <= k <= {self.n_layers}."
            )
        n_tokens = self.teacher.patch_embed.num_patches + self.teacher.num_prefix_tokens
        self.token_groups = backbone.token_groups(self.teacher, n_tokens)
        if self.phase_bounds.numel() > 0:
            self._build_blocks(self.boundaries)
        elif hp.phase_boundaries is not None:
            self._build_blocks(phase_lib.check_boundaries(hp.phase_boundaries, self.n_layers))
        elif hp.k is not None:
            self._build_blocks_for_k(hp.k)
        return self

    # ------------------------------------------------------------------ blocks
    def _make_block(self, first_layer: int) -> nn.Module:
        hp = self.hparams
        if hp.block == "teacher":
            return TeacherArchBlock(self.teacher.blocks[first_layer - 1], init=hp.block_init)
        if hp.block != "raptor":
            raise ValueError(f"block={hp.block!r} is invalid: choose raptor or teacher.")
        return RaptorBlock(
            self.dim,
            self.num_heads,
            mlp=hp.mlp,
            mlp_ratio=hp.mlp_ratio,
            ln_eps=hp.ln_eps,
            init_values=hp.init_values,
            depth_scaling=hp.depth_scaling,
        )

    def _build_blocks_for_k(self, k: int) -> None:
        # Blocks exist before the phases are known; the placeholder split is replaced in setup.
        self.blocks = nn.ModuleList([self._make_block(1) for _ in range(k)])

    def _build_blocks(self, boundaries: list[int]) -> None:
        firsts = [1, *[b + 1 for b in boundaries[:-1]]]
        if len(self.blocks) != len(boundaries):
            self.blocks = nn.ModuleList([self._make_block(first) for first in firsts])
        elif self.hparams.block == "teacher" and self.hparams.block_init == "copy":
            self.blocks = nn.ModuleList([self._make_block(first) for first in firsts])
        self._set_boundaries(boundaries)

    def _set_boundaries(self, boundaries: list[int]) -> None:
        self.phase_bounds = torch.tensor(boundaries, dtype=torch.long, device=self.phase_bounds.device)
        self.routing = phase_lib.route_layers(boundaries)

    @property
    def boundaries(self) -> list[int]:
        return [int(b) for b in self.phase_bounds.tolist()]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher stays frozen and in eval mode (no drop path)
        return self

    # ----------------------------------------------------------------- phases
    def setup(self, stage: str) -> None:
        self.build()
        if self.phase_bounds.numel() > 0:
            return
        if self.trainer is not None and self.trainer.ckpt_path:
            return  # the checkpoint restores the phases (on_load_checkpoint)
        self.discover_phases(self.trainer.datamodule)

    @torch.no_grad()
    def layer_summaries(self, images: Tensor) -> Tensor:
        """Return (B, L, 2, D): the cls token and the mean patch token of teacher layers 1..L."""
        states = backbone.hidden_states(self.teacher, images)[1:]
        prefix = self.teacher.num_prefix_tokens
        return torch.stack(
            [torch.stack([s[:, 0], s[:, prefix:].mean(1)], dim=1) for s in states], dim=1
        ).float()

    @torch.no_grad()
    def discover_phases(self, datamodule) -> list[int]:
        """Compute the similarity matrix on training images and set the phases (and blocks when k is None)."""
        hp = self.hparams
        summaries, seen = [], 0
        device = self.phase_bounds.device
        self.teacher.to(device)
        for images, _ in datamodule.eval_loader("train"):
            summaries.append(self.layer_summaries(images.to(device)).cpu())
            seen += images.shape[0]
            if seen >= hp.phase_images:
                break
        self.similarity = phase_lib.similarity_matrix(torch.cat(summaries)[: hp.phase_images])
        if hp.phase_boundaries is not None:
            boundaries = list(hp.phase_boundaries)
        elif hp.phase_method == "maxcut":
            boundaries = phase_lib.phases_to_boundaries(
                phase_lib.max_cut_phases(self.similarity, hp.maxcut_f)
            )
            if hp.k is not None and len(boundaries) != hp.k:
                raise ValueError(
                    f"maxcut_f={hp.maxcut_f} gives {len(boundaries)} phases but k={hp.k}: tune maxcut_f or "
                    "set k=null."
                )
        else:
            k = hp.k if hp.k is not None else phase_lib.choose_k(self.similarity, hp.k_gain_threshold)
            boundaries = phase_lib.contiguous_phases(self.similarity, k, hp.min_phase_length)
        self._build_blocks(boundaries)
        self.report["phases"] = describe_phases(boundaries)
        self.report["phase_contrast"] = phase_lib.phase_contrast(self.similarity, boundaries)
        log.info("teacher phases: %s (contrast %.4f)", self.report["phases"], self.report["phase_contrast"])
        self.save_phase_figure()
        return boundaries

    @rank_zero_only
    def save_phase_figure(self) -> None:
        if self.similarity is None or self.trainer is None:
            return
        path = Path(self.trainer.default_root_dir) / "figures" / "phases.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        plot_similarity(
            self.similarity,
            self.boundaries,
            path,
            title=f"teacher layer similarity, phases {describe_phases(self.boundaries)}",
        )
        if isinstance(self.logger, WandbLogger):
            self.logger.log_image(key="phases/similarity", images=[str(path)])

    # ----------------------------------------------------------------- rollout
    @torch.no_grad()
    def teacher_states(self, images: Tensor) -> list[Tensor]:
        """Return the teacher's a_0..a_L in float32 (under the ambient autocast when enabled)."""
        self.build()
        return [state.float() for state in backbone.hidden_states(self.teacher, images)]

    def step(self, state: Tensor, layer: int) -> Tensor:
        """Produce layer `layer` (1-based) from the state of layer - 1 with the block routed to it."""
        t = torch.full((state.shape[0],), float(layer), device=state.device)
        return self.blocks[self.routing[layer - 1]](state, t)

    def rollout(self, state: Tensor, start: int, end: int) -> list[Tensor]:
        """Return Raptor's states for layers start+1..end, rolled out from `state` at layer start."""
        states = []
        for layer in range(start + 1, end + 1):
            state = self.step(state, layer)
            states.append(state)
        return states

    def forward(self, images: Tensor) -> Tensor:
        """Return Raptor's last-layer state (before the final norm)."""
        self.build()
        a0 = backbone.embed(self.teacher, images)
        return self.rollout(a0, 0, self.n_layers)[-1]

    # ----------------------------------------------------------------- losses
    def segment_loss(self, states: list[Tensor], start: int, end: int, lam: float, weights) -> Tensor:
        """Return lam x L_TF + (1 - lam) x L_AR on teacher layers start..end with one block."""
        groups = self.token_groups
        loss = states[0].new_zeros(())
        if lam > 0:
            # One-step predictions from teacher states, all steps of a block flattened into one batch.
            batch = states[0].shape[0]
            predictions, targets = [], []
            for index in sorted(set(self.routing[start:end])):
                layers = [l for l in range(start + 1, end + 1) if self.routing[l - 1] == index]
                inputs = torch.cat([states[l - 1] for l in layers])
                t = torch.tensor(layers, device=inputs.device).repeat_interleave(batch).float()
                predictions.append(self.blocks[index](inputs, t))
                targets.extend(states[l] for l in layers)
            loss = loss + lam * weighted_mse(torch.cat(predictions), torch.cat(targets), weights, groups)
        if lam < 1:
            predictions = self.rollout(states[start], start, end)
            ar = torch.stack(
                [weighted_mse(p, states[l], weights, groups) for l, p in enumerate(predictions, start + 1)]
            )
            loss = loss + (1 - lam) * ar.mean()
        return loss

    def stage_steps(self) -> tuple[int, int]:
        total = max(1, int(self.trainer.estimated_stepping_batches))
        stage1 = int(round(self.hparams.stage1_fraction * total))
        return stage1, total - stage1

    def distillation_loss(self, states: list[Tensor], step: int, stage1_steps: int) -> tuple[Tensor, int, float]:
        """Return (loss, stage, lambda) of training step `step` given the teacher's states a_0 .. a_L."""
        hp = self.hparams
        if step >= stage1_steps:
            return self.segment_loss(states, 0, self.n_layers, 0.0, hp.stage2_token_weights), 2, 0.0

        lam = tf_weight(step, stage1_steps, hp.tf_fraction)
        loss = states[0].new_zeros(())
        start = 0
        for j, end in enumerate(self.boundaries):
            last = j == len(self.boundaries) - 1
            weights = hp.stage1_last_token_weights if last else hp.stage1_token_weights
            loss = loss + self.segment_loss(states, start, end, lam, weights)
            start = end
        return loss, 1, lam

    def training_step(self, batch, batch_idx):
        images, _ = batch
        hp = self.hparams
        states = self.teacher_states(images)
        stage1_steps, _ = self.stage_steps()
        loss, stage, lam = self.distillation_loss(states, self.global_step, stage1_steps)
        optimizers, schedulers = self.optimizers(), self.lr_schedulers()
        optimizer, scheduler = optimizers[stage - 1], schedulers[stage - 1]
        optimizer.zero_grad()
        self.manual_backward(loss)
        if hp.grad_clip:
            self.clip_gradients(optimizer, gradient_clip_val=hp.grad_clip, gradient_clip_algorithm="norm")
        optimizer.step()
        scheduler.step()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lambda", lam)
        self.log("train/stage", float(stage))
        self.log("train/lr", optimizer.param_groups[0]["lr"])
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        stage1_steps, stage2_steps = self.stage_steps()
        optimizers, schedulers = [], []
        for steps in (stage1_steps, stage2_steps):
            optimizer = torch.optim.AdamW(self.blocks.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
            warmup = int(hp.warmup_fraction * steps)
            span = max(1, steps)
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer,
                lambda s, span=span, warmup=warmup: warmup_cosine(s, span, warmup, hp.lr, hp.min_lr) / hp.lr,
            )
            optimizers.append(optimizer)
            schedulers.append(scheduler)
        return optimizers, schedulers

    # ------------------------------------------------------------- validation
    def _full_rollout(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        targets = self.teacher_states(images)
        return self.rollout(targets[0], 0, self.n_layers), targets[1:]

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        predictions, targets = self._full_rollout(images)
        loss = torch.stack([F.mse_loss(p, y) for p, y in zip(predictions, targets, strict=False)]).mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/last_layer_mse", F.mse_loss(predictions[-1], targets[-1]), sync_dist=True)
        if self.teacher.num_classes > 0:
            raptor_acc = (
                (backbone.head_logits(self.teacher, predictions[-1]).argmax(-1) == labels).float().mean()
            )
            teacher_acc = (
                (backbone.head_logits(self.teacher, targets[-1]).argmax(-1) == labels).float().mean()
            )
            self.log("val/head_acc_raptor", raptor_acc, sync_dist=True)
            self.log("val/head_acc_teacher", teacher_acc, sync_dist=True)

    # ------------------------------------------------------------------- test
    @torch.no_grad()
    def probe_features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Return ([cls ; mean patch] after the final norm) for the teacher and for Raptor."""
        predictions, targets = self._full_rollout(images)
        return (
            backbone.probe_features(self.teacher, targets[-1]).float(),
            backbone.probe_features(self.teacher, predictions[-1]).float(),
        )

    @torch.no_grad()
    def _split_features(self, loader, max_batches: int | None) -> dict[str, Tensor]:
        teacher, raptor, labels = [], [], []
        for index, (images, y) in enumerate(loader):
            if max_batches is not None and index >= max_batches:
                break
            t, r = self.probe_features(images.to(self.device))
            teacher.append(t.cpu())
            raptor.append(r.cpu())
            labels.append(y)
        return {"teacher": torch.cat(teacher), "raptor": torch.cat(raptor), "labels": torch.cat(labels)}

    def on_test_start(self) -> None:
        # NOTE: under DDP every rank fits its probes on the full train and val loaders of its own process;
        # the test accuracies are not gathered across ranks, so report them from single-device runs.
        datamodule = self.trainer.datamodule
        self.fidelity = FidelityR2(self.n_layers, self.token_groups)
        self.test_features: dict[str, list[Tensor]] = {"teacher": [], "raptor": [], "labels": []}
        self.probes = {}
        if datamodule is None or not hasattr(datamodule, "eval_loader"):
            log.warning("no datamodule with eval_loader: linear probes skipped")
            return
        train = self._split_features(datamodule.eval_loader("train"), self.hparams.probe_max_batches)
        val = self._split_features(datamodule.eval_loader("val"), self.hparams.probe_max_batches)
        for source in ("teacher", "raptor"):
            self.probes[source] = fit_linear_probe(
                train[source],
                train["labels"],
                val[source],
                val["labels"],
                self.hparams.num_classes,
                tuple(self.hparams.probe_l2),
            )

    def test_step(self, batch, batch_idx):
        images, labels = batch
        predictions, targets = self._full_rollout(images)
        self.fidelity.update(predictions, targets)
        self.test_features["teacher"].append(backbone.probe_features(self.teacher, targets[-1]).float().cpu())
        self.test_features["raptor"].append(
            backbone.probe_features(self.teacher, predictions[-1]).float().cpu()
        )
        self.test_features["labels"].append(labels.cpu())
        loss = torch.stack([F.mse_loss(p, y) for p, y in zip(predictions, targets, strict=False)]).mean()
        self.log("test/loss", loss, sync_dist=True)

    def on_test_epoch_end(self) -> None:
        r2 = self.fidelity.per_layer("all")
        report = self.report
        report["r2_mean"] = float(r2.mean())
        report["r2_last_layer"] = float(r2[-1])
        report["r2_per_layer"] = " ".join(f"{v:.3f}" for v in r2.tolist())
        for group in ("cls", "reg", "patch"):
            if group in self.fidelity.groups:
                report[f"r2_{group}_mean"] = float(self.fidelity.per_layer(group).mean())
        report["r2_pooled_reference_variant"] = self.fidelity.pooled_r2()
        self.log("test/r2_mean", report["r2_mean"])
        if self.probes:
            labels = torch.cat(self.test_features["labels"])
            accs = {
                s: self.probes[s].accuracy(torch.cat(self.test_features[s]), labels)
                for s in ("teacher", "raptor")
            }
            report["teacher_probe_acc"] = accs["teacher"]
            report["raptor_probe_acc"] = accs["raptor"]
            report["probe_ratio"] = accs["raptor"] / max(accs["teacher"], 1e-12)
            self.log("test/probe_acc_teacher", accs["teacher"])
            self.log("test/probe_acc_raptor", accs["raptor"])
            self.log("test/probe_ratio", report["probe_ratio"])
        report.update(self.cost_report())
        if self.similarity is not None:
            report["phases"] = describe_phases(self.boundaries)
            report["phase_contrast"] = phase_lib.phase_contrast(self.similarity, self.boundaries)
        report["k"] = len(self.boundaries)
        report["teacher"] = self.teacher_source

    @torch.no_grad()
    def cost_report(self) -> dict[str, float]:
        """Return parameters of the teacher blocks and of the Raptor blocks, and GFLOPs per image of both."""
        image = torch.zeros(1, 3, *self.teacher.patch_embed.img_size, device=self.device)
        a0 = backbone.embed(self.teacher, image)
        teacher_flops = count_flops(lambda: backbone.run_blocks(self.teacher, a0, 0, self.n_layers))
        raptor_flops = count_flops(lambda: self.rollout(a0, 0, self.n_layers))
        return {
            "teacher_block_params": float(count_parameters(self.teacher.blocks)),
            "raptor_block_params": float(count_parameters(self.blocks)),
            "teacher_gflops_per_image": teacher_flops / 1e9,
            "raptor_gflops_per_image": raptor_flops / 1e9,
        }

    def final_report(self) -> dict[str, float | str]:
        """Headline numbers for the CLI summary: probe accuracies and ratio, R^2, phases, cost."""
        return dict(self.report)

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")
        }
        checkpoint["raptor_phase_bounds"] = self.boundaries
        if self.similarity is not None:
            checkpoint["raptor_similarity"] = self.similarity.tolist()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.build()
        boundaries = checkpoint.get("raptor_phase_bounds")
        if boundaries:
            self._build_blocks(list(boundaries))
        if checkpoint.get("raptor_similarity") is not None:
            self.similarity = torch.tensor(checkpoint["raptor_similarity"])

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.build()
        state_dict = dict(state_dict)
        for key, value in self.teacher.state_dict(prefix="teacher.").items():
            state_dict.setdefault(key, value)
        if "phase_bounds" in state_dict and state_dict["phase_bounds"].numel() > 0:
            self._set_boundaries([int(b) for b in state_dict["phase_bounds"].tolist()])
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -------------------------------------------------------------- dynamics
    @torch.no_grad()
    def trajectory(self, batch, source: Literal["raptor", "teacher"] = "raptor") -> Trajectory:
        """Return the states a_0..a_L of Raptor (or of the teacher) with rollout and classifier."""
        self.build()
        images, labels = batch
        images = images.to(self.device)
        if source == "teacher":
            states = backbone.hidden_states(self.teacher, images)

            def rollout(state: Tensor, layer: int) -> Tensor:
                with torch.no_grad():
                    return torch.stack(
                        [state, *backbone.run_blocks(self.teacher, state, layer, self.n_layers)], 1
                    )
        elif source == "raptor":
            a0 = backbone.embed(self.teacher, images)
            states = [a0, *self.rollout(a0, 0, self.n_layers)]

            def rollout(state: Tensor, layer: int) -> Tensor:
                with torch.no_grad():
                    return torch.stack([state, *self.rollout(state, layer, self.n_layers)], 1)
        else:
            raise ValueError(f"source={source!r} is invalid: choose raptor or teacher.")
        stacked = torch.stack(states, dim=1)
        return Trajectory(
            states=stacked,
            token_groups=backbone.token_groups(self.teacher, stacked.shape[2]),
            labels=labels,
            boundaries=self.boundaries[:-1],
            rollout=rollout,
            classify=self._classifier(source),
        )

    def _classifier(self, source: str):
        probe = self.probes.get(source)
        if probe is not None:

            def classify(state: Tensor) -> Tensor:
                with torch.no_grad():
                    return probe.logits(backbone.probe_features(self.teacher, state).cpu())

            return classify
        if self.teacher.num_classes > 0:

            def head(state: Tensor) -> Tensor:
                with torch.no_grad():
                    return backbone.head_logits(self.teacher, state)

            return head
        return None


def describe_phases(boundaries: list[int]) -> str:
    """Return phases as text, e.g. '1-7, 8-12'."""
    starts = [1, *[b + 1 for b in boundaries[:-1]]]
    return ", ".join(f"{s}-{e}" if s != e else str(s) for s, e in zip(starts, boundaries, strict=False))


def plot_similarity(similarity: Tensor, boundaries: list[int], path: Path, title: str = "") -> None:
    """Save the layer similarity matrix with the phase boundaries drawn as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers = similarity.shape[0]
    figure, axis = plt.subplots(figsize=(5, 4.2))
    image = axis.imshow(similarity.numpy(), cmap="viridis", extent=(0.5, n_layers + 0.5, n_layers + 0.5, 0.5))
    for bound in boundaries[:-1]:
        axis.axhline(bound + 0.5, color="white", linewidth=1.5)
        axis.axvline(bound + 0.5, color="white", linewidth=1.5)
    axis.set_xlabel("layer")
    axis.set_ylabel("layer")
    axis.set_title(title, fontsize=8)
    figure.colorbar(image, ax=axis, label="mean cosine similarity")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
