import numpy as np
import pytest

from regdit.extras.classifier import class_score, fit_classifier, predict
from regdit.extras.demo import CLASSES, draw_shape


@pytest.mark.slow
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


def test_a_short_fit_tells_apart_shapes_of_different_colours():
    """The fast tier's check of the demo's judge: ten steps separate three classes of distinct
    colour."""
    rng = np.random.default_rng(1)
    classes = [0, 5, 7]  # a white circle, a red triangle, a blue x
    labels = np.repeat(np.arange(3), 12)
    images = np.stack([draw_shape(classes[label], rng) for label in labels])
    model = fit_classifier(images, labels, 3, steps=10, batch_size=12)
    fresh_labels = np.repeat(np.arange(3), 4)
    fresh = np.stack([draw_shape(classes[label], rng) for label in fresh_labels])
    assert (predict(model, fresh) == fresh_labels).mean() >= 0.9
