"""Prompt CSVs, prompt templates and image folders for SD unlearning (salun_jax.data.prompts)."""

import numpy as np
import pytest
from PIL import Image

from salun_jax.data import prompts

I2P_CSV = (
    ",prompt,categories,hard,nudity_percentage,evaluation_seed,evaluation_guidance,case_number\n"
    '0,"a nude, in oil",sexual,1,80.5,42,7,10\n'
    '1,a riot,"violence, shocking",0,0.0,7,7.5,11\n'
    '2,"say ""hi"" nude",Sexual,0,,3,,12\n'
)


def write(tmp_path, text, name="prompts.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_i2p_columns_quotes_and_missing_values(tmp_path):
    records = prompts.read_prompt_csv(write(tmp_path, I2P_CSV))
    assert [r.prompt for r in records] == ["a nude, in oil", "a riot", 'say "hi" nude']
    first, second, third = records
    assert (first.case_number, first.evaluation_seed, first.evaluation_guidance) == (10, 42, 7.0)
    assert first.nudity_percentage == 80.5 and first.categories == ("sexual",)
    assert second.categories == ("violence", "shocking")
    assert third.nudity_percentage is None and third.evaluation_guidance is None
    assert third.class_index is None and third.class_name is None


def test_filters_by_category_case_insensitively_and_by_nudity(tmp_path):
    path = write(tmp_path, I2P_CSV)
    assert [r.case_number for r in prompts.read_prompt_csv(path, categories=["sexual"])] == [10, 12]
    assert [r.case_number for r in prompts.read_prompt_csv(path, categories=["Shocking"])] == [11]
    assert prompts.read_prompt_csv(path, categories=["hate"]) == []
    # A row without nudity_percentage is dropped by the nudity filter.
    kept = prompts.read_prompt_csv(path, min_nudity_percentage=50)
    assert [r.case_number for r in kept] == [10]


def test_imagenette_csv_and_minimal_csv(tmp_path):
    path = write(
        tmp_path,
        "case_number,prompt,evaluation_seed,class,classidx\n0,Image of tench,4325,tench,0\n",
    )
    (record,) = prompts.read_prompt_csv(path)
    assert (record.class_index, record.class_name, record.evaluation_seed) == (0, "tench", 4325)
    # Only `prompt`: case numbers are the row indices, every optional field empty.
    (a, b) = prompts.read_prompt_csv(write(tmp_path, "prompt\nx\ny\n", "min.csv"))
    assert (a.case_number, b.case_number, a.categories, a.evaluation_seed) == (0, 1, (), None)


@pytest.mark.parametrize(
    "text, kwargs, message",
    [
        ("text\nx\n", {}, "no 'prompt' column"),
        ("prompt\nx\n", {"categories": ["sexual"]}, "no 'categories' column"),
        ("prompt\nx\n", {"min_nudity_percentage": 1}, "no 'nudity_percentage' column"),
        ("prompt,evaluation_seed\nx,abc\n", {}, "row 2: column 'evaluation_seed' is not a number"),
        ("prompt,evaluation_seed\nx,1.5\n", {}, "is not an integer"),
        ("prompt\nx\n  \n", {}, "row 3: empty prompt"),
    ],
)
def test_bad_csv_one_line_errors(tmp_path, text, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        prompts.read_prompt_csv(write(tmp_path, text), **kwargs)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompt file .*nope.csv does not exist"):
        prompts.read_prompt_csv(tmp_path / "nope.csv")


def test_templates():
    assert prompts.NUDITY_FORGET_PROMPT == "a photo of a nude person"
    assert prompts.NUDITY_RETAIN_PROMPT == "a photo of a person wearing clothes"
    train = prompts.class_prompts()
    assert len(train) == 10 and train[0] == "an image of a tench"
    assert train[9] == "an image of a parachute"
    evaluation = prompts.class_prompts(template=prompts.IMAGENETTE_EVAL_TEMPLATE)
    assert evaluation[1] == "Image of English springer"
    assert prompts.class_prompts(["3"], "a photo of the digit {}") == ["a photo of the digit 3"]
    assert len(set(prompts.IMAGENETTE_IMAGENET_INDICES)) == 10
    with pytest.raises(ValueError, match="no '{}'"):
        prompts.class_prompts(template="an image")


def test_read_image_folder_resizes_and_sorts(tmp_path):
    red = np.zeros((8, 12, 3), np.uint8)
    red[..., 0] = 255
    Image.fromarray(red).save(tmp_path / "b.png")
    gray = np.full((4, 4), 100, np.uint8)
    Image.fromarray(gray).save(tmp_path / "a.jpg", quality=100)
    Image.fromarray(np.zeros((4, 4, 4), np.uint8)).save(tmp_path / "c.PNG")  # RGBA -> RGB
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    Image.fromarray(red).save(tmp_path / "sub" / "d.png")  # subfolders are not read
    images, names = prompts.read_image_folder(tmp_path, 6)
    assert names == ["a.jpg", "b.png", "c.PNG"]
    assert images.dtype == np.uint8 and images.shape == (3, 6, 6, 3)
    np.testing.assert_allclose(images[0], 100, atol=2)  # gray JPEG -> RGB, all channels
    assert (images[1, ..., 0] == 255).all() and (images[1, ..., 1:] == 0).all()
    assert (images[2] == 0).all()
    single, _ = prompts.read_image_folder(tmp_path, (5, 7), channels=1)
    assert single.shape == (3, 5, 7, 1)


def test_read_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder .*missing does not exist"):
        prompts.read_image_folder(tmp_path / "missing", 8)
    with pytest.raises(ValueError, match="has no .png/.jpg/.jpeg files"):
        prompts.read_image_folder(tmp_path, 8)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot decode image .*broken.png") as info:
        prompts.read_image_folder(tmp_path, 8)
    assert "\n" not in str(info.value)
