import numpy as np

from regdit.classifier import class_score
from regdit.demo import CLASSES, draw_shape


def test_class_score_tells_right_from_wrong_labels():
    rng = np.random.default_rng(0)
    labels = np.arange(len(CLASSES)).repeat(30)
    images = np.stack([draw_shape(label, rng) for label in labels])
    fresh_labels = np.arange(len(CLASSES)).repeat(5)
    fresh = np.stack([draw_shape(label, rng) for label in fresh_labels])
    score, accuracy = class_score(images, labels, len(CLASSES), fresh, fresh_labels)
    assert accuracy >= 0.95 and score >= 0.95  # new drawings of the right class
    wrong, _ = class_score(images, labels, len(CLASSES), fresh, (fresh_labels + 1) % len(CLASSES))
    assert wrong <= 0.1  # the same images under another class's label
