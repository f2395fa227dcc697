"""A trained model with its own preprocessing: checkpoints read back, images of any kind decoded
(or refused with the reason), probabilities for a batch."""

from __future__ import annotations

import pytest
import torch
from images import ODDITIES, encode, huge_png, photo, write_content
from models import CLASSES, biased

from finetune.model.classifier import (
    CheckpointError,
    ImageError,
    decode_image,
    describe,
    load_classifier,
    probabilities,
    save_final,
)
from finetune.tracking.serving import ImageClassifierModel, decode_base64

LIMITS = {"max_bytes": 2**20, "max_pixels": 10_000_000}
MODEL = {"arch": "resnet18", "weights": "none", "train_crop": 16, "test_resize": 20, "test_crop": 16,
         "resize_mode": "aspect"}


@pytest.mark.parametrize("name", sorted(ODDITIES))
def test_decode_accepts_every_valid_mode(name):
    image = decode_image(ODDITIES[name][0](), name, **LIMITS)
    assert image.mode == "RGB" and min(image.size) > 0


@pytest.mark.parametrize(("data", "message"), [
    (b"", "empty"),
    (b"GIF89a but not really", "not an image"),
    (huge_png(), "validate.max_pixels"),
    (huge_png(5000, 3000), "5000x3000 pixels is over the limit"),
    (encode(photo(7, (200, 160)), "JPEG")[:1500], "broken"),  # the header, half the pixels
])
def test_decode_refuses_bad_input_naming_it(data, message):
    with pytest.raises(ImageError, match=message) as caught:
        decode_image(data, "upload.jpg", **LIMITS)
    assert str(caught.value).startswith("upload.jpg: ")


def test_decode_refuses_oversized_bytes():
    with pytest.raises(ImageError, match="serve.max_image_mb"):
        decode_image(encode(photo(1, (300, 300)), "PNG"), "big.png", max_bytes=100, max_pixels=10**8)


@pytest.mark.parametrize(("text", "ok"), [("aGVsbG8=", True), ("data:image/jpeg;base64,aGVsbG8=", True),
                                          ("not base64!", False), (None, False)])
def test_base64_column(text, ok):
    if ok:
        assert decode_base64(text, "row 0") == b"hello"
    else:
        with pytest.raises(ImageError, match="row 0"):
            decode_base64(text, "row 0")


def test_checkpoint_round_trip_keeps_preprocessing_and_info(tmp_path):
    settings = {"variant": "finetune", "train": {}, "model": MODEL, "classes": CLASSES, "weights": "none"}
    save_final(tmp_path / "model.pt", biased(1), CLASSES, "resnet18", settings, fingerprint="f", mlflow_run_id="r")
    classifier = load_classifier(tmp_path / "model.pt")
    assert classifier.classes == CLASSES and classifier.info == {"arch": "resnet18", "fingerprint": "f",
                                                                 "mlflow_run_id": "r"}
    assert classifier.model_cfg.resize_mode == "aspect" and not classifier.model.training
    images = [decode_image(encode(photo(i, (30 + 40 * i, 50)), "PNG"), f"{i}", **LIMITS) for i in range(5)]
    probs = probabilities(classifier, images, batch_size=2)
    assert probs.shape == (5, 2) and torch.allclose(probs.sum(1), torch.ones(5))
    assert (probs.argmax(1) == 1).all()  # the network favours class 1
    rows = describe(classifier.classes, probs)
    assert rows[0]["class"] == "not-hotdog" and rows[0]["confidence"] == pytest.approx(probs[0, 1].item())


@pytest.mark.parametrize(("content", "message"), [(None, "does not exist"), (b"garbage", "not a readable"),
                                                  ({"model": {}}, "lacks")])
def test_bad_checkpoints_are_named(tmp_path, content, message):
    path = write_content(tmp_path / "model.pt", content)
    with pytest.raises(CheckpointError, match=message) as caught:
        load_classifier(path)
    assert str(path) in str(caught.value)


def test_pyfunc_predict_refuses_a_frame_without_images():
    import pandas as pd
    from mlflow.exceptions import MlflowException

    model = ImageClassifierModel()
    with pytest.raises(MlflowException, match="column 'image'"):
        model.predict(None, pd.DataFrame({"picture": ["x"]}))
