"""clipft.metrics on hand-made cases, each number worked out by hand or by a
plain-Python loop that shares nothing with the implementation."""
from __future__ import annotations

import random

import pytest
import torch

from clipft.metrics import (balanced_accuracy, calibration, classification_metrics, confusion_matrix,
                            per_class_accuracy, retrieval_metrics, topk_accuracy)

# float32 probabilities carry ~6e-8 relative error; a few of them are summed
TOL = 1e-6


def test_topk_accuracy_by_hand():
    scores = torch.tensor([[0.1, 0.7, 0.2],    # label 1: top-1 hit
                           [0.5, 0.3, 0.2],    # label 2: miss at 1 and 2, hit at 3
                           [0.2, 0.3, 0.5]])   # label 1: miss at 1, hit at 2
    labels = torch.tensor([1, 2, 1])
    assert topk_accuracy(scores, labels, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(scores, labels, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(scores, labels, 5) == 1.0     # capped at 3 classes


def test_per_class_and_balanced_accuracy_by_hand():
    pred = torch.tensor([0, 0, 0, 1, 1, 2])
    labels = torch.tensor([0, 0, 1, 1, 1, 1])       # class 0: 2/2; class 1: 2/4; class 2: none
    pc = per_class_accuracy(pred, labels, 3)
    assert pc == [(2, 1.0), (4, 0.5), (0, None)]
    assert balanced_accuracy(pc) == pytest.approx(0.75)   # mean over classes with samples
    assert confusion_matrix(pred, labels, 3).tolist() == [[2, 0, 0], [1, 2, 1], [0, 0, 0]]


def test_ece_on_a_hand_made_example():
    # confidences .92 (wrong) and .90 (right) share bin (13/15, 14/15]: accuracy .5,
    # confidence .91; .81 wrong, .70 right and .55 wrong sit alone in their bins.
    probs = torch.tensor([[0.90, 0.10], [0.08, 0.92], [0.81, 0.19], [0.30, 0.70], [0.45, 0.55]])
    labels = torch.tensor([0, 0, 1, 1, 0])
    ece, table = calibration(probs, labels, bins=15)
    expected = (2 * abs(0.5 - 0.91) + abs(0 - 0.81) + abs(1 - 0.70) + abs(0 - 0.55)) / 5
    assert ece == pytest.approx(expected, abs=TOL)
    assert len(table) == 15 and sum(b["count"] for b in table) == 5
    b13 = table[13]
    assert (b13["count"], b13["accuracy"]) == (2, 0.5)
    assert b13["confidence"] == pytest.approx(0.91, abs=TOL)
    assert b13["lo"] == pytest.approx(13 / 15) and b13["hi"] == pytest.approx(14 / 15)
    assert [b["count"] for b in table].count(0) == 11 and table[0]["accuracy"] is None


def test_ece_is_zero_when_confidence_equals_accuracy():
    # every prediction at confidence 1 and right: perfectly calibrated
    probs = torch.eye(4)
    ece, _ = calibration(probs, torch.arange(4))
    assert ece == 0.0


def _loop_metrics(scores, labels, n_classes):
    """top-1, top-5, balanced accuracy and ECE in plain Python."""
    rows = scores.tolist()
    ys = labels.tolist()
    top1 = sum(max(range(n_classes), key=lambda c: r[c]) == y for r, y in zip(rows, ys)) / len(ys)
    top5 = sum(y in sorted(range(n_classes), key=lambda c: -r[c])[:5] for r, y in zip(rows, ys)) / len(ys)
    per = {}
    for r, y in zip(rows, ys):
        per.setdefault(y, []).append(max(range(n_classes), key=lambda c: r[c]) == y)
    bal = sum(sum(v) / len(v) for v in per.values()) / len(per)
    return top1, top5, bal


def test_classification_metrics_match_a_loop_on_random_scores():
    rng = random.Random(0)
    n, c = 200, 8
    scores = torch.tensor([[rng.gauss(0, 1) for _ in range(c)] for _ in range(n)])
    labels = torch.tensor([rng.randrange(c) for _ in range(n)])
    head, details = classification_metrics(scores, scores.softmax(1), labels, c)
    top1, top5, bal = _loop_metrics(scores, labels, c)
    assert head["top1"] == pytest.approx(top1)
    assert head["top5"] == pytest.approx(top5)
    assert head["balanced_accuracy"] == pytest.approx(bal)
    # ECE by a loop over the bins
    probs = scores.softmax(1).tolist()
    bins = [[] for _ in range(15)]
    for p, y in zip(probs, labels.tolist()):
        conf = max(p)
        b = min(14, max(0, int(-(-conf * 15 // 1)) - 1))   # (lo, hi] bins
        bins[b].append((conf, p.index(conf) == y))
    ece = sum(len(b) / n * abs(sum(ok for _, ok in b) / len(b) - sum(cf for cf, _ in b) / len(b))
              for b in bins if b)
    assert head["ece"] == pytest.approx(ece, abs=TOL)
    assert details["confusion"].sum() == n


def test_top5_is_left_out_with_five_classes_or_fewer():
    head, _ = classification_metrics(torch.eye(5), torch.eye(5), torch.arange(5), 5)
    assert "top5" not in head and head["top1"] == 1.0


def test_top1_per_class_and_confusion_follow_one_prediction_and_need_no_probabilities():
    """On a tie the first class is predicted, for top-1 as for the per-class
    accuracies and the confusion counts; without probabilities there is no ECE."""
    scores = torch.zeros(4, 3)                      # every row a three-way tie
    labels = torch.tensor([0, 0, 1, 2])
    head, details = classification_metrics(scores, None, labels, 3)
    assert head["top1"] == 0.5 and details["confusion"][:, 0].tolist() == [2, 1, 1]
    assert [a for _, a in details["per_class"]] == [1.0, 0.0, 0.0]
    assert "ece" not in head and "reliability" not in details
    lean, details = classification_metrics(scores, None, labels, 3, confusion=False)
    assert lean == head and "confusion" not in details


def test_per_class_accuracies_equal_the_mean_of_each_class_hits():
    """From the confusion counts, each accuracy is the float32 mean of the
    class's hits, bit for bit (what the run's evaluation reported before)."""
    g = torch.Generator().manual_seed(3)
    for n_classes, n in ((3, 7), (11, 500), (40, 3001)):
        labels = torch.randint(0, n_classes, (n,), generator=g)
        pred = torch.where(torch.rand(n, generator=g) < 0.4, labels, torch.randint(0, n_classes, (n,), generator=g))
        want = [(int((labels == c).sum()), float((pred[labels == c] == c).float().mean()))
                for c in range(n_classes)]
        assert per_class_accuracy(pred, labels, n_classes) == [(k, a if k else None) for k, a in want]


def test_counts_leave_out_unlabelled_rows():
    pred, labels = torch.tensor([1, 0, 1]), torch.tensor([-1, 0, 1])
    assert confusion_matrix(pred, labels, 2).tolist() == [[1, 0], [0, 1]]
    assert per_class_accuracy(pred, labels, 2) == [(1, 1.0), (1, 1.0)]


def test_retrieval_recall_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=1)
    captions = [f"caption {i % 12}" for i in range(30)]          # repeated captions
    uniq = list(dict.fromkeys(captions))
    txt = torch.nn.functional.normalize(torch.randn(len(uniq), 8, generator=g), dim=1)
    got = retrieval_metrics(img, txt, captions, ks=(1, 5, 10))
    sim = (img @ txt.t()).tolist()
    for k in (1, 5, 10):
        i2t = sum(uniq.index(captions[i]) in sorted(range(len(uniq)), key=lambda j: -sim[i][j])[:k]
                  for i in range(30)) / 30
        t2i = sum(any(captions[i] == uniq[j] for i in sorted(range(30), key=lambda i: -sim[i][j])[:k])
                  for j in range(len(uniq))) / len(uniq)
        assert got[f"i2t_recall@{k}"] == pytest.approx(i2t)
        assert got[f"t2i_recall@{k}"] == pytest.approx(t2i)
        assert got[f"recall@{k}"] == pytest.approx((i2t + t2i) / 2)
