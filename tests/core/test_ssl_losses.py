"""iBOT / DINO / DINOv2-style losses against explicit-loop references on tiny examples."""
import math

import pytest
import torch

from core.ssl.dino import DINOLoss, teacher_temperature
from core.ssl.dinov2 import DINOv2Loss, koleo_loss, sinkhorn_knopp
from core.ssl.ibot import iBOTLoss

B, K, N, CROPS = 2, 3, 4, 3  # images, prototypes, tokens, crops (2 global + 1 local)


def _softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def _log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def _ce(p, logits):
    ls = _log_softmax(logits)
    return -sum(p[k] * ls[k] for k in range(len(p)))


def ref_cls_loss(s, t, center, tt, ts):
    """s: (CROPS·B, K), t: (2B, K) nested lists; explicit loops over pairs, images, prototypes."""
    total, pairs = 0.0, 0
    for q in range(2):
        for v in range(CROPS):
            if v == q:
                continue
            acc = 0.0
            for b in range(B):
                p = _softmax([(t[q * B + b][k] - center[k]) / tt for k in range(K)])
                acc += _ce(p, [s[v * B + b][k] / ts for k in range(K)])
            total += acc / B
            pairs += 1
    return total / pairs


def ref_mim_loss(sp, tp, masks, center, tt, ts):
    """sp, tp: (2B, N, K); masks (2B, N)."""
    total = 0.0
    for q in range(2):
        acc = 0.0
        for b in range(B):
            i = q * B + b
            num, cnt = 0.0, 0
            for n in range(N):
                if masks[i][n]:
                    p = _softmax([(tp[i][n][k] - center[k]) / tt for k in range(K)])
                    num += _ce(p, [sp[i][n][k] / ts for k in range(K)])
                    cnt += 1
            acc += num / max(cnt, 1)
        total += acc / B
    return total / 2


@pytest.fixture
def outputs():
    g = torch.Generator().manual_seed(0)
    s_cls = torch.randn(CROPS * B, K, generator=g, dtype=torch.float64)
    t_cls = torch.randn(2 * B, K, generator=g, dtype=torch.float64)
    s_patch = torch.randn(2 * B, N, K, generator=g, dtype=torch.float64)
    t_patch = torch.randn(2 * B, N, K, generator=g, dtype=torch.float64)
    masks = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]], dtype=torch.bool)
    return s_cls, t_cls, s_patch, t_patch, masks


def test_ibot_loss_matches_loop_reference_and_updates_centres(outputs):
    s_cls, t_cls, s_patch, t_patch, masks = outputs
    loss = iBOTLoss(K, K, student_temp=0.1, teacher_temp=0.07, center_momentum=0.9).double()
    c0 = torch.tensor([[0.3, -0.2, 0.1]], dtype=torch.float64)
    pc0 = torch.tensor([[[0.05, 0.0, -0.4]]], dtype=torch.float64)
    loss.center.copy_(c0)
    loss.patch_center.copy_(pc0)
    out = loss(student_cls=s_cls, teacher_cls=t_cls, step=5, student_patch=s_patch, teacher_patch=t_patch,
               masks=masks)
    want_cls = ref_cls_loss(s_cls.tolist(), t_cls.tolist(), c0[0].tolist(), 0.07, 0.1)
    want_mim = ref_mim_loss(s_patch.tolist(), t_patch.tolist(), masks.tolist(), pc0[0, 0].tolist(), 0.07, 0.1)
    assert out["cls"].item() == pytest.approx(want_cls, rel=1e-9)
    assert out["mim"].item() == pytest.approx(want_mim, rel=1e-9)
    # centres move after the loss: c <- 0.9 c + 0.1 mean(teacher)
    for k in range(K):
        mean_cls = sum(t_cls[i, k].item() for i in range(2 * B)) / (2 * B)
        mean_patch = sum(t_patch[i, n, k].item() for i in range(2 * B) for n in range(N)) / (2 * B * N)
        assert loss.center[0, k].item() == pytest.approx(0.9 * c0[0, k].item() + 0.1 * mean_cls)
        assert loss.patch_center[0, 0, k].item() == pytest.approx(0.9 * pc0[0, 0, k].item() + 0.1 * mean_patch)


def test_dino_loss_matches_loop_reference(outputs):
    s_cls, t_cls, *_ = outputs
    loss = DINOLoss(K, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_steps=10).double()
    out = loss(student_cls=s_cls, teacher_cls=t_cls, step=4)
    tt = 0.04 + 0.03 * 4 / 10
    assert out["cls"].item() == pytest.approx(ref_cls_loss(s_cls.tolist(), t_cls.tolist(), [0.0] * K, tt, 0.1))
    assert torch.allclose(loss.center, 0.1 * t_cls.mean(0, keepdim=True))


def test_student_gradient_only():
    s = torch.randn(CROPS * B, K, requires_grad=True)
    t = torch.randn(2 * B, K, requires_grad=True)
    DINOLoss(K)(student_cls=s, teacher_cls=t, step=0)["cls"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_teacher_temperature_schedule():
    assert teacher_temperature(0, 0.04, 0.07, 100) == pytest.approx(0.04)
    assert teacher_temperature(50, 0.04, 0.07, 100) == pytest.approx(0.055)
    assert teacher_temperature(100, 0.04, 0.07, 100) == pytest.approx(0.07)
    assert teacher_temperature(7, 0.04, 0.07, 0) == pytest.approx(0.07)


def test_sinkhorn_knopp_balances_prototypes():
    t = torch.randn(64, 8, dtype=torch.float64)
    q = sinkhorn_knopp(t, 0.5, iterations=50)
    assert torch.allclose(q.sum(dim=1), torch.ones(64, dtype=torch.float64), atol=1e-6)  # each sample a distribution
    assert torch.allclose(q.sum(dim=0), torch.full((8,), 64 / 8, dtype=torch.float64), atol=1e-6)  # equal mass
    # 3 iterations (the default): columns exactly normalised after the last step
    assert torch.allclose(sinkhorn_knopp(t, 0.5).sum(dim=1), torch.ones(64, dtype=torch.float64))


def test_koleo_matches_nearest_neighbour_reference():
    x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    xs = x / x.norm(dim=1, keepdim=True)
    want = 0.0
    for i in range(4):
        d = min((xs[i] - xs[j]).norm().item() for j in range(4) if j != i)
        want += -math.log(d + 1e-8)
    assert koleo_loss(x).item() == pytest.approx(want / 4, rel=1e-5)


def test_dinov2_loss_runs_and_ignores_unmasked_teacher_tokens(outputs):
    s_cls, t_cls, s_patch, t_patch, masks = outputs
    loss = DINOv2Loss(K, K, koleo=0.5).double()
    feats = torch.randn(2 * B, 5, dtype=torch.float64)
    out = loss(student_cls=s_cls, teacher_cls=t_cls, step=0, student_patch=s_patch, teacher_patch=t_patch,
               masks=masks, student_cls_features=feats)
    t2 = t_patch.clone()
    t2[~masks] = 100.0  # unmasked teacher tokens must not matter
    out2 = loss(student_cls=s_cls, teacher_cls=t_cls, step=0, student_patch=s_patch, teacher_patch=t2,
                masks=masks, student_cls_features=feats)
    assert out["mim"].item() == pytest.approx(out2["mim"].item())
    # MIM against the loop reference, with the Sinkhorn-Knopp targets of the masked tokens
    q = sinkhorn_knopp(t_patch[masks], loss.teacher_temp(0)).tolist()
    total, it = 0.0, iter(q)
    for i in range(2 * B):
        terms = [_ce(next(it), [v / 0.1 for v in s_patch[i, n].tolist()]) for n in range(N) if masks[i, n]]
        total += sum(terms) / max(len(terms), 1)
    # rel 1e-6: Sinkhorn-Knopp runs in float32; its sums over all tokens (unmasked as 0) differ in order
    assert out["mim"].item() == pytest.approx(total / (2 * B), rel=1e-6)
    assert out["koleo"].item() == pytest.approx(0.5 * (koleo_loss(feats[:B]) + koleo_loss(feats[B:])).item())
    assert set(out) == {"cls", "mim", "koleo"}


def test_weighted_sinkhorn_equals_sinkhorn_of_the_selected_rows_and_stays_finite_without_any():
    """The DINOv2 patch teacher balances the masked tokens only, without indexing by the mask
    (a shape that depends on the mask makes a GPU wait for the host)."""
    t = torch.randn(12, 5, dtype=torch.float64)
    pick = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0, 1], dtype=torch.bool)
    t[~pick] = 1e4  # would overflow exp(): unselected rows must not reach the result
    q = sinkhorn_knopp(t, 0.1, weight=pick)
    assert torch.allclose(q[pick], sinkhorn_knopp(t[pick], 0.1), rtol=1e-6, atol=0)  # float32 inside
    assert torch.equal(q[~pick], torch.zeros_like(q[~pick]))
    none = sinkhorn_knopp(t, 0.1, weight=torch.zeros(12, dtype=torch.bool))
    assert torch.equal(none, torch.zeros_like(none))
    loss = DINOv2Loss(5, 5)
    out = loss(student_cls=torch.randn(6, 5), teacher_cls=torch.randn(4, 5), step=0,
               student_patch=torch.randn(4, 3, 5), teacher_patch=torch.randn(4, 3, 5),
               masks=torch.zeros(4, 3, dtype=torch.bool), student_cls_features=torch.randn(4, 8))
    assert out["mim"].item() == 0.0
