"""A deterministic corpus of hard strings for tokenizer parity tests (no files, no network).

Each family targets one way tokenizers drift from OpenAI's: text cleaning (HTML entities, ftfy repairs of curly quotes,
ligatures, full-width forms and mojibake), Unicode classes in the word pattern (CJK, emoji, scripts, control and
format characters), special-token parsing and truncation.
"""

import random

WORDS = [
    "a",
    "photo",
    "of",
    "the",
    "cat",
    "dog",
    "sitting",
    "on",
    "red",
    "blue",
    "car",
    "street",
    "at",
    "night",
    "person",
    "man",
    "woman",
    "child",
    "playing",
    "with",
    "ball",
    "bicycle",
    "tree",
    "house",
    "mountain",
    "river",
    "beach",
    "sunset",
    "city",
    "building",
    "food",
    "plate",
    "pizza",
    "coffee",
    "cup",
    "laptop",
    "phone",
    "book",
    "running",
    "jumping",
    "close-up",
    "painting",
    "drawing",
    "sketch",
    "toy",
    "sculpture",
    "tattoo",
    "rendering",
    "origami",
    "embroidered",
    "plushie",
    "don't",
    "it's",
    "we're",
    "they've",
    "i'm",
    "you'll",
    "she'd",
    "O'Brien",
    "rock'n'roll",
    "1990s",
    "3D",
    "4k",
    "10,000",
    "3.14",
    "#hashtag",
    "@user",
]

HTML_ENTITIES = [
    "&amp;",
    "&amp;amp;",
    "&amp;amp;amp;",
    "&lt;b&gt;",
    "&quot;",
    "&#39;",
    "&#x27;",
    "&nbsp;",
    "&eacute;",
    "&hellip;",
    "&mdash;",
    "&copy;",
    "&euro;",
    "&#8220;quoted&#8221;",
    "&#128512;",
    "&amp",
    "& amp;",
    "&unknownentity;",
    "&#0;",
]
CURLY_AND_QUOTES = ["“", "”", "‘", "’", "«", "»", "„", "‚", "‹", "›", "`", "´", "″", "′"]
LIGATURES = ["ﬁ", "ﬂ", "ﬀ", "ﬃ", "ﬄ", "ﬅ", "ﬆ", "Ĳ", "ǆ", "œ", "æ"]
FULL_WIDTH = ["ＡＢＣ", "ｆｕｌｌ　ｗｉｄｔｈ", "１２３４", "！？", "（ｔｅｘｔ）", "ｶﾀｶﾅ", "＠＃＄％"]
MOJIBAKE_SOURCES = ["café", "naïve", "déjà vu", "—", "“quote”", "it’s", "Ünïcödé", "señor", "€100", "日本"]
CJK = [
    "東京タワー",
    "北京烤鸭",
    "한국어 텍스트",
    "ひらがなとカタカナ",
    "漢字かな交じり文",
    "中文，标点。",
    "ｈａｌｆ ｶﾅ",
]
EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🇯🇵", "❤️", "🐱‍👤", "☕", "🎉🎉🎉", "1️⃣", "🏳️‍🌈"]
SCRIPTS = [
    "Ελληνικά ΟΔΟΣ",
    "Русский текст",
    "العربية",
    "עברית",
    "हिन्दी",
    "ภาษาไทย",
    "ქართული",
    "Հայերեն",
    "ᚠᛇᚻ",
    "ǅemal İstanbul",
    "e\u0301 combining",
    "ﬀ ligature",
    "Ⅻ roman",
    "½ ¾ ²³",
    "ß ẞ",
    "ŉ",
    "ﬗ",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "𝟙𝟚𝟛",
]
CONTROL_AND_SPACE = [
    "\x00",
    "\x07",
    "\x1b",
    "\x1c",
    "\x1f",
    "\x7f",
    "\x85",
    "\t",
    "\n",
    "\r\n",
    "\x0b",
    "\x0c",
    "\xa0",
    "\u2028",
    "\u2029",
    "\u200b",
    "\u200d",
    "\ufeff",
    "\u3000",
    "\u180e",
    "\u202e",
    "\ufffd",
    "   ",
]
PUNCTUATION = [*list("!\"#$%&'()*+,-./:;<=>?@[\\]^_{|}~"), "...", "!!", "?!", "--", "<>", "''", "'s", "'S", "'LL"]
SPECIAL_LITERALS = ["<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>", "<|endoftext|><|endoftext|>", "endoftext"]
# Code-point ranges for random characters: Latin, Greek, Cyrillic, Arabic, Devanagari, CJK, Hangul, symbols, emoji.
RANDOM_RANGES = [
    (0x20, 0x7E),
    (0xA0, 0x24F),
    (0x370, 0x3FF),
    (0x400, 0x4FF),
    (0x600, 0x6FF),
    (0x900, 0x97F),
    (0x2000, 0x206F),
    (0x2100, 0x23FF),
    (0x3000, 0x30FF),
    (0x4E00, 0x4FFF),
    (0xAC00, 0xAD00),
    (0xFF00, 0xFFEF),
    (0x1F300, 0x1F64F),
]


def _mojibake(text: str, rng: random.Random) -> str:
    """UTF-8 bytes read as Windows-1252 or Latin-1: the damage ftfy repairs."""
    encoding = rng.choice(["cp1252", "latin-1"])
    return text.encode("utf-8").decode(encoding, errors="replace")


def _random_chars(rng: random.Random, count: int) -> str:
    chars = []
    for _ in range(count):
        low, high = rng.choice(RANDOM_RANGES)
        chars.append(chr(rng.randint(low, high)))
    return "".join(chars)


def _caption(rng: random.Random, min_words: int = 3, max_words: int = 12) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
    if rng.random() < 0.3:
        words[0] = words[0].capitalize()
    if rng.random() < 0.2:
        words = [word.upper() for word in words]
    return " ".join(words) + rng.choice(["", ".", "!", "?", "...", " :)"])


def _insert(rng: random.Random, text: str, pieces: list[str], count: int = 2) -> str:
    for _ in range(count):
        position = rng.randint(0, len(text))
        text = text[:position] + rng.choice(pieces) + text[position:]
    return text


def build_corpus(seed: int = 0, size: int = 1200) -> list[str]:
    """`size` strings (at least one of every fixed piece, then random mixtures), the same for a given seed."""
    rng = random.Random(seed)
    fixed_families = [HTML_ENTITIES, CURLY_AND_QUOTES, LIGATURES, FULL_WIDTH, CJK, EMOJI, SCRIPTS, CONTROL_AND_SPACE]
    corpus = ["", " ", "a", "A photo of a cat.", "\n\t  \n"]
    corpus += [f"a photo of {piece} here" for family in fixed_families for piece in family]
    corpus += [f"{piece} and {piece}" for piece in PUNCTUATION + SPECIAL_LITERALS]
    corpus += [_mojibake(text, rng) for text in MOJIBAKE_SOURCES]
    corpus += [_mojibake(_mojibake(text, rng), rng) for text in MOJIBAKE_SOURCES]

    mixers = [
        lambda: _caption(rng),
        lambda: _insert(rng, _caption(rng), HTML_ENTITIES),
        lambda: _insert(rng, _caption(rng), CURLY_AND_QUOTES + LIGATURES + FULL_WIDTH),
        lambda: _mojibake(_insert(rng, _caption(rng), MOJIBAKE_SOURCES), rng),
        lambda: _insert(rng, _caption(rng), CJK + EMOJI + SCRIPTS),
        lambda: _insert(rng, _caption(rng), CONTROL_AND_SPACE, count=3),
        lambda: _insert(rng, _caption(rng), PUNCTUATION, count=4),
        lambda: _insert(rng, _caption(rng), SPECIAL_LITERALS),
        lambda: _caption(rng, 40, 120),  # longer than the 77-token context
        lambda: _random_chars(rng, rng.randint(1, 40)),
        lambda: " ".join(_random_chars(rng, rng.randint(1, 6)) for _ in range(rng.randint(1, 15))),
    ]
    while len(corpus) < size:
        corpus.append(rng.choice(mixers)())
    return corpus
