import math

import pytest
import torch

from mlcak import attention_kd_loss, joint_loss, mlcak_map, simulate_low_resolution, targets_from_teacher
from vit import VisionTransformer, ViTConfig


def tiny_vit(embed_dim=24, depth=2, num_heads=3, seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=embed_dim, depth=depth,
                                       num_heads=num_heads, num_local=4, num_global=2))


def batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 32, 32, generator=g)
    return x, (torch.randint(0, 2, (n, 4), generator=g).float(), torch.randint(0, 2, (n,), generator=g))


def test_simulate_low_resolution_keeps_size_and_removes_fine_detail():
    hr = torch.zeros(1, 1, 224, 224)
    hr[..., ::2, :] = 1.0  # stripes one pixel wide: invisible at 28 x 28
    lr = simulate_low_resolution(hr, 28)
    assert lr.shape == hr.shape
    assert lr.std() < 0.01 and abs(lr.mean() - 0.5) < 0.01
    smooth = torch.linspace(0, 1, 224).expand(1, 1, 224, 224).contiguous()  # a coarse ramp survives
    assert (simulate_low_resolution(smooth, 28) - smooth).abs().max() < 0.03
    assert torch.equal(simulate_low_resolution(hr, 224), hr)


def test_an_image_gets_the_same_low_resolution_input_alone_and_in_a_batch():
    g = torch.Generator().manual_seed(0)
    batch = torch.rand(5, 1, 64, 64, generator=g)
    batch[1] *= 0.2  # a dark image next to bright ones: a batch-wide clamp would let it overshoot into their range
    batch[1, :, :, 32:] = 0.2
    alone = torch.cat([simulate_low_resolution(batch[i:i + 1], 16) for i in range(5)])
    together = simulate_low_resolution(batch, 16)
    torch.testing.assert_close(together, alone, rtol=0, atol=0)
    assert together[1].max() <= batch[1].max() and together[1].min() >= batch[1].min()


def test_mlcak_map_is_the_mean_over_heads_and_layers():
    a1 = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]]])  # (1, 2 heads, 2, 2)
    a2 = torch.tensor([[[[0.5, 0.5], [0.5, 0.5]], [[1.0, 0.0], [1.0, 0.0]]]])
    # by hand: H_1 = [[.5,.5],[.5,.5]], H_2 = [[.75,.25],[.75,.25]], MLCAK = (H_1 + H_2) / 2
    expected = torch.tensor([[[0.625, 0.375], [0.625, 0.375]]])
    torch.testing.assert_close(mlcak_map([a1, a2]), expected)
    torch.testing.assert_close(mlcak_map([a1, a2], layers=[-1]), torch.tensor([[[0.75, 0.25], [0.75, 0.25]]]))
    with pytest.raises(ValueError, match="return_attn=True"):
        mlcak_map([])


def test_teacher_and_student_of_different_depth_and_width_are_compared():
    x, _ = batch()
    teacher, student = tiny_vit(embed_dim=48, depth=3, num_heads=4), tiny_vit(embed_dim=24, depth=2, num_heads=3)
    loss = attention_kd_loss(student(x, return_attn=True)[2], mlcak_map(teacher(x, return_attn=True)[2]))
    assert loss.ndim == 0 and loss > 0


def test_mismatched_token_counts_fail_with_a_clear_message():
    x, _ = batch()
    student = tiny_vit()
    teacher = VisionTransformer(ViTConfig(img_size=32, patch_size=4, embed_dim=24, depth=2, num_heads=3))
    with pytest.raises(ValueError, match="same number of tokens"):
        attention_kd_loss(student(x, return_attn=True)[2], mlcak_map(teacher(x, return_attn=True)[2]))


def test_kd_terms_vanish_when_student_equals_teacher():
    x, targets = batch()
    model = tiny_vit()
    out = model(x, return_attn=True)
    _, terms = joint_loss(out, targets, teacher_targets=targets_from_teacher(out), alpha=1, beta=1, gamma=1000)
    assert terms["kd_local"] == 0 and terms["kd_global"] == 0 and terms["kd_attn"] == 0
    torch.testing.assert_close(terms["total"], terms["cls_local"] + terms["cls_global"])


def test_kd_task_terms_compare_probabilities():
    B, L = 4, 5
    targets = (torch.zeros(B, L), torch.zeros(B, dtype=torch.long))
    student = (torch.zeros(B, L), torch.zeros(B, 2), [])
    teacher = (torch.full((B, L), math.log(3)), torch.tensor([[math.log(3), 0.0]] * B), [])
    _, terms = joint_loss(student, targets, teacher_targets=targets_from_teacher(teacher), gamma=0)
    # sigmoid(log 3) = 0.75 against 0.5; softmax([log 3, 0]) = [0.75, 0.25] against [0.5, 0.5]
    torch.testing.assert_close(terms["kd_local"], torch.tensor(0.0625))
    torch.testing.assert_close(terms["kd_global"], torch.tensor(0.0625))
    saturated = (torch.full((B, L), 20.0), torch.tensor([[20.0, -20.0]] * B), [])
    confident = (torch.full((B, L), 30.0), torch.tensor([[30.0, -30.0]] * B), [])
    _, terms = joint_loss(saturated, targets, teacher_targets=targets_from_teacher(confident), gamma=0)
    assert terms["kd_local"] < 1e-8 and terms["kd_global"] < 1e-8  # logits 10 apart, the same decision


def test_kd_probabilities_are_float32_under_bf16_so_confident_outputs_still_learn():
    # logits 6 and 7: probabilities 0.9975 and 0.9991, the same number in bf16 (steps of 2^-8 near 1)
    student = (torch.full((4, 3), 6.0, dtype=torch.bfloat16), torch.zeros(4, 2, dtype=torch.bfloat16), [])
    teacher = targets_from_teacher((torch.full((4, 3), 7.0, dtype=torch.bfloat16), torch.zeros(4, 2, dtype=torch.bfloat16), []))
    assert teacher[0].dtype == torch.float32
    _, terms = joint_loss(student, (torch.ones(4, 3), torch.zeros(4, dtype=torch.long)), teacher, gamma=0)
    torch.testing.assert_close(terms["kd_local"], (torch.sigmoid(torch.tensor(6.0)) - torch.sigmoid(torch.tensor(7.0))) ** 2)


def test_baseline_is_classification_loss_alone():
    x, targets = batch()
    local, glob, _ = tiny_vit()(x)
    total, terms = joint_loss((local, glob, []), targets)
    expected = (torch.nn.functional.binary_cross_entropy_with_logits(local, targets[0])
                + torch.nn.functional.cross_entropy(glob, targets[1]))
    torch.testing.assert_close(total, expected)
    assert set(terms) == {"cls_local", "cls_global", "total"}


def test_gradients_reach_every_student_parameter_and_no_teacher_parameter():
    x, targets = batch()
    teacher, student = tiny_vit(embed_dim=48, depth=3, num_heads=4, seed=1), tiny_vit(seed=2)
    teacher_out = teacher(x, return_attn=True)  # with grad enabled on purpose: the loss must still cut it
    total, _ = joint_loss(student(x, return_attn=True), targets, targets_from_teacher(teacher_out), gamma=1000)
    total.backward()
    for name, p in student.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in teacher.parameters())


def test_attention_term_alone_trains_the_attention():
    x, targets = batch()
    teacher, student = tiny_vit(seed=1), tiny_vit(seed=2)
    with torch.no_grad():
        t_map = mlcak_map(teacher(x, return_attn=True)[2])
    before = attention_kd_loss(student(x, return_attn=True)[2], t_map).item()
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    for _ in range(20):
        loss = attention_kd_loss(student(x, return_attn=True)[2], t_map)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * before


def test_a_few_steps_on_one_batch_lower_the_joint_loss():
    x, targets = batch()
    x = (x - 0.5) / 0.25  # normalized, as train.py feeds the models
    teacher, student = tiny_vit(seed=1).eval(), tiny_vit(seed=2)
    with torch.no_grad():
        teacher = targets_from_teacher(teacher(x, return_attn=True))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        total, _ = joint_loss(student(simulate_low_resolution(x, 16), return_attn=True), targets, teacher)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert losses[-1] < 0.9 * losses[0]
