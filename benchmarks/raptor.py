"""Raptor: cost of one distillation step against its parts measured apart.

A distillation step runs the frozen teacher (no_grad) to get the target states, then the student's
own training step on them (rollout, loss, backward, clip, AdamW). The ratio
    distillation step / (teacher forward + student step on cached targets)
is 1 when reading the teacher on the fly adds nothing beyond the two parts; the goal is <= 1.10.
The model is the offline default's shape (12-layer, width-48 ViT on 16x16 inputs with patch 4, k = 2),
or DINOv2 ViT-B/14-reg at 224x224 on a GPU.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from benchmarks.common import (
    BenchRow,
    bench_trainer,
    interleaved_medians,
    loader_rate,
    loader_row,
    peak_rss_in_fresh_process,
)
from lightning_modules.raptor.module import RaptorDistill

CPU_SHAPE = {
    "teacher": "vit_tiny_patch16_224",
    "teacher_kwargs": {"patch_size": 4, "depth": 12, "embed_dim": 48, "num_heads": 3},
    "image_size": 16,
    "batch": 64,
}
GPU_SHAPE = {"teacher": "vit_base_patch14_reg4_dinov2", "teacher_kwargs": {}, "image_size": 224, "batch": 64}


def build(shape: dict, device: torch.device) -> tuple[RaptorDistill, torch.Tensor, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = (
        RaptorDistill(
            teacher=shape["teacher"],
            teacher_kwargs=shape["teacher_kwargs"],
            image_size=shape["image_size"],
            k=2,
            phase_boundaries=[7, 12],
        )
        .build()
        .to(device)
    )
    images = torch.randn(shape["batch"], 3, shape["image_size"], shape["image_size"], device=device)
    optimizer = torch.optim.AdamW(model.blocks.parameters(), lr=1e-4)
    return model, images, optimizer


def student_step(model: RaptorDistill, optimizer, states: list[torch.Tensor], lam: float) -> None:
    optimizer.zero_grad(set_to_none=True)
    if lam > 0:
        loss = model.segment_loss(states, 0, 7, lam, None) + model.segment_loss(
            states, 7, 12, lam, [0.34, 0.33, 0.33]
        )
    else:
        loss = model.segment_loss(states, 0, 12, 0.0, [0.45, 0.10, 0.45])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.blocks.parameters(), 1.0)
    optimizer.step()


def run(quick: bool = False) -> list[BenchRow]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = GPU_SHAPE if device.type == "cuda" else CPU_SHAPE
    model, images, optimizer = build(shape, device)
    cached = [state.detach() for state in model.teacher_states(images)]
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    rows = []
    for label, lam in (("stage 2 (AR)", 0.0), ("stage 1 (TF+AR)", 0.5)):

        def teacher_forward():
            with torch.no_grad():
                model.teacher_states(images)
            synchronize()

        def own_step(lam=lam):
            student_step(model, optimizer, cached, lam)
            synchronize()

        def distill_step(lam=lam):
            with torch.no_grad():
                states = model.teacher_states(images)
            student_step(model, optimizer, states, lam)
            synchronize()

        repeats = 3 if quick else 10
        times = interleaved_medians(
            {"teacher": teacher_forward, "student": own_step, "distill": distill_step},
            warmup=1,
            repeats=repeats,
        )
        ratio = times["distill"] / (times["teacher"] + times["student"])
        rows.append(
            BenchRow(
                "raptor",
                f"distillation step / (teacher forward + student step), {label}",
                ratio,
                "x",
                reference=f"{times['teacher'] * 1e3:.1f} ms + {times['student'] * 1e3:.1f} ms",
                goal="<= 1.10",
                note=f"{times['distill'] * 1e3:.1f} ms per step, batch {shape['batch']}",
            )
        )
    rows.append(digits_loader_row(shape["batch"] / times["distill"]))
    if device.type == "cpu":
        rows += lightning_vs_bare(quick)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        rows.append(
            BenchRow("raptor", "peak GPU memory, distillation step", peak, "MiB", note=shape["teacher"])
        )
    else:
        peak = peak_rss_in_fresh_process(distillation_steps)
        rows.append(
            BenchRow("raptor", "peak resident memory, distillation steps", peak, "MiB", note="CPU, fresh process")
        )
    return rows


def lightning_vs_bare(quick: bool) -> list[BenchRow]:
    """Return images/s of a Lightning fit of RaptorDistill and of a bare loop of the same steps, on fixed batches.

    Both run half the steps in stage 1 and half in stage 2 with the module's own loss. The bare loop leaves
    out the learning-rate schedulers and logging.
    """

    n_batches = 4 if quick else 8
    lightning_model, images, _ = build(CPU_SHAPE, torch.device("cpu"))
    bare_model, _, _ = build(CPU_SHAPE, torch.device("cpu"))
    batches = [(images, torch.zeros(len(images), dtype=torch.long))] * n_batches
    hp = bare_model.hparams

    def lightning_fit():
        trainer = bench_trainer()
        trainer.fit(lightning_model, train_dataloaders=DataLoader(batches, batch_size=None))

    def bare_fit():
        stage1_steps = int(round(hp.stage1_fraction * n_batches))
        optimizers = [
            torch.optim.AdamW(bare_model.blocks.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
            for _ in range(2)
        ]
        for step, (batch_images, _) in enumerate(batches):
            states = bare_model.teacher_states(batch_images)
            loss, stage, _ = bare_model.distillation_loss(states, step, stage1_steps)
            optimizer = optimizers[stage - 1]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(bare_model.blocks.parameters(), hp.grad_clip)
            optimizer.step()

    times = interleaved_medians({"lightning": lightning_fit, "bare": bare_fit}, warmup=1, repeats=2 if quick else 3)
    setting = f"{n_batches} batches of {len(images)}, half in each stage"
    lightning_rate = n_batches * len(images) / times["lightning"]
    bare_rate = n_batches * len(images) / times["bare"]
    return [
        BenchRow(
            "raptor", "Lightning fit throughput", lightning_rate, "img/s", note=f"{setting}; Trainer start-up included"
        ),
        BenchRow("raptor", "bare PyTorch loop throughput", bare_rate, "img/s", note=setting),
        BenchRow("raptor", "Lightning / bare throughput", lightning_rate / bare_rate, "ratio", goal=">= 0.95"),
    ]


def digits_loader_row(images_per_s: float) -> BenchRow:
    """Return a row with the default digits loader's rate (16 x 16, batch 64) over the distillation step's."""
    from datamodules.images import ImageClassificationDataModule

    data = ImageClassificationDataModule(dataset="digits", image_size=16, batch_size=64)
    data.setup("fit")
    rate = loader_rate(data.train_dataloader(), max_batches=len(data.train_dataloader()) - 1)
    return loader_row("raptor", rate, images_per_s, "img/s", "digits loader against stage-1 distillation steps")


def distillation_steps() -> None:
    """Run two stage-1 distillation steps of the CPU benchmark shape (in a fresh process, for its memory)."""
    model, images, optimizer = build(CPU_SHAPE, torch.device("cpu"))
    for _ in range(2):
        with torch.no_grad():
            states = model.teacher_states(images)
        student_step(model, optimizer, states, 0.5)


if __name__ == "__main__":
    for row in run(quick=True):
        print(row)
