"""
MLCAK: multi-level collaborative attention knowledge, distilled from a high-resolution ViT teacher into a
low-resolution ViT student, with two tasks at once (Akhter, Ranjan, Singh, Vatsa, arXiv 2405.13370).

    MLCT  multi-label classification of local lesions       (BCE on one logit per label)
    MCCT  global classification, normal vs abnormal          (cross-entropy)

    L_joint = L_KD + L_cls
    L_cls   = BCE(z_local, y_local) + CE(z_global, y_global)
    L_KD    = alpha * MSE(sigmoid(z_local^S), sigmoid(z_local^T)) + beta * MSE(softmax(z_global^S), softmax(z_global^T))
              + gamma * MSE(MLCAK^S, MLCAK^T)
    MLCAK   = (1/N) * sum_{i=1..N} H_i      H_i: layer i's attention averaged over its heads; N: the layers used

One short function per idea, named as the paper writes it. The paper's available text leaves open how LR images
enter the ViT, what H_i and N are exactly, and alpha/beta/gamma; our reading is in each docstring and in README.
Superscripts S and T are the student and the teacher; the teacher's targets are what the student learns from it.

This file imports torch alone; copy it into your project as it is. It expects a model whose
forward(x, return_attn=True) returns (local_logits, global_logits, attentions), as vit.VisionTransformer does.
"""

import torch
import torch.nn.functional as F


def simulate_low_resolution(hr, res):
    """
    x_LR = up_bicubic(down_antialiased(x_HR, res x res), HR size)

    The HR batch (B, C, S, S) is reduced to res x res with an antialiased bilinear (triangle) filter, which averages
    each low-resolution pixel's footprint as a coarse detector does, then brought back to S x S by bicubic
    interpolation. The student thus has the teacher's token grid, so the two MLCAK maps can be compared entry by
    entry (paper Fig. 1: 224 -> 112 / 56 / 28). This is the one place where LR images are made.
    """
    size = hr.shape[-2:]
    if res == size[0] and res == size[1]:
        return hr
    lr = F.interpolate(hr, size=(res, res), mode="bilinear", antialias=True, align_corners=False)  # (B, C, res, res)
    # Pillow's bicubic (a = -0.5, the kernel the cache was resized with), which is also torch's fast separable path
    up = F.interpolate(lr, size=size, mode="bicubic", antialias=True, align_corners=False)  # (B, C, S, S)
    # bicubic overshoots at edges: clamp to each image's own range, so an image's input never depends on its batch
    return up.clamp(hr.amin((-2, -1), keepdim=True), hr.amax((-2, -1), keepdim=True))  # min, max (B, C, 1, 1)


def model_input(hr, res, norm):
    """
    What a model at resolution res sees: x = (x_LR - mean) / std, with x_LR = simulate_low_resolution(x_HR, res)
    (the HR batch itself when res is the HR size). norm = (mean, std), saved with every checkpoint.
    """
    mean, std = norm
    return (simulate_low_resolution(hr, res) - mean) / std


def mlcak_map(attentions, layers=None):
    """
    MLCAK = (1/N) * sum_{i=1..N} H_i,    H_i = (1/heads) * sum_h A_{i,h}

    attentions: one (B, heads, T, T) tensor A_i per layer (softmax probabilities, as vit.VisionTransformer returns).
    layers: indices of the layers to use (negative counts from the end); all layers by default, so N = depth.
    Returns (B, T, T). Heads and layers are averaged away, so teacher and student may differ in width, heads
    and depth; only the token count T has to match between them.
    """
    if len(attentions) == 0:
        raise ValueError("mlcak_map needs attention matrices: call the model with return_attn=True")
    chosen = attentions if layers is None else [attentions[i] for i in layers]
    H = [A_i.mean(dim=1) for A_i in chosen]  # H_i: (B, heads, T, T) -> (B, T, T), one per layer
    return torch.stack(H).mean(dim=0)        # (1/N) sum_i H_i: N x (B, T, T) -> (N, B, T, T) -> (B, T, T)


def targets_from_teacher(teacher_out, layers=None):
    """
    The teacher's targets, what the student learns from the frozen teacher, detached and in float32:

        p_local^T = sigmoid(z_local^T) (B, L),   p_global^T = softmax(z_global^T) (B, 2),   MLCAK^T (B, T, T)

    (MLCAK^T is None when the teacher returned no attentions). The teacher is fixed and sees the same HR image in
    every epoch, so these can be computed once per training image and looked up (train.py does) instead of
    running the teacher at each step. Float32: under bf16 autocast a probability near 1 moves in steps of 2^-8.
    """
    local, glob, attentions = teacher_out
    mlcak_T = mlcak_map(attentions, layers).detach().float() if attentions else None
    return local.detach().float().sigmoid(), glob.detach().float().softmax(-1), mlcak_T


def classification_loss(local_logits, global_logits, y_local, y_global):
    """
    L_cls = BCE-with-logits(z_local, y_local) + CE(z_global, y_global)

    y_local: (B, L) in {0, 1}; y_global: (B,) class indices (0 normal, 1 abnormal). Returns L_cls and its two terms.
    """
    cls_local = F.binary_cross_entropy_with_logits(local_logits, y_local.float())
    cls_global = F.cross_entropy(global_logits, y_global)
    return cls_local + cls_global, dict(cls_local=cls_local, cls_global=cls_global)


def attention_kd_loss(student_attentions, mlcak_T, layers=None):
    """
    MSE(MLCAK^S, MLCAK^T) = mean over (b, t, t') of (MLCAK^S - MLCAK^T)^2

    mlcak_T: the teacher's MLCAK map (B, T, T), a target (targets_from_teacher gives it). A token-count mismatch is
    an error, not a broadcast.
    """
    mlcak_S = mlcak_map(student_attentions, layers).float()
    if mlcak_S.shape != mlcak_T.shape:
        raise ValueError(
            f"MLCAK maps differ in shape: student {tuple(mlcak_S.shape)} vs teacher {tuple(mlcak_T.shape)}; "
            "teacher and student need the same number of tokens (img_size / patch_size)"
        )
    return F.mse_loss(mlcak_S, mlcak_T.detach())


def distillation_loss(student_out, teacher_targets, alpha=1.0, beta=1.0, gamma=1000.0, layers=None):
    """
    L_KD = alpha * MSE(p_local^S, p_local^T) + beta * MSE(p_global^S, p_global^T) + gamma * MSE(MLCAK^S, MLCAK^T)
    p_local = sigmoid(z_local), p_global = softmax(z_global)

    The task terms compare probabilities, not logits: a confident teacher's logits are large, and their MSE
    outweighs L_cls many times over, spending the student's effort on saturated tails that change no prediction;
    probabilities weight the region where the decision is made (README, "Our reading of the paper"). gamma = 0
    skips the attention term (then neither model need return attentions). The default gamma is large because
    attention probabilities are about 1/T each, so the raw MSE of two maps is small (README, "Our reading").
    Returns L_KD and its terms.
    """
    local_logits, global_logits, attentions = student_out
    p_local_T, p_global_T, mlcak_T = teacher_targets
    kd_local = F.mse_loss(local_logits.float().sigmoid(), p_local_T)        # (B, L), in float32 as the targets
    kd_global = F.mse_loss(global_logits.float().softmax(-1), p_global_T)  # (B, 2)
    l_kd, terms = alpha * kd_local + beta * kd_global, dict(kd_local=kd_local, kd_global=kd_global)
    if gamma:
        terms["kd_attn"] = attention_kd_loss(attentions, mlcak_T, layers)
        l_kd = l_kd + gamma * terms["kd_attn"]
    return l_kd, terms


def joint_loss(student_out, labels, teacher_targets=None, alpha=1.0, beta=1.0, gamma=1000.0, layers=None):
    """
    L_joint = L_KD + L_cls                      (the mlcak student)
    L_joint = L_cls                             (the baseline and the teacher: teacher_targets is None)

    student_out: (local_logits, global_logits, attentions) from the student's forward; labels: (y_local (B, L),
    y_global (B,)); teacher_targets: targets_from_teacher(teacher_out) for the same images. Returns (L_joint, terms):
    terms maps each named part (cls_local, cls_global, kd_local, kd_global, kd_attn, total) to a detached tensor, for
    the log.
    """
    l_cls, terms = classification_loss(student_out[0], student_out[1], *labels)
    l_joint = l_cls
    if teacher_targets is not None:
        l_kd, kd_terms = distillation_loss(student_out, teacher_targets, alpha, beta, gamma, layers)
        l_joint = l_kd + l_cls
        terms.update(kd_terms)
    terms["total"] = l_joint
    return l_joint, {k: v.detach() for k, v in terms.items()}
