"""Any image in, the same kind of image out (dod.images); the prompt-embeddings file."""

import numpy as np
import pytest

from dod_jax.restore.images import restore_image
from dod_jax.methods.dod.prompts import load_prompt_embeddings, save_prompt_embeddings
from dod_jax.weights.diffusers import WeightsError


def identity_model(seen):
    def restore(x):
        assert x.ndim == 4 and x.shape[0] == 1 and x.shape[-1] == 3 and x.shape[1] % 8 == 0 and x.shape[2] % 8 == 0
        assert -1.0 <= x.min() and x.max() <= 1.0
        seen.append(x.shape)
        return x
    return restore


def photo(shape, dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    if dtype == np.uint8:
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if dtype == np.uint16:
        return rng.integers(0, 65536, shape, dtype=np.uint16)
    return rng.uniform(0, 1, shape).astype(dtype)


@pytest.mark.parametrize("shape,dtype", [((250, 333, 3), np.uint8), ((250, 333), np.uint8), ((250, 333, 1), np.uint16),
                                         ((250, 333, 4), np.uint8), ((257, 300, 3), np.float32)])
def test_odd_sizes_and_layouts_come_back_as_they_went_in(shape, dtype):
    # With no lifting, padding and cropping around an identity model must give the input back.
    seen = []
    image = photo(shape, dtype)
    out = restore_image(identity_model(seen), image, min_side=0)
    assert out.shape == image.shape and out.dtype == image.dtype
    assert seen == [(1, -(-shape[0] // 8) * 8, -(-shape[1] // 8) * 8, 3)]
    if np.issubdtype(dtype, np.floating):
        np.testing.assert_allclose(out, image, atol=1e-6)
    else:
        np.testing.assert_array_equal(out, image)


def test_rgba_keeps_its_alpha_and_grey_is_restored_as_equal_channels():
    rgba = photo((40, 48, 4))
    out = restore_image(lambda x: -x, rgba, min_side=0)  # a model that inverts colours
    np.testing.assert_array_equal(out[..., 3], rgba[..., 3])
    np.testing.assert_array_equal(out[..., :3], 255 - rgba[..., :3])
    grey = photo((40, 48))
    np.testing.assert_array_equal(restore_image(lambda x: -x, grey, min_side=0), 255 - grey)


def test_short_sides_are_lifted_then_brought_back():
    seen = []
    smooth = (np.linspace(0, 1, 60)[:, None, None] * np.linspace(0.2, 1, 90)[None, :, None] * np.ones(3)).astype(np.float32)
    out = restore_image(identity_model(seen), smooth, min_side=256)
    assert seen == [(1, 256, 384, 3)] and out.shape == smooth.shape
    assert np.abs(out - smooth).max() < 0.02  # bicubic up and antialiased down on a smooth ramp


def test_bad_images_are_refused_clearly():
    with pytest.raises(ValueError, match="got shape"):
        restore_image(lambda x: x, np.zeros((8, 8, 2), np.uint8))
    with pytest.raises(ValueError, match="got int32"):
        restore_image(lambda x: x, np.zeros((8, 8, 3), np.int32))
    with pytest.raises(ValueError, match="smaller than 8 pixels"):
        restore_image(lambda x: x, np.zeros((5, 30, 3), np.uint8), min_side=0)


def test_prompt_embeddings_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    prompt, negative = rng.standard_normal((77, 64)).astype(np.float32), rng.standard_normal((77, 64)).astype(np.float32)
    path = save_prompt_embeddings(tmp_path / "p.safetensors", prompt, negative, ("a photo", "blurry"))
    loaded = load_prompt_embeddings(path, expected_dim=64)
    np.testing.assert_array_equal(loaded["prompt"], prompt)
    np.testing.assert_array_equal(loaded["negative_prompt"], negative)
    with pytest.raises(WeightsError, match=r"p.safetensors: prompt has shape \(77, 64\), expected \(tokens, 1024\)"):
        load_prompt_embeddings(path, expected_dim=1024)
    with pytest.raises(WeightsError, match="no such prompt-embeddings file"):
        load_prompt_embeddings(tmp_path / "absent.safetensors")
    # The negative prompt is optional (restoring needs the prompt alone); the prompt is not.
    save_prompt_embeddings(tmp_path / "prompt_only.safetensors", prompt, None)
    assert set(load_prompt_embeddings(tmp_path / "prompt_only.safetensors")) == {"prompt"}
    from safetensors.numpy import save_file
    save_file({"negative_prompt": negative}, str(tmp_path / "half.safetensors"))
    with pytest.raises(WeightsError, match="half.safetensors: lacks prompt"):
        load_prompt_embeddings(tmp_path / "half.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="junk.safetensors: not a readable"):
        load_prompt_embeddings(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="\\(tokens, dim\\) arrays of one shape"):
        save_prompt_embeddings(tmp_path / "bad.safetensors", prompt, negative[:10])


def test_prompt_cli_encodes_with_the_pipelines_text_encoder(tmp_path, capsys):
    import json

    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dod_jax.methods.dod.prompts import main

    # A tiny random CLIP text tower and a character-level tokenizer in a pipeline's layout.
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(list(letters) + [c + "</w>" for c in letters])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(tmp_path / "sd" / "tokenizer")
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                           bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"]))
    encoder.save_pretrained(tmp_path / "sd" / "text_encoder")

    main(["--pipeline", str(tmp_path / "sd"), "--out", str(tmp_path / "p.safetensors"),
          "--prompt", "a clean photo", "--negative-prompt", "blurry"])
    assert "shape (77, 32)" in capsys.readouterr().out
    loaded = load_prompt_embeddings(tmp_path / "p.safetensors", expected_dim=32)
    ids = tokenizer(["a clean photo"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = encoder.eval()(ids).last_hidden_state[0].numpy()
    np.testing.assert_allclose(loaded["prompt"], expected, atol=1e-6)
    assert np.abs(loaded["prompt"] - loaded["negative_prompt"]).max() > 1e-3

    with pytest.raises(WeightsError, match="no text_encoder/ folder"):
        main(["--pipeline", str(tmp_path), "--out", str(tmp_path / "q.safetensors")])
