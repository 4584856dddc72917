"""Prompts as AUTOMATIC1111's web UI reads them: emphasis syntax, BREAK, and prompts of any length.

    parse_prompt_attention("a (red:1.4) circle")   # [("a ", 1.0), ("red", 1.4), (" circle", 1.0)]
    tokens = tokenize_prompts(tokenizer, ["a (red:1.4) circle"])        # ids (N*k, 77), weights (N, k, 77)
    embeds = tokens.weighted(text_encoder(tokens.ids)[0])               # (N, k*77, D)

Emphasis (A1111 wiki, "Features: Attention/emphasis"): `(text)` multiplies the attention to text by 1.1, `((text))`
by 1.21, `[text]` divides it by 1.1, `(text:1.3)` multiplies it by 1.3 (any number, nested brackets multiply);
`\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are the literal characters; an unclosed `(` or `[` applies to the rest of the
prompt, a `)` or `]` with nothing open is literal text; `BREAK` (upper case, a word of its own) starts a new chunk.

Long prompts: the text encoder sees 77 tokens, a start token, 75 of text and an end token. A longer prompt is cut
into windows of 75 tokens, each wrapped in start/end tokens and padded as the tokenizer pads (SD 1.x with the end
token, SD 2.x with "!", id 0: the tokenizer's own pad id), encoded separately, and the hidden states concatenated
along the sequence: (N, 77*k, D), which cross-attention takes at any length. Where a window is cut is A1111's
rule (its default "comma padding backtrack" of 20): when a window is full and a comma came within its last 20
tokens, the window ends after that comma and the tokens after it open the next one, so a comma-separated phrase
stays in one window. Prompts of one batch (the negative and empty unconditional prompts included) are padded to
the same number of windows with encodings of the empty prompt, as A1111 pads a short negative prompt.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch

PROMPT_SYNTAXES = ("a1111", "plain")   # "plain": the text as it is, brackets and all
LONG_PROMPTS = ("chunk", "truncate")   # "truncate": one 77-token window, with a warning naming what is cut
ROUND_MULTIPLIER, SQUARE_MULTIPLIER = 1.1, 1 / 1.1
WINDOW = 75                            # text tokens per window: 77 less the start and end tokens
COMMA_BACKTRACK = 20                   # A1111's default comma_padding_backtrack
BREAK_WEIGHT = -1.0                    # ("BREAK", -1.0) marks a forced window break in parsed fragments

# A1111's tokens of the emphasis syntax, in its order: escapes, a lone backslash (dropped), opening brackets,
# ":number)" closing a weighted group, closing brackets, plain text, and a ":" that closes nothing (literal).
_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|]|
[^\\()\[\]:]+|
:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def check_prompt_options(prompt_syntax: str, long_prompts: str) -> None:
    """Raises ValueError naming the allowed values when prompt_syntax or long_prompts is not one of them."""
    if prompt_syntax not in PROMPT_SYNTAXES:
        raise ValueError(f"prompt_syntax={prompt_syntax!r} is not one of {', '.join(map(repr, PROMPT_SYNTAXES))} "
                         "('a1111': (word:1.3) emphasis and BREAK; 'plain': the text taken literally)")
    if long_prompts not in LONG_PROMPTS:
        raise ValueError(f"long_prompts={long_prompts!r} is not one of {', '.join(map(repr, LONG_PROMPTS))} "
                         "('chunk': every token, in 75-token windows; 'truncate': the first 75 tokens, with a warning)")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Returns the prompt as (text, weight) fragments, in order, as A1111's parse_prompt_attention reads it; a
    BREAK is the fragment ("BREAK", BREAK_WEIGHT). Adjacent fragments of equal weight are merged; an empty prompt
    is [("", 1.0)].

    One deliberate difference: a BREAK inside brackets still breaks (A1111 multiplies its marker's weight with
    the brackets', after which it is read as the word "break" with a negative weight).
    """
    fragments: list[list] = []
    round_open, square_open = [], []  # indices into fragments where each open bracket starts

    def multiply_from(start: int, multiplier: float) -> None:
        for fragment in fragments[start:]:
            if not is_break(fragment):
                fragment[1] *= multiplier

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            fragments.append([token[1:], 1.0])
        elif token in "([":
            (round_open if token == "(" else square_open).append(len(fragments))
        elif weight is not None and round_open:
            multiply_from(round_open.pop(), _number(weight, text))
        elif token == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i > 0:
                    fragments.append(["BREAK", BREAK_WEIGHT])
                fragments.append([part, 1.0])
    for start in round_open:  # unclosed brackets weigh everything after them
        multiply_from(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply_from(start, SQUARE_MULTIPLIER)
    return _merge(fragments) or [("", 1.0)]


def is_break(fragment) -> bool:
    """Returns whether a parsed fragment is the BREAK marker."""
    return fragment[0] == "BREAK" and fragment[1] == BREAK_WEIGHT


def _number(weight: str, text: str) -> float:
    try:
        return float(weight)
    except ValueError:
        raise ValueError(f"prompt {text!r}: ':{weight})' is not a weight; write one number, e.g. (word:1.3), or "
                         "escape the bracket as \\) for literal text, or pass prompt_syntax='plain'") from None


def _merge(fragments: list[list]) -> list[tuple[str, float]]:
    """Returns the fragments with runs of equal weight joined into one (A1111 merges them the same way)."""
    merged: list[list] = []
    for text, weight in fragments:
        if merged and merged[-1][1] == weight and not is_break(merged[-1]) and not is_break((text, weight)):
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged]


@dataclass
class PromptTokens:
    """A batch of prompts as the text encoder's input: N prompts of k windows each (padded to the longest)."""
    ids: torch.Tensor      # (N*k, 77): window j of prompt i is row i*k + j, one batched encoder call for all
    weights: torch.Tensor  # (N, k, 77): each token's emphasis; 1 for the start, end and pad tokens

    @property
    def windows(self) -> int:
        """Returns k, the number of 77-token windows per prompt."""
        return self.weights.shape[1]

    def weighted(self, hidden: torch.Tensor) -> torch.Tensor:
        """Returns the encoder's hidden states (N*k, 77, D) as one sequence per prompt, (N, k*77, D), each token's
        state multiplied by its weight and each window rescaled so that its mean is what it was before weighting
        (A1111's normalisation: z *= weights; z *= original_mean / new_mean).

        A1111 takes the two means over the whole batch; here they are per prompt and window, so that an image does
        not depend on the other prompts of its batch (at batch size 1 the two agree). Windows without emphasis are
        returned as the encoder gave them, bit for bit. A window whose mean is ~0 keeps its weighted states unrescaled.
        """
        n, k, length = self.weights.shape
        z = hidden.reshape(n, k, length, hidden.shape[-1])  # (N, k, 77, D)
        emphasised = (self.weights != 1).any(dim=2)  # (N, k), read on the host: no device sync
        if bool(emphasised.any()):
            emphasised = emphasised.to(z.device)
            z32 = z.float()
            original_mean = z32.mean(dim=(2, 3), keepdim=True)  # (N, k, 1, 1)
            scaled = z32 * self.weights.to(z.device, torch.float32)[..., None]
            new_mean = scaled.mean(dim=(2, 3), keepdim=True)  # (N, k, 1, 1)
            # A mean of ~0 (a final layer norm without bias, as a freshly built encoder has) cannot be restored by
            # a ratio: it would turn the window into inf. Such windows keep their weighted states.
            restorable = new_mean.abs() > 1e-4 * z32.abs().mean(dim=(2, 3), keepdim=True)
            scaled = scaled * torch.where(restorable, original_mean / new_mean, torch.ones_like(new_mean))
            z = torch.where(emphasised[..., None, None], scaled.to(z.dtype), z)
        return z.reshape(n, k * length, z.shape[-1])  # (N, k*77, D)


def tokenize_prompts(tokenizer, texts: list[str], prompt_syntax: str = "a1111",
                     long_prompts: str = "chunk") -> PromptTokens:
    """Returns the prompts' token windows and weights (module docstring), every prompt padded with empty windows
    to the batch's most. A prompt of at most 75 tokens without emphasis gives exactly the ids of
    tokenizer(text, padding="max_length", truncation=True). long_prompts="truncate" keeps one window per prompt
    (the first 75 tokens, BREAKs ignored) and warns naming the words it cuts."""
    check_prompt_options(prompt_syntax, long_prompts)
    parsed = [parse_prompt_attention(t) if prompt_syntax == "a1111" else [(t, 1.0)] for t in texts]
    flat = [text for fragments in parsed for text, _ in fragments]
    token_lists = iter(tokenizer(flat, add_special_tokens=False, truncation=False, verbose=False).input_ids)
    size = tokenizer.model_max_length - 2  # 75 text tokens between the start and end tokens
    per_prompt = []
    for fragments in parsed:
        pieces = [(next(token_lists), weight, is_break((text, weight))) for text, weight in fragments]
        if long_prompts == "chunk":
            per_prompt.append(_windows(pieces, size, tokenizer.convert_tokens_to_ids(",</w>")))
        else:
            per_prompt.append([_truncated(tokenizer, pieces, size)])
    k = max(len(windows) for windows in per_prompt)
    rows = [window for windows in per_prompt for window in windows + [([], [])] * (k - len(windows))]
    start, end, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = [[start, *tokens, end] + [pad] * (size - len(tokens)) for tokens, _ in rows]
    weights = [[1.0, *w, 1.0] + [1.0] * (size - len(w)) for _, w in rows]
    return PromptTokens(torch.tensor(ids), torch.tensor(weights).reshape(len(texts), k, size + 2))


def _windows(pieces, size: int, comma: int) -> list[tuple[list[int], list[float]]]:
    """Returns the (tokens, weights) of each window of one prompt: at most `size` tokens each, cut at a BREAK,
    or when full, after the last comma if one came within COMMA_BACKTRACK tokens (A1111's rule)."""
    windows, tokens, weights, last_comma = [], [], [], -1

    def close():
        nonlocal tokens, weights, last_comma
        windows.append((tokens, weights))
        tokens, weights, last_comma = [], [], -1

    for piece_tokens, weight, breaks in pieces:
        if breaks:
            close()
            continue
        for token in piece_tokens:
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == size and last_comma != -1 and size - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                moved = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                close()
                tokens, weights = moved
            if len(tokens) == size:
                close()
            tokens.append(token)
            weights.append(weight)
    if tokens or not windows:
        close()
    return windows


def _truncated(tokenizer, pieces, size: int) -> tuple[list[int], list[float]]:
    """Returns the first `size` tokens of one prompt and their weights; warns naming the words after them."""
    tokens = [t for piece_tokens, _, breaks in pieces if not breaks for t in piece_tokens]
    weights = [w for piece_tokens, w, breaks in pieces if not breaks for _ in piece_tokens]
    if len(tokens) > size:
        cut = tokenizer.decode(tokens[size:], clean_up_tokenization_spaces=True)
        warnings.warn(f"prompt cut at token {size} of {len(tokens)} (the text encoder reads {size + 2} tokens, its "
                      f"start and end tokens included): {cut!r} are ignored; pass long_prompts='chunk' "
                      "(--long-prompts chunk) to encode every token", stacklevel=2)
    return tokens[:size], weights[:size]


def repeat_windows(empty: torch.Tensor, length: int) -> torch.Tensor:
    """Returns the empty prompt's embeddings (B, 77, D) repeated along the sequence to `length` tokens when
    `length` is a whole number of windows: the unconditional branch of given k-window prompt embeddings, padded
    as encode_prompt pads it. Other lengths come back unchanged."""
    window = empty.shape[1]
    if length > window and length % window == 0:
        return empty.repeat(1, length // window, 1)  # (B, length, D)
    return empty
