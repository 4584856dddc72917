"""Long prompts and A1111 emphasis (ldm.pipelines.prompts, Pipeline.encode_prompt): the parser against A1111's
documented syntax, the 77-token windows, the unchanged short-prompt path, and the effect on images."""
import warnings

import pytest
import torch

from ldm.models.tokenizer import build_clip_tokenizer
from ldm.pipelines.prompts import parse_prompt_attention, tokenize_prompts

R, S = 1.1, 1 / 1.1  # (word) and [word]

# Expected fragments written from A1111's wiki ("Features: Attention/emphasis") and its parser's doc examples.
PARSE_TABLE = [
    ("a red circle", [("a red circle", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", R), (" word", 1.0)]),
    ("((red)) circle", [("red", R * R), (" circle", 1.0)]),
    ("a [blue] square", [("a ", 1.0), ("blue", S), (" square", 1.0)]),
    ("(red:1.3) circle", [("red", 1.3), (" circle", 1.0)]),
    ("((red:0.5)) x", [("red", 0.5 * R), (" x", 1.0)]),
    ("(red : 1.5 )", [("red ", 1.5)]),  # spaces around the number are allowed
    ("(a:1.)", [("a", 1.0)]),
    ("(a:.5) b", [("a", 0.5), (" b", 1.0)]),
    ("(a:-1) b", [("a", -1.0), (" b", 1.0)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("\\\\ and \\[x\\)", [("\\ and [x)", 1.0)]),
    ("(unbalanced", [("unbalanced", R)]),
    ("[open (both", [("open ", S), ("both", S * R)]),
    ("a) b]", [("a) b]", 1.0)]),  # a closing bracket with nothing open is text
    ("(unnecessary)(parens)", [("unnecessaryparens", R)]),  # adjacent equal weights merge
    ("(a)[b]", [("a", R), ("b", S)]),
    ("a: b", [("a: b", 1.0)]),  # a colon outside "(x:number)" is text
    ("a (b:1.2", [("a ", 1.0), ("b:1.2", R)]),  # unclosed: ":1.2" is text, and "(" weighs it 1.1
    ("", [("", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAKFAST", [("BREAKFAST", 1.0)]),  # BREAK is a keyword only as a word of its own
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.3 * R * R), (" ", R), ("on", 1.0), (" a ", R), ("hill", 0.55), (", sun, ", R),
      ("sky", R ** 4), (".", R)]),
]


@pytest.mark.parametrize("prompt,expected", PARSE_TABLE)
def test_parse_prompt_attention_reads_a1111_syntax(prompt, expected):
    got = parse_prompt_attention(prompt)
    assert [text for text, _ in got] == [text for text, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_a_break_inside_brackets_still_breaks():
    assert parse_prompt_attention("(a BREAK b:2)") == [("a", 2.0), ("BREAK", -1.0), ("b", 2.0)]


def test_a_weight_that_is_not_a_number_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"':1\.2\.3\)' is not a weight.*prompt_syntax='plain'"):
        parse_prompt_attention("(a:1.2.3)")


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])  # SD 1.x pads with the end token, SD 2.x with "!" (id 0)
def test_short_plain_prompts_give_the_tokenizers_own_ids(pad):
    tokenizer = build_clip_tokenizer(pad_token=pad)
    texts = ["a red circle", "", "word " * 75, "a, b: c; the end."]  # "word " * 75: exactly 75 tokens, 77 in all
    tokens = tokenize_prompts(tokenizer, texts)
    expected = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert tokens.windows == 1 and torch.equal(tokens.ids, expected)
    assert torch.equal(tokens.weights, torch.ones(4, 1, 77))


def test_long_prompts_split_into_75_token_windows_wrapped_and_padded():
    tokenizer = build_clip_tokenizer(pad_token="!")
    tokens = tokenize_prompts(tokenizer, ["word " * 160, "short"])
    assert tokens.windows == 3 and tokens.ids.shape == (6, 77)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    word = tokenizer("word", add_special_tokens=False).input_ids[0]
    windows = tokens.ids.reshape(2, 3, 77)
    assert (windows[0, :, 0] == bos).all() and (windows[0, :2, 1:76] == word).all() and (windows[0, :2, 76] == eos).all()
    assert windows[0, 2, 1:11].tolist() == [word] * 10 and windows[0, 2, 11] == eos and (windows[0, 2, 12:] == 0).all()
    empty = tokenizer("", padding="max_length", max_length=77).input_ids
    assert windows[1, 1].tolist() == empty and windows[1, 2].tolist() == empty  # the short prompt padded with ""


def test_a_full_window_ends_after_a_comma_within_its_last_20_tokens():
    tokenizer = build_clip_tokenizer()
    tokens = tokenize_prompts(tokenizer, ["a " * 60 + ", " + "b " * 30])  # the comma is token 61
    windows = tokens.ids.reshape(2, 77)
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    assert windows[0, 61] == comma and windows[0, 62] == tokenizer.eos_token_id  # window 1: 60 a's and the comma
    assert windows[1, 1:31].tolist() == tokenizer("b " * 30, add_special_tokens=False).input_ids
    far = tokenize_prompts(tokenizer, ["a " * 30 + ", " + "b " * 60]).ids.reshape(2, 77)  # comma 45 tokens back
    assert far[0, 76] == tokenizer.eos_token_id and far[0, 75] == far[0, 74]  # cut at 75, no backtrack


def test_break_starts_a_new_window():
    tokenizer = build_clip_tokenizer()
    tokens = tokenize_prompts(tokenizer, ["a red circle BREAK a blue square"])
    expected = tokenizer(["a red circle", "a blue square"], padding="max_length", max_length=77).input_ids
    assert tokens.ids.tolist() == expected
    plain = tokenize_prompts(tokenizer, ["a red circle BREAK a blue square"], prompt_syntax="plain")
    assert plain.windows == 1 and plain.ids[0, 4] == tokenizer.convert_tokens_to_ids("break</w>")


def _reference_embeddings(pipe, texts, clip_skip=None):
    """The encoding before long prompts: one tokenizer call truncating at 77, one text encoder call."""
    ids = pipe.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    if clip_skip is None:
        return pipe.text_encoder(ids)[0]
    hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
    return pipe.text_encoder.final_layer_norm(hidden)


@pytest.mark.parametrize("clip_skip,pad", [(None, "<|endoftext|>"), (1, "<|endoftext|>"), (None, "!")])
def test_prompts_of_at_most_75_tokens_encode_bit_for_bit_as_before(tiny_pipe, clip_skip, pad):
    tiny_pipe.tokenizer = build_clip_tokenizer(pad_token=pad)  # SD 1.x's padding, or SD 2.x's "!"
    prompts, negatives = ["a red circle", "word " * 75], ["blue", ""]  # the second: 77 tokens with start and end
    cond, uncond = tiny_pipe.encode_prompt(prompts, negatives, 2, True, clip_skip=clip_skip)
    reference = _reference_embeddings(tiny_pipe, negatives + prompts, clip_skip)  # (4, 77, D), one batched call
    assert cond.shape == uncond.shape == (4, 77, reference.shape[-1])
    assert torch.equal(uncond, reference[:2].repeat_interleave(2, 0))
    assert torch.equal(cond, reference[2:].repeat_interleave(2, 0))


def test_weight_one_is_the_plain_prompt_and_emphasis_scales_its_tokens_with_the_mean_restored(tiny_pipe):
    # The tiny model's final layer norm is untrained (bias 0), so its states' mean is rounding noise and A1111's
    # mean restoration (original_mean / new_mean) would divide noise by noise: a trained model's bias is not 0
    final_norm = getattr(tiny_pipe.text_encoder, "text_model", tiny_pipe.text_encoder).final_layer_norm
    with torch.no_grad():
        final_norm.bias.normal_(0.5, 0.1, generator=torch.Generator().manual_seed(0))
    encode = lambda text: tiny_pipe.encode_prompt([text], None, 1, False)[0][0]  # noqa: E731  (77, D)
    plain = encode("a red circle")
    assert torch.equal(encode("a (red:1) circle"), plain)
    emphasised = encode("a (red:1.5) circle")  # tokens: start, a, red, circle, end, pad...
    ratio = emphasised / plain
    scale = ratio[0].mean()  # A1111's mean restoration: every token's state times original_mean / new_mean
    assert torch.allclose(ratio[[0, 1, 3, 4, 40]], scale.expand(5, plain.shape[1]), rtol=1e-4)
    assert torch.allclose(ratio[2], 1.5 * scale.expand(plain.shape[1]), rtol=1e-4)
    assert torch.allclose(emphasised.mean(), plain.mean(), rtol=1e-5)
    assert not torch.allclose(encode("a [red] circle")[2] / plain[2], scale * torch.ones(plain.shape[1]))


def test_a_long_negative_and_a_short_prompt_are_padded_to_the_same_windows(tiny_pipe):
    long_text = "a red circle, " * 40  # 160 tokens: three windows
    cond, uncond = tiny_pipe.encode_prompt(["a blue square"], [long_text], 1, True)
    assert cond.shape == uncond.shape == (1, 3 * 77, cond.shape[-1])
    empty = _reference_embeddings(tiny_pipe, [""])[0]
    assert torch.equal(cond[0, :77], _reference_embeddings(tiny_pipe, ["a blue square"])[0])
    assert torch.equal(cond[0, 77:154], empty) and torch.equal(cond[0, 154:], empty)
    cond, uncond = tiny_pipe.encode_prompt([long_text, "short"], None, 1, True)  # the empty prompt padded too
    assert uncond.shape == cond.shape == (2, 3 * 77, cond.shape[-1]) and torch.equal(uncond[0, 77:154], empty)


def _long_prompt(ending: str) -> str:
    return "a photo of " + "a small red circle and " * 28 + "and then " + ending + " at last"  # 150 tokens


def _images(pipe, prompt, **kwargs):
    return pipe(prompt, num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="pt",
                height=32, width=32, **kwargs).images


def test_the_last_words_of_a_150_token_prompt_change_the_image(tiny_pipe):
    assert len(tiny_pipe.tokenizer(_long_prompt("a green square"), add_special_tokens=False).input_ids) == 150
    cond, _ = tiny_pipe.encode_prompt([_long_prompt("a green square")], None, 1, False)
    assert cond.shape[1] == 2 * 77
    assert not torch.equal(_images(tiny_pipe, _long_prompt("a green square")),
                           _images(tiny_pipe, _long_prompt("a blue triangle")))


def test_truncated_the_last_words_change_nothing_and_a_warning_names_them(tiny_pipe):
    with pytest.warns(UserWarning, match=r"prompt cut at token 75 of 150.*a green square at last' are ignored"):
        cut = _images(tiny_pipe, _long_prompt("a green square"), long_prompts="truncate")
    with warnings.catch_warnings(record=True):
        other = _images(tiny_pipe, _long_prompt("a blue triangle"), long_prompts="truncate")
        truncated = tiny_pipe.encode_prompt([_long_prompt("a green square")], None, 1, False, long_prompts="truncate")
    assert torch.equal(cut, other)
    assert torch.equal(truncated[0], _reference_embeddings(tiny_pipe, [_long_prompt("a green square")]))  # as before


def test_given_long_prompt_embeddings_get_an_unconditional_branch_of_their_length(tiny_pipe):
    cond, uncond = tiny_pipe.encode_prompt([_long_prompt("a green square")], None, 1, True)
    given = _images(tiny_pipe, None, prompt_embeds=cond)
    assert torch.equal(given, _images(tiny_pipe, _long_prompt("a green square")))


def test_a_negative_prompt_text_is_used_with_given_prompt_embeddings(tiny_pipe):
    cond, _ = tiny_pipe.encode_prompt([_long_prompt("a green square")], None, 1, True)
    given = _images(tiny_pipe, None, prompt_embeds=cond, negative_prompt="a blue triangle")
    assert torch.equal(given, _images(tiny_pipe, _long_prompt("a green square"), negative_prompt="a blue triangle"))
    assert not torch.equal(given, _images(tiny_pipe, None, prompt_embeds=cond))
    short, _ = tiny_pipe.encode_prompt(["a red circle"], None, 1, True)
    with pytest.raises(ValueError, match="negative_prompt encodes to 154 tokens, more than the 77"):
        _images(tiny_pipe, None, prompt_embeds=short, negative_prompt=_long_prompt("a blue triangle"))


def test_bad_prompt_options_name_the_allowed_values(tiny_pipe):
    with pytest.raises(ValueError, match=r"prompt_syntax='sd'.*'a1111', 'plain'"):
        tiny_pipe("a red circle", num_inference_steps=1, prompt_syntax="sd")
    with pytest.raises(ValueError, match=r"long_prompts='cut'.*'chunk', 'truncate'"):
        tiny_pipe.encode_prompt(["a red circle"], None, 1, False, long_prompts="cut")


@pytest.mark.parametrize("preset", ["dit-tiny", pytest.param("pixart-small", marks=pytest.mark.slow)])  # LatentDiT, PixArt
def test_the_last_words_of_a_long_prompt_condition_a_transformer(preset):
    from ldm import Pipeline
    from ldm.models.presets import build_components

    pipe = Pipeline(**build_components(preset, seed=0))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():  # DiT starts with a zero output (adaLN-Zero, zero output layer): give it random weights
        for p in pipe.transformer.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    assert pipe.encode_prompt([_long_prompt("a green square")], None, 1, False)[0].shape[1] == 2 * 77
    assert not torch.equal(_images(pipe, _long_prompt("a green square")),
                           _images(pipe, _long_prompt("a blue triangle")))


def test_the_built_in_evaluation_prompts_parse_as_their_plain_text():
    from ldm.evaluation.guidance_sweep import load_prompts

    prompts = load_prompts("shapes") + load_prompts("digits")
    assert [parse_prompt_attention(p) for p in prompts] == [[(p, 1.0)] for p in prompts]


def test_generate_request_passes_the_prompt_options_and_checks_them(tiny_folder, tmp_path):
    from ldm.images import read_png_params
    from ldm.pipelines.generate import GenerateRequest, generate, prepare

    with pytest.raises(ValueError, match=r"prompt_syntax \(--prompt-syntax\): 'sd' is not one of a1111, plain"):
        generate(GenerateRequest("a red circle", tiny_folder, prompt_syntax="sd"))
    with pytest.raises(ValueError, match=r"':1\.2\.3\)' is not a weight"):
        prepare(GenerateRequest("a red circle", "/no/such/model", negative_prompt="(blue:1.2.3)"))  # before loading
    request = GenerateRequest(_long_prompt("a green square"), tiny_folder, steps=1, seed=0, long_prompts="truncate",
                              height=32, width=32,
                              out=str(tmp_path / "a.png"), device="cpu")
    with pytest.warns(UserWarning, match="a green square at last' are ignored"):
        result = generate(request)
    recorded = read_png_params(result.images[0].path)  # what is not the default, as for the guidance methods
    assert recorded["long_prompts"] == "truncate" and "prompt_syntax" not in recorded
