"""The CLIP vision tower against transformers' CLIPVisionModel, the safety checker against diffusers'
StableDiffusionSafetyChecker (same scores, same flags), loading its files, and its use by the pipeline and CLI.

A tiny vision config keeps this fast (width 64, 2 layers, 4 heads, 32-pixel patches on the real 224 input);
the code paths are the ViT-L/14 ones.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from reference_models import max_relative_error

from sd15.cli import main
from sd15.clip_vision import CLIPVisionConfig, CLIPVisionModel, clip_preprocess
from sd15.safety_checker import censor, find_safety_checker, load_safety_checker

TINY_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=224,
                   patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)  # fmt: skip
PROJECTION = 32


def hf_vision_config():
    from transformers import CLIPVisionConfig as HFConfig

    return HFConfig(**TINY_VISION, projection_dim=PROJECTION)


def random_images(n=4, h=96, w=128, seed=0):
    """(n, 3, h, w) in [-1, 1], smooth enough that CLIP's resize matters, each image different."""
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.rand(n, 3, h // 8, w // 8, generator=g) * 2 - 1, size=(h, w), mode="bilinear")


@pytest.fixture(scope="module")
def reference_checker():
    """diffusers' safety checker on seeded random weights, with concepts placed so that the flags are mixed:
    image 0 hits concept 2; image 1 hits special-care concept 0 and thereby (the +0.01 adjustment) concept 5,
    which it misses by less than 0.01 on its own; images 2 and 3 hit nothing. (Random towers map all images
    near one embedding, so the concepts point along each image's difference from the mean.)"""
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
        cosine_distance,
    )
    from transformers import CLIPConfig

    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(CLIPConfig(vision_config=hf_vision_config().to_dict(), projection_dim=PROJECTION)).eval()
    with torch.no_grad():
        for p in checker.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
        checker.concept_embeds_weights.fill_(0.9)
        checker.special_care_embeds_weights.fill_(0.9)
        e = checker.visual_projection(checker.vision_model(clip_preprocess(random_images()))[1])
        own = e - e.mean(dim=0)  # what sets each image apart
        checker.concept_embeds[2] = own[0]
        checker.special_care_embeds[0] = own[1]
        checker.concept_embeds[5] = own[1] + 0.5 * own[2]
        for embeds, weights, k, i in ((checker.concept_embeds, checker.concept_embeds_weights, 2, 0),
                                      (checker.special_care_embeds, checker.special_care_embeds_weights, 0, 1)):  # fmt: skip
            cos = cosine_distance(e, embeds[k : k + 1])[:, 0]
            weights[k] = (cos[i] + torch.cat([cos[:i], cos[i + 1 :]]).max()) / 2  # image i alone above
        cos = cosine_distance(e, checker.concept_embeds[5:6])[:, 0]
        checker.concept_embeds_weights[5] = cos[1] + 0.006  # -0.006 alone, +0.004 with the adjustment
        assert (cos[[0, 2, 3]] < cos[1] - 0.02).all()
    return checker


@pytest.fixture(scope="module")
def checker_folder(reference_checker, tmp_path_factory):
    folder = tmp_path_factory.mktemp("safety_checker")
    reference_checker.save_pretrained(folder)
    return folder


def test_vision_tower_matches_transformers():
    from transformers import CLIPVisionModel as HFVision

    torch.manual_seed(1)
    theirs = HFVision(hf_vision_config()).eval()
    state = theirs.state_dict()
    ours = CLIPVisionModel(CLIPVisionConfig.from_state_dict(state, num_attention_heads=4)).eval()
    ours.load_state_dict(state, strict=True)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        hidden, pooled = ours(pixels)
        ref = theirs(pixel_values=pixels)
    assert hidden.shape == (2, 50, 64)
    assert max_relative_error(hidden, ref.last_hidden_state) < 1e-5
    assert max_relative_error(pooled, ref.pooler_output) < 1e-5


def test_preprocessing_matches_clip_image_processor():
    import warnings

    from transformers import CLIPImageProcessor

    images = random_images(2, 200, 300, seed=3)
    pil = [Image.fromarray(((x.permute(1, 2, 0) / 2 + 0.5).clamp(0, 1) * 255).round().byte().numpy()) for x in images]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = CLIPImageProcessor()(pil, return_tensors="pt").pixel_values
    ours = clip_preprocess(images)
    assert ours.shape == ref.shape == (2, 3, 224, 224)
    assert (ours - ref).abs().max() < 1e-5


def test_scores_and_flags_match_diffusers(reference_checker, checker_folder):
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    ours = load_safety_checker(checker_folder)
    images = random_images()
    pixels = clip_preprocess(images)
    concept, special = ours.scores(pixels)
    with torch.no_grad():
        e = reference_checker.visual_projection(reference_checker.vision_model(pixels)[1])
        ref_concept = cosine_distance(e, reference_checker.concept_embeds) - reference_checker.concept_embeds_weights
        ref_special = cosine_distance(e, reference_checker.special_care_embeds) - reference_checker.special_care_embeds_weights
        _, ref_flags = reference_checker(clip_input=pixels, images=images.clone())
    adjustment = torch.tensor([0.0, 0.01, 0.0, 0.0])[:, None]  # image 1 alone has a special-care hit
    assert ((ref_special * 1000).round() > 0).any(dim=1).tolist() == [False, True, False, False]
    assert (concept - ref_concept - adjustment).abs().max() < 1e-5
    assert (special[:, :1] - ref_special[:, :1]).abs().max() < 1e-5  # later ones carry image 1's adjustment
    assert (special[:, 1:] - ref_special[:, 1:] - adjustment).abs().max() < 1e-5
    flags = ours(images)
    assert flags.tolist() == ref_flags == [True, True, False, False]


def test_older_nested_keys_and_single_file_load(reference_checker, tmp_path):
    from safetensors.torch import save_file

    state = {("vision_model." + k if k.startswith("vision_model.") else k): v.contiguous()
             for k, v in reference_checker.state_dict().items()}  # fmt: skip
    state["vision_model.vision_model.embeddings.position_ids"] = torch.arange(50)[None]
    save_file(state, str(tmp_path / "checker.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {"num_attention_heads": 4}}))
    checker = load_safety_checker(tmp_path / "checker.safetensors")
    assert checker(random_images()).tolist() == [True, True, False, False]
    del state["concept_embeds"]
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match="concept_embeds"):
        load_safety_checker(tmp_path / "broken.safetensors")


def test_censor_blanks_flagged_images_only(checker_folder):
    checker = load_safety_checker(checker_folder)
    images = random_images()
    out, flags = censor(checker, images)
    assert flags == [True, True, False, False]
    assert torch.all(out[:2] == -1) and torch.equal(out[2:], images[2:])
    assert censor(None, images) == (images, None)


def test_pipeline_blanks_flagged_images(tiny_model, checker_folder):
    checker = load_safety_checker(checker_folder)
    checker.concept_embeds_weights.fill_(-2.0)  # every image is flagged
    tiny_model.safety_checker = checker
    try:
        images = tiny_model.generate("a cat", steps=1, seed=0, width=64, height=64, num_images=2)
        arrays = tiny_model.generate("a cat", steps=1, seed=0, width=64, height=64, output_type="np")
    finally:
        tiny_model.safety_checker = None
    assert [im.info["nsfw"] for im in images] == [True, True]
    assert all(np.asarray(im).max() == 0 for im in images)
    assert arrays.max() == 0
    clean = tiny_model.generate("a cat", steps=1, seed=0, width=64, height=64)[0]
    assert "nsfw" not in clean.info and np.asarray(clean).max() > 0


def test_where_the_command_line_finds_the_weights(checker_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SD15_SAFETY_CHECKER", raising=False)
    assert find_safety_checker() is None
    monkeypatch.setenv("SD15_SAFETY_CHECKER", str(checker_folder))
    assert find_safety_checker() == checker_folder
    monkeypatch.delenv("SD15_SAFETY_CHECKER")
    (tmp_path / "weights" / "safety_checker").mkdir(parents=True)
    assert find_safety_checker() is None  # an empty folder is not weights
    (tmp_path / "weights" / "safety_checker" / "model.safetensors").write_bytes((checker_folder / "model.safetensors").read_bytes())
    assert str(find_safety_checker()) == "weights/safety_checker"
    with pytest.raises(ValueError, match="no safety checker weights"):
        find_safety_checker("missing")




def cli(args, checkpoint):
    return main([*args, "--steps", "1", "--width", "64", "--height", "64", "--model", str(checkpoint), "--no-progress"])


def test_cli_reports_a_missing_checker_and_turning_it_off(workdir, tiny_checkpoint, capsys):
    assert cli(["generate", "a cat", "-o", "a.png"], tiny_checkpoint) == 0
    assert "no safety checker weights found" in capsys.readouterr().err
    assert cli(["generate", "a cat", "-o", "b.png", "--no-safety-checker"], tiny_checkpoint) == 0
    assert "safety checker is off (--no-safety-checker)" in capsys.readouterr().err


def test_cli_replaces_a_flagged_image_and_says_so(workdir, tiny_checkpoint, checker_folder, capsys, tmp_path):
    import shutil

    strict = tmp_path / "strict_checker"
    lenient = workdir / "weights" / "safety_checker"
    from safetensors.torch import load_file, save_file

    for folder, threshold in ((strict, -2.0), (lenient, 2.0)):  # cosines lie in [-1, 1]: all flagged, none flagged
        shutil.copytree(checker_folder, folder)
        state = load_file(str(folder / "model.safetensors"))
        state["concept_embeds_weights"] = torch.full_like(state["concept_embeds_weights"], threshold)
        save_file(state, str(folder / "model.safetensors"))
    assert cli(["generate", "a cat", "-o", "c.png", "--safety-checker", str(strict)], tiny_checkpoint) == 0
    err = capsys.readouterr()
    assert "c.png was flagged by the safety checker and replaced by a black image" in err.err
    assert np.asarray(Image.open(workdir / "c.png")).max() == 0
    # found in weights/safety_checker/ without a flag; a checker that flags nothing says nothing
    assert cli(["generate", "a cat", "-o", "d.png"], tiny_checkpoint) == 0
    err = capsys.readouterr().err
    assert "flagged" not in err and "no safety checker" not in err
    assert np.asarray(Image.open(workdir / "d.png")).max() > 0
