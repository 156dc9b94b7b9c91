"""The reproduction suite's definition: every method's variants (training overrides), its claim and its checks.

``recipes.reproduce.suite`` plans and runs the jobs these imply; ``recipes.reproduce.report`` reads
their run folders and writes REPORT.md. Neither keeps state here: paths are passed explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass


def common_overrides(steps: int) -> list[str]:
    """The shortened schedule every training run gets (preset defaults: 300–500 steps, eval every 100)."""
    return [f"trainer.max_steps={steps}", f"trainer.eval_every={max(1, steps // 4)}", "trainer.eval_batches=8",
            f"trainer.checkpoint_every={max(1, steps // 2)}", "trainer.log_every=10", f"schedule.warmup_steps={max(1, steps // 8)}",
            "trainer.threads=1", "trainer.progress=false", "trainer.sample_tokens=0", "trainer.export_safetensors=false",
            "logger=none"]


def sgt_schedule(steps: int) -> list[str]:
    """The presets select at step 50 with 50-step windows out of 400; keep those fractions."""
    return [f"model.depth.first_selection_step={max(1, steps // 8)}", f"model.depth.window_size={max(1, steps // 8)}"]


# evaluate.py sweeps run on the final checkpoint (k' for elastic MoEs, test-time iterations for recurrence)
TOPK_SWEEP = ("analysis=elastic", "sweep.top_k=[1,2,3,4]", "sweep.expert_subsets=[8]", "sweep.depths=[4]", "eval_batches=8")
DEPTH_SWEEP = ("analysis=depth", "sweep.iterations=[1,2,4,8]", "eval_batches=8")


@dataclass(frozen=True)
class Variant:
    """One training configuration, trained once per seed into runs/reproduce/<folder>/seed<k>."""

    folder: str
    overrides: tuple[str, ...]
    sec_per_step: float            # measured at trainer.threads=1, two runs in parallel, 2-core CPU (for estimates)
    evaluate: tuple[str, ...] = ()  # evaluate.py arguments for the final checkpoint
    sgt: bool = False               # scale SGT's selection schedule to the step count


VARIANTS = {
    "dense": Variant("baselines/dense", ("experiment=dense_baseline",), 0.55),
    "moe": Variant("baselines/moe", ("experiment=moe_vs_dense",), 0.62, TOPK_SWEEP),
    "emoe": Variant("emoe/emoe", ("experiment=emoe",), 0.75, TOPK_SWEEP),
    "ernie_plain": Variant("ernie_elastic/plain", ("experiment=ernie_elastic", "elastic=none"), 0.60, TOPK_SWEEP),
    "ernie_elastic": Variant("ernie_elastic/elastic", ("experiment=ernie_elastic",), 0.55, TOPK_SWEEP),
    "moue": Variant("moue/moue", ("experiment=moue",), 0.75),
    "mohd_half": Variant("mohd/mohd_half", ("experiment=mohd_half",), 1.10),
    "mohd_3x": Variant("mohd/mohd_3x", ("experiment=mohd_3x",), 1.45),
    "loop_x4": Variant("looped/loop_x4", ("experiment=loop_x4",), 1.40),
    "itt_x4": Variant("looped/itt_x4", ("experiment=itt_x4",), 2.20),
    "recurrent": Variant("looped/recurrent", ("experiment=recurrent",), 2.10, DEPTH_SWEEP),
    "sgt_baseline": Variant("sgt/vanilla", ("experiment=sgt_baseline",), 0.80),
    "sgt": Variant("sgt/sgt", ("experiment=sgt",), 0.95, sgt=True),
    "sgt_low_entropy": Variant("sgt/low_entropy", ("experiment=sgt_low_entropy",), 0.95, sgt=True),
    "block_loop": Variant("sgt/block_loop", ("experiment=block_loop",), 1.10, sgt=True),
}


@dataclass(frozen=True)
class Check:
    """One comparison: metric of ``method`` against metric of ``baseline`` (each ``variant:metric``)."""

    question: str
    baseline: str
    method: str
    better: str = "lower"   # lower | higher | no_worse:<margin> (lower-is-better within a margin)
    paired: bool = False    # both arms measured on the same runs per seed (auto when the variant is the same)


@dataclass(frozen=True)
class Method:
    name: str
    claim: str
    variants: tuple[str, ...]          # training variants, baseline first ("" for pipeline-only methods)
    checks: tuple[Check, ...]
    pipeline: str = ""                 # dha_vs_gqa | merge: multi-stage recipes beyond train.py


METHODS = [
    Method("moe_vs_dense", "A routed MoE (top-2 of 8) beats a dense model with the same activated parameters and FLOPs "
           "(the premise of every MoE paper; METHODS.md §9.1 setup).", ("dense", "moe"),
           (Check("final val loss, equal steps and FLOPs", "dense:final", "moe:final"),)),
    Method("emoe", "EMoE (§1): plain top-k degrades when run with k' > k (the 'scaling wall'); EMoE keeps improving up to "
           "k' ≈ 2–3·k.", ("moe", "emoe"),
           (Check("loss change from k'=2 to k'=4 (lower: scales better)", "moe:topk_drop:2:4", "emoe:topk_drop:2:4"),
            Check("EMoE itself: loss at k'=4 vs k'=2", "emoe:topk:2", "emoe:topk:4"),
            Check("loss at the trained k=2, EMoE vs top-k (within 0.02)", "moe:topk:2", "emoe:topk:2", "no_worse:0.02"))),
    Method("ernie_elastic", "ERNIE 5.0 elastic training (§7): the full model stays within ~0.02 of the baseline, and "
           "sub-models at reduced top-k degrade far less than an un-elastic model run at reduced k.",
           ("ernie_plain", "ernie_elastic"),
           (Check("loss increase from k=4 (trained) to k=2", "ernie_plain:topk_drop:4:2", "ernie_elastic:topk_drop:4:2"),
            Check("loss increase from k=4 to k=1", "ernie_plain:topk_drop:4:1", "ernie_elastic:topk_drop:4:1"),
            Check("full-model final val loss (within 0.02)", "ernie_plain:final", "ernie_elastic:final", "no_worse:0.02"))),
    Method("moue", "MoUE (§2, abstract only; our design is a reconstruction): one universal expert pool shared across "
           "layers outperforms a matched MoE (up to +1.3%).", ("moe", "moue"),
           (Check("final val loss, matched activated FLOPs and total parameters", "moe:final", "moue:final"),)),
    Method("mohd", "MoHD (§3, reconstruction): sparsely activated hidden-dimension groups beat the vanilla model at equal "
           "activation (+1.7% with 50% active; +3.7% with 3× parameters at constant activation).",
           ("dense", "mohd_half", "mohd_3x"),
           (Check("mohd_half: final val loss, equal steps", "dense:final", "mohd_half:final"),
            Check("mohd_3x: final val loss, equal steps", "dense:final", "mohd_3x:final"),
            Check("mohd_half at the dense run's training FLOPs", "dense:final", "mohd_half:iso_flops:dense"),
            Check("mohd_3x at the dense run's training FLOPs", "dense:final", "mohd_3x:iso_flops:dense"))),
    Method("dha_vs_gqa", "DHA (§4): converting MHA to a 25% KV budget by head fusion starts much closer to MHA's loss "
           "than GQA mean-pooling and stays better after the same continued pretraining.", (),
           (Check("val loss right after conversion", "gqa:converted", "dha:converted", paired=True),
            Check("val loss after equal continued pretraining", "gqa:final", "dha:final", paired=True)), pipeline="dha_vs_gqa"),
    Method("itt", "ITT (§5): ITT×4 beats the vanilla model (≈ −0.8 PPL at ~1.75× FLOPs) and beats Loop×4 at ~70% of "
           "Loop's FLOPs.", ("dense", "loop_x4", "itt_x4"),
           (Check("ITT×4 vs vanilla, equal steps", "dense:final", "itt_x4:final"),
            Check("ITT×4 vs Loop×4, equal steps", "loop_x4:final", "itt_x4:final"),
            Check("ITT×4 at the vanilla run's training FLOPs", "dense:final", "itt_x4:iso_flops:dense"))),
    Method("recurrent", "Huginn recurrent depth (§8.5): a recurrent core trained with random iteration counts beats the "
           "same-size model and keeps improving with test-time iterations beyond the training mean r̄.",
           ("dense", "recurrent"),
           (Check("recurrent vs vanilla, equal parameters and steps", "dense:final", "recurrent:final"),
            Check("recurrent at the vanilla run's training FLOPs", "dense:final", "recurrent:iso_flops:dense"),
            Check("test-time iterations: r = r̄ = 4 vs r = 1", "recurrent:depth:1", "recurrent:depth:4"),
            Check("extrapolation: r = 2r̄ = 8 vs r = r̄", "recurrent:depth:4", "recurrent:depth:8"))),
    Method("sgt", "SGT (§6): looping the high-entropy heads of deep layers (+1–3% FLOPs) lowers loss vs vanilla, beats "
           "looping low-entropy heads, and beats whole-block looping at far lower FLOP overhead.",
           ("sgt_baseline", "sgt", "sgt_low_entropy", "block_loop"),
           (Check("SGT vs vanilla", "sgt_baseline:final", "sgt:final"),
            Check("high- vs low-entropy heads", "sgt_low_entropy:final", "sgt:final"),
            Check("SGT vs block loop", "block_loop:final", "sgt:final"))),
    Method("harc_merge", "HARC (§8.4): merging MoEs fine-tuned on different tasks breaks routing; calibrating the routers in "
           "closed form restores routing agreement and lowers the merged model's task losses vs the plain merge.", (),
           (Check("mean per-task val loss of the TIES merge", "plain_merge:merge_loss", "harc_merge:merge_loss", paired=True),
            Check("routing agreement with the fine-tunes", "plain_merge:merge_agreement", "harc_merge:merge_agreement",
                  "higher", paired=True)), pipeline="merge"),
]
METHOD_NAMES = [m.name for m in METHODS]
MERGE_BASE_STEPS_FACTOR, MERGE_FT_STEPS_FACTOR = 4, 2  # seq_len 64: ~4× cheaper steps; preset ratio 1000 : 500
MERGE_SEC_PER_STEP = 0.2
