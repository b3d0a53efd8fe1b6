"""Hard text for every test that must round-trip it (tokenizer, Hugging Face export):
emoji, scripts, noncharacters, private use, lone surrogates, random code points."""
import random

from data.text.tokenizer import SPECIAL_TOKENS

ADVERSARIAL = {
    "empty": "",
    "ascii": "Hello, world! It's 2024; we've got 12345 items.",
    "emoji": "👍 🎉🔥💯",
    "emoji_skin_tones": "👍🏻👍🏼👍🏽👍🏾👍🏿 👋🏿",
    "emoji_zwj_family": "👨\u200d👩\u200d👧\u200d👦",
    "emoji_zwj_mixed": "👩🏿\u200d💻 🧑🏻\u200d🤝\u200d🧑🏾 🏳️\u200d🌈 🇫🇷🇯🇵",
    "cjk": "日本語のテキスト、漢字とひらがな。中文字符串测试。한국어 텍스트",
    "arabic": "مرحبا بالعالم، هذا نص تجريبي ١٢٣",
    "hebrew": "שלום עולם, זהו טקסט לבדיקה",
    "mixed_bidi": "abc مرحبا 123 שלום \u200fxyz\u200e\u202bembedded\u202c",
    "combining": "e\u0301 a\u0300\u0301\u0302\u0303\u0304 n\u0303",
    "zalgo": "Z\u0324\u0354\u0367\u0311\u0313a\u0308\u0356\u032d\u0308\u0307l\u036e\u0312\u036bg\u0328\u0317\u0355\u033fo",
    "leading_combining": "\u0301\u0302start",
    "nul": "\x00",
    "nul_inside": "a\x00b\x00\x00c",
    "escape": "\x1b[31mred\x1b[0m plain \x1b",
    "del": "\x7f a\x7fb",
    "all_controls": "".join(chr(i) for i in range(32)) + "\x7f" + "".join(chr(i) for i in range(0x80, 0xa0)),
    "crlf": "line one\r\nline two\r\n\r\nline four",
    "lone_cr": "\r",
    "cr_inside": "a\rb\r\rc",
    "newline_mess": "\r\r\n\n\r \n\t\r\n ",
    "space_run": " " * 5000,
    "tab_run": "\t" * 2000,
    "newline_run": "\n" * 3000,
    "word_space_word": "a" + " " * 10000 + "b",
    "unicode_spaces": "\u00a0\u2003\u3000\u2028\u2029\u0085\u200b x \u00a0\u00a0y",
    "trailing_spaces": "word   \n   ",
    "long_word": "a" * 20000,
    "long_repeated_word": "supercalifragilistic" * 500,
    "long_digits": "1234567890" * 1000,
    "long_mixed_word": "".join(random.Random(0).choice("abcdefghijklmnopqrstuvwxyz") for _ in range(20000)),
    "endoftext_literal": "<|endoftext|>",
    "user_literal": "<|user|>",
    "specials_in_text": "before<|endoftext|>after <|user|> hi <|assistant|> ok <|end|><|pad|><|system|>",
    "all_specials": "".join(SPECIAL_TOKENS),
    "code": "def f(x):\n\treturn {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n",
    "contractions": "I'm you're he'll we've they'd IT'S Don'T",
    "noncharacters": "\ufffe\uffff\U0001fffe\U0010ffff\ufffd",
    "private_use": "\ue000\uf8ff\U000f0000\U00100000",
    "astral": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𐍈 𝕏 𠀀𪛖",
}

LONE_SURROGATES = {
    "high_alone": "\ud800",
    "low_inside_word": "a\udfffb",
    "high_then_text": "\udbffxyz",
    "surrogate_pair_as_two_chars": "\ud83d\ude00",
    "reversed_pair": "\ude00\ud83d",
    "surrogates_in_sentence": "hello \ud800 world \udc00!",
}


def random_string(rng: random.Random, length: int, include_surrogates: bool) -> str:
    """Random code points drawn from several planes (BMP, surrogates, SMP, SIP, SSP, PUA)."""
    ranges = [
        (0x0000, 0x007F),    # ASCII incl. controls
        (0x0080, 0x07FF),    # 2-byte UTF-8
        (0x0800, 0xD7FF),    # 3-byte BMP
        (0xE000, 0xFFFF),    # BMP above the surrogates
        (0x10000, 0x1FFFF),  # plane 1 (emoji, symbols)
        (0x20000, 0x3FFFF),  # planes 2-3 (CJK extensions)
        (0x40000, 0x10FFFF), # the rest, incl. planes 15-16 private use
    ]
    if include_surrogates:
        ranges.append((0xD800, 0xDFFF))
    out = []
    for _ in range(length):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    s = "".join(out)
    if include_surrogates and not any("\ud800" <= c <= "\udfff" for c in s):
        s += "\udabc"
    return s


def random_strings(include_surrogates: bool) -> list[str]:
    rng = random.Random(1234)
    return [random_string(rng, rng.randint(1, 200), include_surrogates) for _ in range(100)]
