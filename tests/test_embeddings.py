"""Textual inversion (sd15.embeddings): the web UI's and diffusers' file formats, trigger words mapped to new
token ids whose vectors come from the file, several embeddings at once, undoing them, refusing what does not
fit, and the same conditioning as diffusers' `load_textual_inversion` on the same files."""

import hashlib

import pytest
import torch
from safetensors.torch import save_file

import sd15
from sd15 import prompts as P
from sd15.checkpoint import CheckpointError
from sd15.pnginfo import format_parameters, parse_parameters

D = 48  # the tiny text encoder's width
VOCAB = 49408


@pytest.fixture(scope="module")
def m(tiny_checkpoint):
    return sd15.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One file of each format, with seeded vectors."""
    folder = tmp_path_factory.mktemp("embeddings")
    g = torch.Generator().manual_seed(0)
    vec = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    webui_pt = {  # what the web UI's textual-inversion training writes
        "string_to_token": {"*": 265},
        "string_to_param": {"*": torch.nn.Parameter(vec(3, D))},
        "name": "internal-name",
        "step": 1500,
        "sd_checkpoint": "0123456789",
        "sd_checkpoint_name": "v1-5-pruned-emaonly",
    }
    torch.save(webui_pt, folder / "mystyle.pt")
    save_file({"emb_params": vec(2, D)}, str(folder / "badhands.safetensors"))
    torch.save({"<cat-toy>": vec(D)}, folder / "learned_embeds.bin")
    save_file({"<dog-toy>": vec(D)}, str(folder / "learned_embeds.safetensors"))
    save_file({"emb_params": vec(4, 1024)}, str(folder / "sd2style.safetensors"))
    return folder


def test_each_format_is_read_with_its_trigger_word(files):
    from sd15.embeddings import read_embedding

    pt = read_embedding(files / "mystyle.pt")
    assert (pt.name, pt.vectors.shape) == ("mystyle", (3, D))  # the file's name, as the web UI uses
    assert torch.equal(pt.vectors, torch.load(files / "mystyle.pt", weights_only=True)["string_to_param"]["*"].detach())
    assert read_embedding(files / "badhands.safetensors").vectors.shape == (2, D)
    diffusers_bin = read_embedding(files / "learned_embeds.bin")
    assert (diffusers_bin.name, diffusers_bin.vectors.shape) == ("<cat-toy>", (1, D))  # diffusers' token
    assert read_embedding(files / "learned_embeds.safetensors").name == "<dog-toy>"
    assert read_embedding(files / "mystyle.pt", name="other").name == "other"
    assert pt.hash == hashlib.sha256((files / "mystyle.pt").read_bytes()).hexdigest()[:12]


def test_trigger_words_map_to_new_ids_whose_vectors_come_from_the_files(m, files):
    table = m.text_encoder.embeddings.token_embedding.weight.clone()
    style = m.load_embedding(files / "mystyle.pt")
    toy = m.load_embedding(files / "learned_embeds.bin")
    try:
        chunk = P.tokenize_prompt(m.tokenizer, "<cat-toy> in mystyle, detailed", m.embeddings, VOCAB).chunks[0]
        words = m.tokenizer.tokenize("in")
        assert chunk.ids[:7] == [49406, VOCAB + 3, *words, VOCAB + 0, VOCAB + 1, VOCAB + 2, m.tokenizer.tokenize(",")[0]]
        ids = torch.tensor([chunk.ids])
        with torch.no_grad():
            x = m.text_encoder.embeddings(ids, m.embeddings.vectors)  # (1, 77, D): token + position embeddings
        positions = m.text_encoder.embeddings.position_embedding.weight
        assert torch.allclose(x[0, 1], toy.vectors[0] + positions[1])
        assert torch.allclose(x[0, 3:6], style.vectors + positions[3:6])
        assert P.tokenize_prompt(m.tokenizer, "mystyle", m.embeddings, VOCAB).embeddings == ["mystyle"]
    finally:
        m.embeddings.clear()
    assert torch.equal(m.text_encoder.embeddings.token_embedding.weight, table)  # the model's table never changes
    with torch.no_grad():
        assert torch.equal(P.encode_prompts(m, ["a cat"]), m.text_encoder(m.tokenizer(["a cat"])))


def test_an_embedding_never_straddles_two_chunks(m, files):
    m.load_embedding(files / "mystyle.pt")  # 3 vectors
    try:
        chunks = P.tokenize_prompt(m.tokenizer, " ".join(["cat"] * 73) + " mystyle", m.embeddings, VOCAB).chunks
    finally:
        m.embeddings.clear()
    assert len(chunks) == 2
    assert chunks[0].ids[74:] == [49407] * 3  # 73 words, then padding rather than a split embedding
    assert chunks[1].ids[1:4] == [VOCAB, VOCAB + 1, VOCAB + 2]


def test_the_original_textual_inversion_format_is_read(tmp_path):
    """rinongal/textual_inversion saved string_to_param as an nn.ParameterDict; the web UI reads those files,
    sd15 refused them as unsafe."""
    from sd15.embeddings import read_embedding

    vectors = torch.randn(2, D)
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors.clone())})
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params}, tmp_path / "paper.pt")
    embedding = read_embedding(tmp_path / "paper.pt")
    assert embedding.name == "paper" and torch.equal(embedding.vectors, vectors)


def test_wrong_width_and_unsafe_pickles_are_refused(m, files, tmp_path):
    with pytest.raises(CheckpointError, match=r"width 1024 \(a Stable Diffusion 2\.x embedding.*width 48"):
        m.load_embedding(files / "sd2style.safetensors")
    assert len(m.embeddings) == 0

    class Payload:
        def __reduce__(self):
            return (print, ("this must not run",))

    torch.save({"string_to_param": {"*": torch.zeros(1, D)}, "evil": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="Refused"):
        m.load_embedding(tmp_path / "evil.pt")
    save_file({"a": torch.zeros(2, D), "b": torch.zeros(2, D)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(CheckpointError, match="not a textual-inversion embedding"):
        m.load_embedding(tmp_path / "two.safetensors")


def test_damaged_and_odd_files_are_refused_in_one_line(m, tmp_path):
    """Each used to escape as a traceback (RuntimeError, KeyError, NotImplementedError), which also ended a
    folder load; or, for a `.SAFETENSORS` suffix, was read as a pickle and refused as unsafe."""
    from sd15.embeddings import read_embedding

    torch.save({"<x>": torch.zeros(0)}, tmp_path / "empty_vector.bin")
    torch.save({"emb_params": torch.zeros(0, D)}, tmp_path / "no_rows.pt")
    torch.save({"string_to_param": {"*": torch.zeros(2, D).to_sparse()}}, tmp_path / "sparse.pt")
    torch.save({"<x>": torch.zeros(1, D, device="meta")}, tmp_path / "meta.bin")
    (tmp_path / "text.pt").write_text("not a pickle at all")  # torch.load: KeyError
    (tmp_path / "cut.pt").write_bytes(b"\x80\x02garbage")  # torch.load: UnpicklingError, not a refused global
    reasons = {"empty_vector.bin": "holds no numbers", "no_rows.pt": "holds no numbers", "sparse.pt": "not a vector",
               "meta.bin": "not a vector", "text.pt": "not a readable embedding", "cut.pt": "not a readable embedding"}  # fmt: skip
    for name, reason in reasons.items():
        with pytest.raises(CheckpointError, match=reason) as error:
            read_embedding(tmp_path / name)
        assert "\n" not in str(error.value)
    save_file({"emb_params": torch.ones(2, D)}, str(tmp_path / "Upper.SAFETENSORS"))
    assert read_embedding(tmp_path / "Upper.SAFETENSORS").vectors.shape == (2, D)
    try:
        skipped = m.load_embeddings_folder(tmp_path)
        assert [e.name for e in m.embeddings] == ["Upper"] and len(skipped) == len(reasons)
    finally:
        m.embeddings.clear()


def test_a_trigger_word_of_the_same_tokens_as_another_is_refused(m, tmp_path):
    """"MyStyle" and "mystyle" tokenize alike: the second would never be matched, silently."""
    save_file({"emb_params": torch.ones(2, D)}, str(tmp_path / "MyStyle.safetensors"))
    save_file({"emb_params": torch.zeros(2, D)}, str(tmp_path / "mystyle.safetensors"))
    try:
        skipped = m.load_embeddings_folder(tmp_path)
        assert [e.name for e in m.embeddings] == ["MyStyle"]
        assert len(skipped) == 1 and "same tokens as 'MyStyle'" in skipped[0]
        m.load_embedding(tmp_path / "mystyle.safetensors", name="MyStyle")  # the same name replaces, as documented
        assert torch.equal(m.embeddings["MyStyle"].vectors, torch.zeros(2, D))
    finally:
        m.embeddings.clear()


def test_folder_loading_skips_what_does_not_fit(m, files):
    from sd15.embeddings import read_embedding

    try:
        skipped = m.load_embeddings_folder(files)  # named by file, as the web UI names them, not by a diffusers token
        assert sorted(e.name for e in m.embeddings) == ["badhands", "learned_embeds", "mystyle"]
        assert torch.equal(m.embeddings["learned_embeds"].vectors, read_embedding(files / "learned_embeds.bin").vectors)
        assert len(skipped) == 2 and "learned_embeds.safetensors: " in skipped[0] and "already gives the trigger word" in skipped[0]
        assert "sd2style" in skipped[1] and "1024" in skipped[1]
    finally:
        m.embeddings.clear()


def test_same_conditioning_as_diffusers_load_textual_inversion(m, files, tiny_state_dict, tmp_path):
    from reference_models import diffusers_pipeline

    reference = diffusers_pipeline(tiny_state_dict, m, tmp_path)
    reference.load_textual_inversion(str(files / "learned_embeds.bin"))  # token from the file: <cat-toy>
    reference.load_textual_inversion(str(files / "mystyle.pt"), token="mystyle")  # multi-vector, web UI format
    reference.load_textual_inversion(str(files / "badhands.safetensors"), token="badhands")
    for path in ("learned_embeds.bin", "mystyle.pt", "badhands.safetensors"):
        m.load_embedding(files / path)
    try:
        for prompt in ["a photo of <cat-toy> on a table", "mystyle painting of a house, badhands", "<cat-toy> in mystyle"]:
            with torch.no_grad():
                theirs = reference.encode_prompt(prompt, "cpu", 1, False)[0]
                ours = P.encode_prompts(m, [prompt])
                plain = P.encode_prompts(m, [prompt.replace("mystyle", "style").replace("<cat-toy>", "cat")])
            assert ours.shape == theirs.shape == (1, 77, D)
            assert (ours - theirs).abs().max() < 1e-5
            assert (ours - plain).abs().max() > 1e-2  # the embeddings do change the conditioning
    finally:
        m.embeddings.clear()


def test_generation_records_ti_hashes(m, files):
    m.load_embedding(files / "mystyle.pt")
    m.load_embedding(files / "badhands.safetensors")
    try:
        image = m.generate("a house in mystyle", negative_prompt="badhands", steps=1, seed=1, width=64, height=64)[0]
    finally:
        m.embeddings.clear()
    settings = image.info["sd15"]
    expected = {name: hashlib.sha256((files / f).read_bytes()).hexdigest()[:12]
                for name, f in (("mystyle", "mystyle.pt"), ("badhands", "badhands.safetensors"))}  # fmt: skip
    assert settings.ti_hashes == expected
    text = format_parameters(settings)
    assert f'TI hashes: "mystyle: {expected["mystyle"]}, badhands: {expected["badhands"]}"' in text
    assert parse_parameters(text)["ti_hashes"] == expected
