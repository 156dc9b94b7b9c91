"""SGT: the scheduler's deep→shallow growth, kept-heads loop path, no new parameters, exact resume."""

import pytest
import torch

from arch.depth.sgt import SGTDepth
from arch.model import LanguageModel
from kernels.attention import attention_reference
from tests.helpers import tiny_config
from training.config_schema import ModelConfig
from training.metrics import read_metrics
from training.trainer import Trainer, train


def sgt_model(n_layers=6, n_heads=4, **depth) -> LanguageModel:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64,
        d_model=32,
        n_layers=n_layers,
        n_heads=n_heads,
        max_seq_len=32,
        depth={"name": "sgt", "first_selection_step": 250, "window_size": 250, **depth},
    )
    return LanguageModel(cfg)


def drive(sgt: SGTDepth, layer_entropy: dict[int, float], until: int) -> list[tuple[int, int]]:
    """Run the scheduler with fixed per-layer EMA entropies; return (completed step, selected layer)."""
    head_offsets = torch.tensor([0.03, 0.01, 0.04, 0.02])  # head 2 highest, then 0, 3, 1
    for layer, value in layer_entropy.items():
        sgt.ema_LH[layer] = value + head_offsets
    sgt.ema_ready = True
    events = []
    for step in range(until):
        before = list(sgt.selected)
        sgt.after_optimizer_step(step)
        events += [(step + 1, layer) for layer in sgt.selected if layer not in before]
    return events


def test_scheduler_grows_deep_to_shallow_exactly_as_the_official_algorithm():
    sgt = sgt_model().depth
    # Scores (layer 0 excluded): top-3 = {1, 3, 4}.
    events = drive(sgt, {0: 0.99, 1: 0.9, 2: 0.5, 3: 0.8, 4: 0.7, 5: 0.2}, until=1100)
    # Written out by hand: step 250 picks the deepest top-3 layer (4); each window end picks the
    # deepest not-yet-selected top-3 layer that is shallower than all selected ones (3, then 1);
    # with 3 selected (= max_selected_layers) the next window end freezes the structure.
    assert events == [(250, 4), (500, 3), (750, 1)]
    assert sgt.frozen and sgt.loop_depth == [0, 1, 0, 1, 1, 0]
    assert sgt.kept_LH[4].nonzero().flatten().tolist() == [0, 2]  # the two highest-entropy heads
    assert torch.equal(sgt.head_decay_LH[4], torch.tensor([1.0, 0.0, 1.0, 0.0]))


def test_scheduler_freezes_when_no_shallower_candidate_and_decays_linearly():
    sgt = sgt_model(top_k_layers=2).depth
    entropies = {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.8, 5: 0.9}
    events = drive(sgt, entropies, until=375)
    assert events == [(250, 5)]
    assert sgt.head_decay_LH[5].tolist() == pytest.approx([1.0, 0.5, 1.0, 0.5])  # halfway through the window
    later = [(step + 1, layer) for step in range(375, 1000) for layer in _new_selections(sgt, step)]
    assert later == [(500, 4)]
    assert sgt.selected == [5, 4] and sgt.frozen  # top-2 = {4, 5}: nothing shallower is left at step 750


def _new_selections(sgt, step):
    before = list(sgt.selected)
    sgt.after_optimizer_step(step)
    return [layer for layer in sgt.selected if layer not in before]


def drive_phases(
    sgt: SGTDepth, phases: dict[int, dict[int, float]], until: int, start: int = 0
) -> list[tuple[int, str, int]]:
    """Like ``drive``, with the layer entropies replaced at given completed steps; returns every scheduler
    action as (completed step, "select" | "deepen", layer)."""
    head_offsets = torch.tensor([0.03, 0.01, 0.04, 0.02])
    sgt.ema_ready, actions = True, []
    for step in range(start, until):
        if step + 1 in phases:
            sgt.ema_LH.zero_()
            for layer, value in phases[step + 1].items():
                sgt.ema_LH[layer] = value + head_offsets
        selected, depth = list(sgt.selected), list(sgt.loop_depth)
        sgt.after_optimizer_step(step)
        actions += [(step + 1, "select", layer) for layer in sgt.selected if layer not in selected]
        actions += [(step + 1, "deepen", i) for i, (a, b) in enumerate(zip(depth, sgt.loop_depth)) if b > a and a > 0]
    return actions


def test_deeper_loops_check_every_selected_layer_and_keep_decayed_heads_at_zero():
    """max_loop_depth=2, top-2 layers. Hand-computed from the official DynamicLayerScheduler: at each window
    end the FIRST selected layer (selection order) still in the top-2 and below max depth is deepened —
    here layer 5 at step 750, although the window that just ended was opened by selecting layer 4."""
    sgt = sgt_model(top_k_layers=2, max_loop_depth=2).depth
    phases = {1: {5: 0.9, 4: 0.8, 3: 0.7}, 500: {4: 0.9, 3: 0.8, 5: 0.1}, 750: {5: 0.9, 4: 0.8, 3: 0.1}}
    actions = drive_phases(sgt, phases, until=760)
    # 250: select the deepest top-2 layer (5). 500: 5 left the top-2, so no deepening; select 4 (top-2 {4, 3},
    # deepest not selected and no deeper than 5). 750: 5 is back in the top-2 → deepen 5 (not 4).
    assert actions == [(250, "select", 5), (500, "select", 4), (750, "deepen", 5)]
    assert sgt.loop_depth[5] == 2 and sgt.loop_depth[4] == 1
    # layer 5's heads decayed to 0 by step 500 and a deeper loop does not reopen the decay
    assert torch.equal(sgt.head_decay_LH[5], torch.tensor([1.0, 0.0, 1.0, 0.0]))
    actions += drive_phases(sgt, {}, until=1300, start=760)
    # 1000: 5 is at max depth, 4 is in the top-2 → deepen 4. 1250: nothing to deepen; top-2 {5, 4} has no
    # unselected layer no deeper than 4 → the structure freezes.
    assert actions[3:] == [(1000, "deepen", 4)] and sgt.frozen and sgt.loop_depth == [0, 0, 0, 0, 2, 2]


def test_loop_depth_three_grows_each_layer_before_selecting_a_shallower_one():
    sgt = sgt_model(max_loop_depth=3, max_selected_layers=2).depth
    actions = drive_phases(sgt, {1: {1: 0.9, 2: 0.5, 3: 0.8, 4: 0.7, 5: 0.2}}, until=1800)
    assert actions == [
        (250, "select", 4),
        (500, "deepen", 4),
        (750, "deepen", 4),
        (1000, "select", 3),
        (1250, "deepen", 3),
        (1500, "deepen", 3),
    ]
    assert sgt.frozen and sgt.loop_depth == [0, 0, 0, 3, 3, 0]  # 1750: two layers selected = max → frozen
    for layer in (3, 4):
        assert torch.equal(sgt.head_decay_LH[layer], torch.tensor([1.0, 0.0, 1.0, 0.0]))


def test_official_exponential_decay_goes_from_one_to_1e_minus_8():
    sgt = sgt_model(decay_type="exponential").depth
    drive(sgt, {1: 0.9, 2: 0.5, 3: 0.8, 4: 0.7, 5: 0.2}, until=375)  # selected at 250, halfway at 375
    assert sgt.head_decay_LH[4, 1].item() == pytest.approx(1e-4, rel=1e-3)  # (1e-8)^(1/2)
    drive_phases(sgt, {}, until=500, start=375)
    assert sgt.head_decay_LH[4, 1].item() == 0.0


def test_low_entropy_selection_keeps_the_lowest_heads():
    sgt = sgt_model(head_selection="low_entropy").depth
    drive(sgt, {1: 0.9, 2: 0.5, 3: 0.8, 4: 0.7, 5: 0.2}, until=250)
    assert sgt.kept_LH[4].nonzero().flatten().tolist() == [1, 3]


def test_sgt_adds_no_parameters():
    plain = LanguageModel(ModelConfig(vocab_size=64, d_model=32, n_layers=6, n_heads=4, max_seq_len=32))
    assert sgt_model().num_parameters() == plain.num_parameters()


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_kept_heads_loop_equals_the_masked_all_heads_computation(n_kv_heads):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64,
        d_model=32,
        n_layers=3,
        n_heads=4,
        max_seq_len=32,
        attention={"name": "mha", "n_kv_heads": n_kv_heads},
        depth={"name": "sgt", "exclude_layers": [0], "top_k_layers": 2},
    )
    model = LanguageModel(cfg).eval()
    sgt = model.depth
    sgt.loop_depth[2] = 1
    sgt.kept_LH[2] = torch.tensor([False, True, False, True])
    idx = torch.randint(0, 64, (2, 11))
    got = model(idx, last_position_only=True).logits

    def reference_loop(block, x, cos, sin):
        """All heads through the block's own projections, non-kept heads masked to 0 (the official code)."""
        attn, (B, T, _) = block.attn, x.shape
        h = block.attn_norm(x)
        q = attn.wq(h).view(B, T, 4, 8)
        k, v = attn.wkv(h).view(B, T, 2, n_kv_heads, 8).unbind(2)
        from arch.layers import apply_rope

        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        heads = torch.arange(4) // (4 // n_kv_heads)
        out, _ = attention_reference(q, k, v, heads, heads, torch.arange(T).expand(B, T), True, 8**-0.5)
        out = out * torch.tensor([0.0, 1.0, 0.0, 1.0])[None, None, :, None]
        return attn.wo(out.flatten(2).to(x.dtype))

    with torch.no_grad():
        x = model.embed(idx)
        cos, sin = model.rope(torch.arange(11))
        from arch.layers import ForwardContext

        ctx = ForwardContext(cos_TF=cos, sin_TF=sin, positions_T=torch.arange(11))
        for i, block in enumerate(sgt.blocks):
            x = x + block.attn(block.attn_norm(x), ctx)
            if i == 2:
                x = x + reference_loop(block, x, cos, sin)
            x = x + block.ffn(block.ffn_norm(x), ctx)
        expected = model.lm_head(model.norm(x))[:, -1:]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    prompt = idx[:, :4]
    cached = model.generate(prompt, 5, temperature=0)
    seq = prompt
    for _ in range(5):
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(cached, seq)  # the loop's KV slots work with generation


SGT_TINY = ["model/depth=sgt", "model.n_layers=4", "model.depth.first_selection_step=3", "model.depth.window_size=3"]


def test_resume_restores_the_scheduler_and_continues_identically(tmp_path):
    straight = tmp_path / "straight"
    train(
        tiny_config(
            straight, *SGT_TINY, "trainer.max_steps=16", "trainer.checkpoint_every=5", "trainer.sample_tokens=0"
        )
    )
    resumed = tmp_path / "resumed"

    class Interrupted(Exception):
        pass

    def stop_at_5(trainer, event, step):
        if event == "checkpoint" and step == 5:
            raise Interrupted

    with pytest.raises(Interrupted):  # stopped mid-window, right after the step-5 checkpoint
        Trainer(
            tiny_config(
                resumed, *SGT_TINY, "trainer.max_steps=16", "trainer.checkpoint_every=5", "trainer.sample_tokens=0"
            ),
            callbacks=(stop_at_5,),
        ).fit()
    trainer = Trainer(
        tiny_config(resumed, *SGT_TINY, "trainer.max_steps=16", "trainer.checkpoint_every=5", "trainer.sample_tokens=0")
    )
    depth = trainer.model.depth
    assert depth.selected == [3] and depth.decay_windows == {3: (3, 6)} and depth.window_end == 6
    trainer.fit()

    def losses(run):
        return [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]

    assert losses(resumed) == losses(straight)
    assert trainer.model.depth.get_extra_state()["selected"] == [3, 2, 1]


def test_flops_overhead_of_loops_is_counted_and_kept_heads_are_cheaper_than_block_loops():
    from training.accounting.account import account

    def forward_flops_per_token(model, seq_len):
        return account(model, seq_len).forward_flops_per_token

    heads = sgt_model(exclude_layers=[0])
    block = sgt_model(exclude_layers=[0], loop_mode="block")
    base = forward_flops_per_token(heads, 32)
    for model in (heads, block):
        model.depth.loop_depth[3] = 1
        model.depth.kept_LH[3, :2] = True
    extra_heads = forward_flops_per_token(heads, 32) - base
    extra_block = forward_flops_per_token(block, 32) - base
    assert 0 < extra_heads < extra_block
    assert extra_block == pytest.approx(base / 6, rel=0.35)  # one of six layers re-run (head excluded)
